"""`defect-studio bench classifier`: compare classifier candidates on a dataset's fixed split.

Each candidate trains with the same job the app uses (validation split carved from the training
split, early stopping on validation AUROC, decision threshold chosen on validation) and is then
scored once on the test split. Reported per candidate: test AUROC, F1 / precision / recall /
accuracy of the defect class, recall per defect type (when metadata.csv names types), train AUROC,
seconds per epoch, total training time, epochs run, parameters and peak memory.

Run as a module for ad-hoc comparisons: `python -m defect_studio.bench.classifier --dataset DIR
--only compact-w24-os16-lse,resnet18-squash ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defect_studio.bench.cams import MASK_QUALITY_METHODS, mask_quality
from defect_studio.bench.report import write_report
from defect_studio.dataset_layout import DatasetSample, load_dataset
from defect_studio.imageio import file_sha256
from defect_studio.jobs import CancelToken, Progress, ProgressKind, run_job
from defect_studio.ml.classifier import train_classifier_job
from defect_studio.ml.models import ClassifierConfig, build_classifier, count_parameters

DEFAULT_CANDIDATE = "effnet-f2-os32-256"
TIME_BUDGET_S = 600.0  # the target: a classifier within 10 minutes of training on this machine
# One thread per training: on a machine shared with other jobs two OpenMP threads spin-wait for each
# other and run several times slower (the speed-lever table measures 1 and 2 threads).
BENCH_THREADS = 1

# name -> ClassifierConfig overrides (on top of the defaults). The first is the baseline
# architecture; then one lever at a time. Every candidate gets the same wall-clock budget.
CANDIDATES: dict[str, dict[str, Any]] = {
    # EfficientNet-Lite0 with ImageNet weights (the default), frozen to stride 8 (f2) or 16 (f3)
    "effnet-f2-os32-256": dict(arch="efficientnet-lite0"),
    "effnet-f3-os32-256": dict(arch="efficientnet-lite0", frozen_stages=3),
    "effnet-f2-os32-384": dict(arch="efficientnet-lite0", input_size=384),
    "effnet-f2-os16-256": dict(arch="efficientnet-lite0", output_stride=16),
    "effnet-f2-os32-256-lse": dict(arch="efficientnet-lite0", pooling="lse"),
    "resnet18-os32-avg-256": dict(arch="resnet18", output_stride=32, pooling="avg", input_size=256, lr=1e-3),
    "compact-w16-os32-avg-128": dict(arch="compact", width=16, output_stride=32, pooling="avg", input_size=128),
    "compact-w16-os16-avg-128": dict(arch="compact", width=16, output_stride=16, pooling="avg", input_size=128),
    "compact-w16-os16-lse-128": dict(arch="compact", width=16, output_stride=16, pooling="lse", input_size=128),
    "compact-w16-os16-topk-128": dict(arch="compact", width=16, output_stride=16, pooling="topk", input_size=128),
    "compact-w16-os8-lse-128": dict(arch="compact", width=16, output_stride=8, pooling="lse", input_size=128),
    "compact-w16-os8-avg-128": dict(arch="compact", width=16, output_stride=8, pooling="avg", input_size=128),
    "compact-w32-os16-lse-128": dict(arch="compact", width=32, output_stride=16, pooling="lse", input_size=128),
    "compact-w16-os16-lse-192": dict(arch="compact", width=16, output_stride=16, pooling="lse", input_size=192),
    "compact-w16-os16-lse-256": dict(arch="compact", width=16, output_stride=16, pooling="lse", input_size=256),
    "compact-w16-os16-lse-256-prog": dict(arch="compact", width=16, output_stride=16, pooling="lse", input_size=256,
                                          low_res_fraction=0.7),
}
FULL_SET = ["effnet-f2-os32-256", "effnet-f3-os32-256", "effnet-f2-os32-384", "compact-w16-os16-avg-128"]
QUICK_SET = ["effnet-f2-os32-256", "compact-w16-os16-avg-128"]
QUICK_OVERRIDES = dict(epochs=30, min_epochs=30, low_res_fraction=0.0, max_train_seconds=50.0, threads=1)

COLUMNS = ["candidate", "test_auroc", "test_f1", "test_precision", "test_recall", "test_accuracy", "train_auroc",
           "val_auroc", "s_per_epoch", "train_s", "epochs", "best_epoch", "params_m", "peak_mb"]
MASK_COLUMNS = ["candidate"] + [f"{kind} {name}" for name, _, _ in MASK_QUALITY_METHODS for kind in ("iou", "type-mean")]


def candidate_config(name: str, seed: int, quick: bool = False, **overrides: Any) -> ClassifierConfig:
    if name not in CANDIDATES:
        raise SystemExit(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
    settings: dict[str, Any] = dict(max_train_seconds=TIME_BUDGET_S, epochs=60, threads=BENCH_THREADS, low_res_fraction=0.0)
    settings.update(CANDIDATES[name])
    settings.update(seed=seed)
    if quick:
        settings.update(QUICK_OVERRIDES)
    settings.update(overrides)
    return ClassifierConfig(**settings)


def _subset(samples: list[DatasetSample], per_class: int, seed: int) -> list[DatasetSample]:
    rng = np.random.default_rng(seed)
    out: list[DatasetSample] = []
    for label in ("good", "defect"):
        members = [s for s in samples if s.label == label]
        keep = rng.permutation(len(members))[:per_class]
        out += [members[i] for i in sorted(keep)]
    return out


def evaluate_candidate(
    name: str, config: ClassifierConfig, train: list[DatasetSample], test: list[DatasetSample],
    hashes: dict[Path, str], out_dir: Path, verbose: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    samples = [(s.image_path, s.label, hashes[s.image_path]) for s in train]
    evaluation = [(s.image_path, s.label, hashes[s.image_path]) for s in test]

    def show(event: Progress) -> None:
        if verbose and event.kind in (ProgressKind.EPOCH, ProgressKind.RESULT):
            metrics = " ".join(f"{k}={v:.4f}" for k, v in event.metrics.items() if isinstance(v, float))
            print(f"  [{name}] {event.stage} {event.step}/{event.total} {event.message} {metrics}", file=sys.stderr, flush=True)

    result = run_job(train_classifier_job(samples, config, out_dir / f"{name}.pt", CancelToken(), "auto", evaluation=evaluation), show)
    metrics = result.metrics
    masks = {"candidate": name, **mask_quality(out_dir / f"{name}.pt", train)}
    row: dict[str, Any] = {
        "candidate": name,
        **{k: metrics.get(k, float("nan")) for k in ("test_auroc", "test_f1", "test_precision", "test_recall",
                                                        "test_accuracy", "train_auroc", "val_auroc")},
        "s_per_epoch": result.seconds_per_epoch,
        "train_s": result.seconds,
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "params_m": count_parameters(build_classifier(config)) / 1e6,
        "peak_mb": result.peak_memory_mb,
    }
    probabilities = np.asarray(result.test_probabilities or [])
    per_type: dict[str, Any] = {"candidate": name}
    for defect_type in sorted({s.defect_type for s in test if s.defect_type}):
        picked = [i for i, s in enumerate(test) if s.defect_type == defect_type]
        per_type[defect_type] = float(np.mean(probabilities[picked] > result.decision_threshold))
    good = [i for i, s in enumerate(test) if s.label == "good"]
    if good:
        per_type["good (specificity)"] = float(np.mean(probabilities[good] <= result.decision_threshold))
    details = {"config": config.to_dict(), "history": result.history, "threshold": result.decision_threshold,
               "device": result.device}
    return {**row, "_per_type": per_type, "_masks": masks}, details


LEVERS = [
    ("fp32, contiguous", dict(channels_last=False, bf16=False, compile=False)),
    ("fp32, channels_last", dict(channels_last=True, bf16=False, compile=False)),
    ("bf16 autocast, channels_last", dict(channels_last=True, bf16=True, compile=False)),
    ("fp32, channels_last, torch.compile", dict(channels_last=True, bf16=False, compile=True)),
]


def measure_speed_levers(config: ClassifierConfig, thread_counts: list[int], batch_size: int = 32, steps: int = 4,
                         with_compile: bool = True) -> list[dict[str, Any]]:
    """Milliseconds per image of one training step (forward + backward + AdamW) for each CPU lever."""
    import time

    rows = []
    previous = torch.get_num_threads()
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for label, lever in LEVERS:
                if lever["compile"] and not with_compile:
                    continue
                torch.manual_seed(0)
                model = build_classifier(config).train()
                x = torch.randn(batch_size, config.channels, config.input_size, config.input_size)
                y = (torch.rand(batch_size) > 0.5).float()
                if lever["channels_last"]:
                    model = model.to(memory_format=torch.channels_last)
                    x = x.contiguous(memory_format=torch.channels_last)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
                step_model: Any = model
                compile_s = 0.0
                if lever["compile"]:
                    try:
                        started = time.perf_counter()
                        step_model = torch.compile(model)
                        step_model(x[:2]).sum().backward()
                        compile_s = time.perf_counter() - started
                    except Exception as error:  # noqa: BLE001 - a missing compiler is a result, not a crash
                        rows.append({"lever": label, "threads": threads, "ms_per_image": float("nan"), "note": f"failed: {type(error).__name__}"})
                        continue
                times = []
                for step in range(steps + 1):
                    started = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lever["bf16"]):
                        logits = step_model(x)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if step:  # the first step warms up the allocator and kernels
                        times.append(time.perf_counter() - started)
                rows.append({"lever": label, "threads": threads, "ms_per_image": 1000 * float(np.median(times)) / batch_size,
                             "note": f"compile {compile_s:.0f} s" if lever["compile"] else ""})
                print(f"  speed: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(previous)
    return rows


def run(dataset: Path, names: list[str], quick: bool, out: Path, seed: int, overrides: dict[str, Any],
        report_name: str = "classifier", levers: bool = True, keep_checkpoints: bool = False) -> int:
    samples = load_dataset(dataset, seed=seed)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    if quick:
        train, test = _subset(train, 100, seed), _subset(test, 40, seed)
    hashes = {s.image_path: file_sha256(s.image_path) for s in (*train, *test)}
    rows, per_type_rows, mask_rows, details = [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="ds-bench-classifier-") as temporary:
        scratch = out / "checkpoints" if keep_checkpoints else Path(temporary)
        for name in names:
            config = candidate_config(name, seed, quick, **overrides)
            print(f"== {name}: {json.dumps(config.to_dict())}", file=sys.stderr, flush=True)
            row, detail = evaluate_candidate(name, config, train, test, hashes, Path(scratch))
            per_type_rows.append(row.pop("_per_type"))
            mask_rows.append(row.pop("_masks"))
            rows.append(row)
            details[name] = detail
            print("  " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), file=sys.stderr, flush=True)
    type_columns = ["candidate"] + sorted({k for r in per_type_rows for k in r if k != "candidate"})
    notes = [
        f"Dataset {dataset.name}: {len(train)} train images (of which a seeded stratified ~15% are held out for "
        f"validation/early stopping/threshold), {len(test)} test images" + (" (quick subset)" if quick else "") + ".",
        "F1/precision/recall/accuracy use the decision threshold chosen on the validation images; AUROC is threshold-free.",
        f"Candidates train with {BENCH_THREADS} torch thread(s) (unless overridden) and the same "
        f"{QUICK_OVERRIDES['max_train_seconds'] if quick else TIME_BUDGET_S:.0f} s budget "
        "for the whole job; peak_mb is the process's peak resident memory so far (CPU; it never goes down, so a "
        "candidate after a larger one shows the larger one's peak) or the CUDA allocator peak.",
    ]
    notes.append("Mask quality: each candidate's CAMs on the train split's defect images (pooled defect IoU at the best "
                 "global threshold, and its mean over defect types): the measure the default is chosen by.")
    tables = [("Test split", rows, COLUMNS), ("Mask quality of the CAMs (train split, defect images)", mask_rows, MASK_COLUMNS),
              ("Recall per defect type (test)", per_type_rows, type_columns)]
    if levers:
        lever_name = DEFAULT_CANDIDATE if DEFAULT_CANDIDATE in names or not quick else names[0]
        lever_config = candidate_config(lever_name, seed, quick, **overrides)
        lever_rows = measure_speed_levers(lever_config, [1] if quick else [1, 2],
                                          steps=2 if quick else 4, with_compile=not quick)
        tables.append((f"CPU speed levers ({lever_name}, input {lever_config.input_size}, batch 32, one training step)",
                       lever_rows, ["lever", "threads", "ms_per_image", "note"]))
    markdown = write_report(out, report_name, f"Classifier candidates on {dataset.name}", tables,
                            notes, extra={"details": details, "quick": quick, "seed": seed})
    print(markdown)
    return 0


def main(args: argparse.Namespace) -> int:
    names = QUICK_SET if args.quick else FULL_SET
    only = getattr(args, "only", None)
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
    overrides = json.loads(getattr(args, "overrides", None) or "{}")
    out = Path(args.out) if args.out else Path("bench-results")
    return run(Path(args.dataset), names, bool(args.quick), out, int(args.seed), overrides,
               getattr(args, "report_name", None) or "classifier", levers=not getattr(args, "no_levers", False),
               keep_checkpoints=bool(getattr(args, "keep_checkpoints", False)))


if __name__ == "__main__":
    from defect_studio.bench.options import add_bench_arguments

    parser = argparse.ArgumentParser(description=__doc__)
    add_bench_arguments(parser)
    parser.add_argument("--only", help="comma-separated candidate names")
    parser.add_argument("--overrides", help="JSON of ClassifierConfig fields applied to every candidate")
    parser.add_argument("--report-name", dest="report_name")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--keep-checkpoints", dest="keep_checkpoints", action="store_true",
                        help="keep each candidate's checkpoint under OUT/checkpoints/")
    parser.add_argument("--no-levers", dest="no_levers", action="store_true", help="skip the CPU speed-lever table")
    parsed = parser.parse_args()
    if parsed.threads:
        torch.set_num_threads(parsed.threads)
    raise SystemExit(main(parsed))
