"""Export a trained segmenter as ONNX + TorchScript + model card, and prove it gives the app's masks.

Files are first written to a staging folder beside the target; the parity check runs on the
staged files (ONNX through onnxruntime exactly as `defect_studio.predict` runs it, TorchScript
through torch.jit.load) against the in-app model on held-out images. Only when every image passes
are the files moved into the target folder, so a failed export leaves the target as it was.

The ONNX graph is made by the TorchScript-based exporter (`dynamo=False`): it needs no onnxscript
and handles the dynamic height/width of this all-convolutional network.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator, Iterator, Sequence

import numpy as np
import torch

from defect_studio.atomic import atomic_write_json, fsync_directory
from defect_studio.errors import ModelError
from defect_studio.imageio import file_sha256
from defect_studio.jobs import Progress
from defect_studio.ml.segmenter import FlipAveraged, LoadedSegmenter, SegmenterConfig, build_segmenter
from defect_studio.ml.tiling import Tiling, tiled_map
from defect_studio.predict import (
    CARD_FILE,
    GATE_MODEL_FILE,
    GATE_TORCHSCRIPT_FILE,
    MODEL_FILE,
    TORCHSCRIPT_FILE,
    load_exported,
    sigmoid,
    to_network_input,
)

if TYPE_CHECKING:
    from defect_studio.project.store import Project

ONNX_OPSET = 17
DEFAULT_MAX_ABS_DIFF = 1e-3
DEFAULT_MIN_MASK_IOU = 0.99


@dataclass
class ParityResult:
    images: int
    onnx_max_abs_diff: float
    torchscript_max_abs_diff: float
    onnx_min_mask_iou: float
    torchscript_min_mask_iou: float
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """No garbage collection in any thread while graphs are traced or loaded. The window exports in a worker thread,
    and a collection started by the GUI thread in the middle of torch.jit.trace or torch.onnx.export aborted
    the process (twice in two full test runs, at the same export). A few seconds without collection cost
    nothing; cycles made meanwhile are collected afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _export_onnx(model: torch.nn.Module, path: Path) -> None:
    import warnings

    dummy = torch.zeros(1, model.in_channels, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}},
            opset_version=ONNX_OPSET,
        )


def _export_gate(classifier: Any, staging: Path) -> None:
    """The gate classifier as ONNX and TorchScript: a letterboxed C×S×S input (dynamic batch) -> one logit."""
    import copy
    import warnings

    network = copy.deepcopy(classifier.model).to("cpu", memory_format=torch.contiguous_format).eval()
    size = classifier.preprocessing.input_size
    dummy = torch.zeros(1, classifier.preprocessing.channels, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (dummy,), str(staging / GATE_MODEL_FILE), dynamo=False, input_names=["image"],
                          output_names=["logit"], dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}},
                          opset_version=ONNX_OPSET)
        torch.jit.trace(network, dummy, check_trace=False).save(str(staging / GATE_TORCHSCRIPT_FILE))


def _gate_card(loaded: LoadedSegmenter) -> dict[str, Any] | None:
    classifier = loaded.gate_classifier
    if classifier is None:
        return None
    return {
        "onnx": GATE_MODEL_FILE, "torchscript": GATE_TORCHSCRIPT_FILE,
        "what": ("the defect classifier the segmenter was trained with: an image whose classifier probability "
                 "(sigmoid of the logit) is not above threshold gets an empty mask; the segmenter's own image_gate "
                 "is then not used; where `tiling` cuts an image, its probability is the largest of its tiles'"),
        "preprocessing": classifier.preprocessing.to_dict(),  # letterboxed as defect_studio.ml.preprocess does
        # null: the image is letterboxed whole; else an image this tiling cuts (classifier_options.classifier_tile_grid)
        # scores as its most defect-like tile, each tile letterboxed on its own
        "tiling": None if classifier.tiling is None else classifier.tiling.to_dict(),
        "threshold": loaded.gate_threshold,
        "classifier_sha256": classifier.checkpoint_sha256,
    }


def _export_torchscript(model: torch.nn.Module, path: Path) -> None:
    import warnings

    dummy = torch.zeros(1, model.in_channels, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, dummy, check_trace=False)
    traced.save(str(path))


def check_parity(
    loaded: LoadedSegmenter,
    staged_dir: Path,
    images: Sequence[np.ndarray],
    max_abs_diff: float = DEFAULT_MAX_ABS_DIFF,
    min_mask_iou: float = DEFAULT_MIN_MASK_IOU,
) -> ParityResult:
    """Compare ONNX (onnxruntime) and TorchScript probabilities and masks with the in-app model's."""
    exported = load_exported(staged_dir)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still the format asked for
        scripted = torch.jit.load(str(staged_dir / TORCHSCRIPT_FILE), map_location="cpu").eval()
    threshold = loaded.threshold

    def scripted_probability(image: np.ndarray) -> np.ndarray:
        batch, (height, width) = to_network_input(image, loaded.model.in_channels, loaded.model.size_multiple)
        with torch.no_grad():
            logits = scripted(torch.from_numpy(batch)).numpy()
        return sigmoid(logits[0, 0, :height, :width])

    worst = {"onnx_diff": 0.0, "ts_diff": 0.0, "onnx_iou": 1.0, "ts_iou": 1.0}
    gate_diff = max((abs(exported.gate_probability(image) - loaded.gate_probability(image))
                     for image in images if loaded.gate_classifier is not None), default=0.0)
    gate_agrees = gate_diff <= max_abs_diff
    for image in images:
        reference = loaded.probability(image)
        onnx_probability = exported.probability(image)  # by tiles where the card's tiling says so
        ts_probability = tiled_map(image, scripted_probability, exported.tiling)
        reference_mask = reference >= threshold
        worst["onnx_diff"] = max(worst["onnx_diff"], float(np.abs(onnx_probability - reference).max()))
        worst["ts_diff"] = max(worst["ts_diff"], float(np.abs(ts_probability - reference).max()))
        worst["onnx_iou"] = min(worst["onnx_iou"], _mask_iou(onnx_probability >= threshold, reference_mask))
        worst["ts_iou"] = min(worst["ts_iou"], _mask_iou(ts_probability >= threshold, reference_mask))
    passed = (
        gate_agrees
        and worst["onnx_diff"] <= max_abs_diff
        and worst["ts_diff"] <= max_abs_diff
        and worst["onnx_iou"] >= min_mask_iou
        and worst["ts_iou"] >= min_mask_iou
    )
    return ParityResult(len(images), worst["onnx_diff"], worst["ts_diff"], worst["onnx_iou"], worst["ts_iou"], passed)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from defect_studio import __version__

    return {
        "defect_studio": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx_opset": str(ONNX_OPSET),
    }


def training_data_hash(keys_and_hashes: Sequence[str]) -> str:
    """One hash for the set of (image, mask) content hashes a model was trained on."""
    digest = hashlib.sha256()
    for item in sorted(keys_and_hashes):
        digest.update(item.encode("utf-8") + b"\n")
    return digest.hexdigest()


def segmenter_tiling(loaded: LoadedSegmenter) -> Tiling:
    """The tiling the in-app segmenter predicts with: its checkpoint's, else the default ("auto")."""
    return Tiling.from_dict(loaded.meta.get("tiling"))


def build_model_card(loaded: LoadedSegmenter, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = loaded.meta
    card = {
        "format": "defect-studio-model-card/1",
        "task": ("binary defect segmentation (one logit per pixel; defect where sigmoid(logit) >= threshold, "
                 "in images whose score passes image_gate)"),
        "files": {"onnx": MODEL_FILE, "torchscript": TORCHSCRIPT_FILE},
        "input": {
            "name": "image",
            "layout": "NCHW",
            "dtype": "float32",
            "channels": int(meta["in_channels"]),
            "value_range": [0.0, 1.0],
            "size_multiple": int(meta["size_multiple"]),
            "dynamic": ["batch", "height", "width"],
        },
        "output": {"name": "logits", "layout": "N1HW", "activation": "sigmoid"},
        "preprocessing": [
            "decode the image; 8-bit / 16-bit integers divided by 255 / 65535 to [0, 1]",
            "gray images as one channel; colour to gray (or gray repeated to 3 channels) to match input.channels",
            "reflect-pad bottom and right to a multiple of input.size_multiple; crop the output back",
            "normalisation (mean/std) is inside the network",
            ("the network averages the logits of the flipped views listed in test_time_flips (each mirrored back) "
             "inside its graph"),
            ("images larger than tiling.whole_image_max_pixels (mode auto; every image with mode tiles) are run by "
             "overlapping tiles of tiling.tile_size px, each tile's probabilities weighted by a raised-cosine ramp over "
             "tiling.overlap px at the borders it shares with other tiles, divided by the weights' sum "
             "(defect_studio.ml.tiling)"),
        ],
        # How images are cut for the network: what the app did with this model, what predict does.
        "tiling": segmenter_tiling(loaded).to_dict(),
        "test_time_flips": loaded.prediction_flips,  # none | h (left-right) | hv (left-right and top-bottom)
        "threshold": float(meta.get("threshold", 0.5)),
        # An image whose score (mean of its top_k probabilities) is under min_score gets an empty mask, unless
        # a classifier gate decides instead.
        "image_gate": meta.get("image_gate"),
        "classifier_gate": _gate_card(loaded),
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "training": {
            "config": meta.get("config"),
            "best_epoch": meta.get("epoch"),
            "validation": meta.get("validation"),
            "round": meta.get("round_index"),
            "trained_images": len(meta.get("trained_images", [])),
            "training_data_hash": meta.get("training_data_hash")
            or training_data_hash(list(meta.get("trained_images", []))),
        },
        "versions": _versions(),
    }
    card.update(extra or {})
    return card


def export_segmenter(
    loaded: LoadedSegmenter,
    out_dir: str | Path,
    parity_images: Sequence[np.ndarray],
    card_extra: dict[str, Any] | None = None,
    max_abs_diff: float = DEFAULT_MAX_ABS_DIFF,
    min_mask_iou: float = DEFAULT_MIN_MASK_IOU,
) -> tuple[Path, ParityResult]:
    """Write model.onnx, model.torchscript.pt, model-card.json into out_dir after a passing parity check."""
    if not parity_images:
        raise ModelError("export needs at least one held-out image for its parity check.")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = build_segmenter(loaded.model.in_channels, SegmenterConfig.from_dict(loaded.meta["config"]))
    model.load_state_dict({k: v.cpu() for k, v in loaded.model.state_dict().items()})
    model.eval()
    # The exported graph averages the flipped views inside it, as the app predicts: predict needs no change.
    exported_network = FlipAveraged(model, loaded.prediction_flips).eval()
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        try:
            with garbage_collection_paused():
                _export_onnx(exported_network, staging / MODEL_FILE)
                _export_torchscript(exported_network, staging / TORCHSCRIPT_FILE)
                if loaded.gate_classifier is not None:
                    _export_gate(loaded.gate_classifier, staging)
        except Exception as error:
            raise ModelError(f"exporting the segmenter failed: {str(error)[:300]}") from error
        cpu_loaded = LoadedSegmenter(model, loaded.meta, torch.device("cpu"), loaded.checkpoint_sha256,
                                     loaded.gate_classifier)
        files = [MODEL_FILE, TORCHSCRIPT_FILE] + ([GATE_MODEL_FILE, GATE_TORCHSCRIPT_FILE] if loaded.gate_classifier else [])
        card = build_model_card(cpu_loaded, card_extra)
        atomic_write_json(staging / CARD_FILE, card)  # the parity check reads the card like predict does
        with garbage_collection_paused():  # torch.jit.load builds script modules too
            parity = check_parity(cpu_loaded, staging, parity_images, max_abs_diff, min_mask_iou)
        if not parity.passed:
            raise ModelError(
                "export refused: the exported model does not reproduce the in-app model "
                f"(ONNX max |Δp| {parity.onnx_max_abs_diff:.2g}, mask IoU {parity.onnx_min_mask_iou:.4f}; "
                f"TorchScript max |Δp| {parity.torchscript_max_abs_diff:.2g}, mask IoU "
                f"{parity.torchscript_min_mask_iou:.4f}; limits {max_abs_diff:g} and {min_mask_iou:g})."
            )
        card["parity"] = parity.as_dict()
        card["files"] = {name: file_sha256(staging / name) for name in files}
        atomic_write_json(staging / CARD_FILE, card)
        out.mkdir(parents=True, exist_ok=True)
        # A folder with a card is a complete export, so an earlier export's card goes first (a crash
        # mid-way then leaves a folder with no card, never new model files under an old card), and
        # the new card comes last. The card's file hashes let predict refuse any mixture.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / CARD_FILE)
        fsync_directory(out)
        for name in (*files, CARD_FILE):
            os.replace(staging / name, out / name)
        if loaded.gate_classifier is None:  # an earlier export's gate must not outlive its card
            for name in (GATE_MODEL_FILE, GATE_TORCHSCRIPT_FILE):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(out / name)
        fsync_directory(out)
        return out, parity
    finally:
        shutil.rmtree(staging, ignore_errors=True)


STALE_STAGING_S = 600.0  # an export takes seconds; a staging folder this old belongs to a killed one


def remove_stale_staging(out: Path, older_than_s: float = STALE_STAGING_S) -> list[Path]:
    """Delete the hidden staging folders that killed exports into `out` left beside it."""
    removed = []
    now = time.time()
    for leftover in out.parent.glob(f".{out.name}.*.partial"):
        with contextlib.suppress(OSError):
            if leftover.is_dir() and now - leftover.stat().st_mtime > older_than_s:
                shutil.rmtree(leftover)
                removed.append(leftover)
    return removed


def export_project_job(
    project: Project, out_dir: str | Path, cancel: Any, segmenter_path: str | Path | None = None, parity_count: int = 8,
    run_id: int | None = None,
) -> Generator[Progress, None, dict[str, Any]]:
    """Export a project's segmenter for `defect-studio export` and the GUI: training run `run_id`, or
    the checkpoint at `segmenter_path`, or else the current segmenter (the newest, or the one the user
    made current with `use-segmenter`). Exporting an earlier round's segmenter changes nothing in the
    project.

    Parity images: the segmenter's held-out validation images first, then other project images.
    The card records the lineage of a recorded run (its settings, every mask it was trained on with
    image and mask hashes, the segmenters it continued from, the models that proposed its masks) and
    the rounds up to its own.
    """
    from defect_studio.imageio import read_image
    from defect_studio.ml.segmenter import load_segmenter
    from defect_studio.project.provenance import checkpoint_problem, lineage, resolve_segmenter

    run = None
    if segmenter_path is None:
        run = resolve_segmenter(project, run_id=run_id)
        problem = checkpoint_problem(project, run)
        if problem is not None:
            raise ModelError(f"{problem}; nothing was exported. Make another round's segmenter current "
                             "(defect-studio models, use-segmenter) or train this round again.")
        segmenter_path = run.checkpoint_path
    segmenter_path = Path(segmenter_path)
    if not segmenter_path.is_file():
        raise ModelError(f"{segmenter_path}: no such segmenter checkpoint; nothing was exported.")
    yield Progress("export", 0, 3, f"loading {segmenter_path.name}")
    loaded = load_segmenter(segmenter_path, device="cpu")
    if run is None:  # a path: the recorded run whose checkpoint this is, if any
        run = next((r for r in project.training_runs("segmenter") if r.checkpoint_sha256 == loaded.checkpoint_sha256), None)
    images = {image.stem: image for image in project.images()}
    held_out = [stem for stem in loaded.meta.get("validation_images", []) if stem in images]
    stems = (held_out + [stem for stem in images if stem not in held_out])[: max(1, parity_count)]
    cancel.raise_if_cancelled()
    yield Progress("export", 1, 3, f"reading {len(stems)} parity images")
    parity_images = [read_image(images[stem].path) for stem in stems]
    last_round = run.round_index if run is not None and run.round_index is not None else None
    extra = {
        "rounds": [{"round": r.index, "status": r.status, "metrics": r.metrics} for r in project.rounds()
                   if last_round is None or r.index <= last_round],
        "training_run": {"id": run.id, "metrics": run.metrics, "created_at": run.created_at} if run else None,
        "lineage": lineage(project, run) if run else None,
    }
    cancel.raise_if_cancelled()
    yield Progress("export", 2, 3, "exporting and checking parity")
    out, parity = export_segmenter(loaded, out_dir, parity_images, extra)
    yield Progress("export", 3, 3, f"exported to {out}")
    return {"out_dir": str(out), "parity": parity.as_dict(), "card": card_summary(Path(out) / CARD_FILE)}


def card_summary(card_path: Path) -> dict[str, Any]:
    return json.loads(Path(card_path).read_text(encoding="utf-8"))
