"""Provenance and rollback of trained models (no torch, no Qt: the CLI and the window share it).

Every training run records what it was trained on (`Project.run_inputs`: per image the mask's
round, review state and hash for a segmenter, the tag for a classifier) and how (`config`, and
`provenance`: the round's settings, the warm start, the models that made the masks). This module
reads that back as listings, details and a model card's lineage, and makes an earlier round's
segmenter the current one without touching anything else: later rounds, masks and models stay.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from defect_studio.errors import DataError, ModelError
from defect_studio.imageio import file_sha256
from defect_studio.project.store import Project, RunInput, TrainingRun


def _relative(project: Project, path: Path) -> str:
    try:
        return str(Path(path).relative_to(project.path))
    except ValueError:
        return str(path)


def checkpoint_problem(project: Project, run: TrainingRun) -> str | None:
    """Why run `run`'s checkpoint cannot be used as recorded (missing, or changed since), or None."""
    path = Path(run.checkpoint_path)
    name = _relative(project, path)
    if not path.is_file():
        return f"the checkpoint of run {run.id} ({name}) is missing from disk"
    if file_sha256(path) != run.checkpoint_sha256:
        return f"the checkpoint of run {run.id} ({name}) has changed on disk since it was trained"
    return None


def run_round(run: TrainingRun) -> int | None:
    """The round a model belongs to: a segmenter's training round; for a classifier, the latest round
    when it was trained (None: before the first round, or recorded before provenance existed)."""
    return run.round_index if run.kind == "segmenter" else run.provenance.get("round")


def inputs_summary(inputs: list[RunInput]) -> dict[str, Any]:
    """{"images": n, "by_label": {label: n}, "rounds": [mask rounds]} of a run's inputs."""
    return {
        "images": len(inputs),
        "by_label": dict(sorted(Counter(i.label for i in inputs).items())),
        "rounds": sorted({i.round_index for i in inputs if i.round_index is not None}),
    }


def _trained_on_text(run: TrainingRun, summary: dict[str, Any]) -> str:
    if not summary["images"]:
        return f"{len(run.dataset_hashes)} image(s), not itemised (trained before provenance was recorded)"
    what = "mask(s)" if run.kind == "segmenter" else "tagged image(s)"
    labels = ", ".join(f"{count} {label}" for label, count in summary["by_label"].items())
    return f"{summary['images']} {what} ({labels})"


def model_rows(project: Project, check_files: bool = True) -> list[dict[str, Any]]:
    """One row per trained model, oldest first: what `defect-studio models` and the window list."""
    current = project.current_segmenter()
    rows = []
    for run in project.training_runs():
        summary = inputs_summary(project.run_inputs(run.id))
        problem = checkpoint_problem(project, run) if check_files else None
        rows.append({
            "run": run.id,
            "kind": run.kind,
            "round": run_round(run),
            "created_at": run.created_at,
            "checkpoint": _relative(project, run.checkpoint_path),
            "checkpoint_sha256": run.checkpoint_sha256,
            "file": "ok" if problem is None else ("missing" if "missing" in problem else "changed"),
            "current": current is not None and run.id == current.id,
            "trained_on": summary,
            "trained_on_text": _trained_on_text(run, summary),
            "metrics": {k: v for k, v in run.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        })
    return rows


def run_details(project: Project, run: TrainingRun) -> dict[str, Any]:
    """Everything recorded about one run: settings, provenance and each image it was trained on."""
    inputs = project.run_inputs(run.id)
    stems = {image.id: image.stem for image in project.images()}
    current = project.current_segmenter()
    problem = checkpoint_problem(project, run)
    return {
        "run": run.id,
        "kind": run.kind,
        "round": run_round(run),
        "created_at": run.created_at,
        "current": current is not None and current.id == run.id,
        "checkpoint": _relative(project, run.checkpoint_path),
        "checkpoint_sha256": run.checkpoint_sha256,
        "checkpoint_problem": problem,
        "seed": run.seed,
        "config": run.config,
        "provenance": run.provenance,
        "metrics": {k: v for k, v in run.metrics.items() if k != "history"},
        "trained_on": inputs_summary(inputs),
        "trained_on_text": _trained_on_text(run, inputs_summary(inputs)),
        "warm_start_chain": warm_start_chain(project, run),
        "inputs": [
            {"image_id": i.image_id, "image": stems.get(i.image_id, f"#{i.image_id}"), "round": i.round_index,
             "label": i.label, "image_sha256": i.image_sha256, "mask_sha256": i.mask_sha256}
            for i in inputs
        ],
    }


def describe_run_lines(details: dict[str, Any], max_inputs: int = 20) -> list[str]:
    """Plain-text lines of `run_details` for the CLI and the window."""
    lines = [
        f"run {details['run']}: {details['kind']}, round {'–' if details['round'] is None else details['round']}, "
        f"trained {details['created_at']}" + (" (current)" if details["current"] else ""),
        f"checkpoint: {details['checkpoint']} sha256 {details['checkpoint_sha256'][:16]}…"
        + (f" — {details['checkpoint_problem']}" if details["checkpoint_problem"] else ""),
        f"trained on: {details['trained_on_text']}",
        f"seed {details['seed']}; settings: "
        + ", ".join(f"{k}={v}" for k, v in sorted(details["config"].items()) if not isinstance(v, (dict, list)) or v),
    ]
    provenance = details["provenance"]
    if provenance.get("warm_start"):
        start = provenance["warm_start"]
        lines.append(f"continued from run {start.get('run')} (round {start.get('round')})")
    if details["warm_start_chain"]:
        lines.append("lineage: " + " ← ".join(f"run {link['run']} (round {link['round']})" for link in details["warm_start_chain"]))
    made_by = provenance.get("proposals_from") or {}
    if made_by.get("classifier_sha256") or made_by.get("segmenter_sha256"):
        lines.append(f"masks proposed by classifier(s) {', '.join(s[:12] for s in made_by.get('classifier_sha256', []))}"
                     + (f" and segmenter(s) {', '.join(s[:12] for s in made_by['segmenter_sha256'])}"
                        if made_by.get("segmenter_sha256") else ""))
    if provenance.get("round_config"):
        lines.append(f"round settings: {provenance['round_config']}")
    for item in details["inputs"][:max_inputs]:
        mask = f" mask {item['mask_sha256'][:12]} (round {item['round']})" if item["mask_sha256"] else ""
        lines.append(f"  {item['image']}: {item['label']}{mask} image {item['image_sha256'][:12]}")
    if len(details["inputs"]) > max_inputs:
        lines.append(f"  … and {len(details['inputs']) - max_inputs} more (--json lists them all)")
    return lines


def warm_start_chain(project: Project, run: TrainingRun) -> list[dict[str, Any]]:
    """The earlier segmenters this one continued from, nearest first (by checkpoint hash: a warm
    start records the hash of the network it started from)."""
    by_sha = {r.checkpoint_sha256: r for r in project.training_runs("segmenter")}
    chain: list[dict[str, Any]] = []
    seen = {run.id}
    started_from = run.metrics.get("started_from")
    while started_from and started_from in by_sha and by_sha[started_from].id not in seen:
        parent = by_sha[started_from]
        seen.add(parent.id)
        chain.append({"run": parent.id, "round": parent.round_index, "checkpoint_sha256": parent.checkpoint_sha256})
        started_from = parent.metrics.get("started_from")
    return chain


def lineage(project: Project, run: TrainingRun) -> dict[str, Any]:
    """What a model card says about where a model came from: the run, its settings, every mask it was
    trained on (image and mask hashes), the segmenters it continued from and the models whose
    proposals became its masks."""
    details = run_details(project, run)
    runs_by_sha = {r.checkpoint_sha256: r.id for r in project.training_runs()}
    made_by = run.provenance.get("proposals_from") or {}
    return {
        "run": run.id,
        "kind": run.kind,
        "round": details["round"],
        "trained_at": run.created_at,
        "seed": run.seed,
        "settings": run.config,
        "round_settings": run.provenance.get("round_config"),
        "checkpoint_sha256": run.checkpoint_sha256,
        "trained_on": {
            **details["trained_on"],
            "training_data_hash": run.provenance.get("training_data_hash"),
            "masks": [{k: item[k] for k in ("image", "image_sha256", "round", "label", "mask_sha256")}
                      for item in details["inputs"]],
        },
        "continued_from": details["warm_start_chain"],
        "proposals_from": {
            kind: [{"checkpoint_sha256": sha, "run": runs_by_sha.get(sha)} for sha in made_by.get(f"{kind}_sha256", [])]
            for kind in ("classifier", "segmenter")
        },
    }


# ------------------------------------------------------------------------------------------ rollback
def segmenter_for_round(project: Project, round_index: int) -> TrainingRun:
    """The newest segmenter trained on round `round_index`'s masks, or a clear error why there is none."""
    project.round(round_index)  # "this project has no round K"
    runs = [r for r in project.training_runs("segmenter") if r.round_index == round_index]
    if runs:
        return runs[-1]
    trained = sorted({r.round_index for r in project.training_runs("segmenter") if r.round_index is not None})
    with_one = f"rounds with a segmenter: {', '.join(map(str, trained))}" if trained else "no round has one yet"
    if not project.mask_records(round_index=round_index):
        raise DataError(f"round {round_index} has no masks, so no segmenter was trained on it ({with_one}).")
    raise ModelError(f"no segmenter has been trained on round {round_index} yet ({with_one}).")


def resolve_segmenter(project: Project, round_index: int | None = None, run_id: int | None = None) -> TrainingRun:
    """Round K's segmenter, run N (a segmenter), or else the current one."""
    if run_id is not None:
        run = project.training_run(run_id)
        if run.kind != "segmenter":
            raise ModelError(f"run {run_id} is a {run.kind}, not a segmenter.")
        return run
    if round_index is not None:
        return segmenter_for_round(project, round_index)
    run = project.current_segmenter()
    if run is None:
        raise ModelError("this project has no trained segmenter yet; run a refinement round first.")
    return run


def use_segmenter(project: Project, round_index: int | None = None, run_id: int | None = None) -> TrainingRun:
    """Make round K's (or run N's) segmenter the current one. Its checkpoint must be on disk as
    recorded; otherwise nothing changes and the message says why. Deletes nothing."""
    run = resolve_segmenter(project, round_index, run_id)
    problem = checkpoint_problem(project, run)
    if problem is not None:
        current = project.current_segmenter()
        still = f"run {current.id} (round {current.round_index})" if current is not None else "none"
        raise ModelError(f"{problem}, so it cannot be made current; the current segmenter is still {still}.")
    project.choose_segmenter(run.id)
    return run


def use_newest_segmenter(project: Project) -> TrainingRun | None:
    """Undo a choice: the newest segmenter is current again (and stays so as new ones are trained)."""
    project.choose_segmenter(None)
    return project.current_segmenter()


def segmenter_to_build_on(project: Project, round_index: int) -> TrainingRun | None:
    """The segmenter that round `round_index` builds on (its proposals, the warm start of its
    training): the one the user made current when it is from an earlier round, else the newest
    trained on round `round_index - 1`; None for round 0 or when there is none."""
    if round_index <= 0:
        return None
    chosen = project.chosen_segmenter()
    if chosen is not None and chosen.round_index is not None and chosen.round_index < round_index:
        return chosen
    runs = [r for r in project.training_runs("segmenter") if r.round_index == round_index - 1]
    return runs[-1] if runs else None
