"""`defect-studio bench scale`: time and peak memory per image size, 1 to 100 megapixels.

Synthetic gray 8-bit images (a textured surface with 3 px pits and thin scratches, about two defects
per megapixel) of 1, 4, 16, 64 and 100 MP (`--quick`: 1 and 4) are written as PNG. Each step runs in
a fresh Python process of its own, so its peak RSS (VmHWM) is that step's alone:

- import: a new project (made before the clock starts) imports the folder holding the one image
  (header check, decode, hash, database).
- predict: the production line's `predict` path on the image: decode, the exported segmenter
  (EfficientNet-Lite0 U-Net, ImageNet encoder, untrained decoder: its cost, not its masks) by
  overlapping tiles where the tiling says so, the mask PNG written. The baseline is taken after the
  model has run once on a full tile, so it holds the model and one tile's working memory.
- cams: the round-0 proposal of the image as the app makes it: decode, the default CAM method on the
  default classifier (EfficientNet-Lite0, ImageNet weights, untrained head: its cost, not its maps), by
  tiles of the classifier's input size above one megapixel (`ml/tiled_cams.py`), then the pseudo-label
  (one uint8 target, then the mask and ignore band split from it). The image is held in its 8-bit pixels
  and made float one tile at a time, and let go before the pseudo-label, and the map before the split, as
  in the app. The baseline is taken after the classifier's CAM of one tile.
- brush: the viewer and mask editor (offscreen Qt) showing the image fitted in an 800 × 600 view;
  milliseconds from a brush mouse-move event to the end of the mask layer's repaint
  (`gui_responsiveness.brush_on_image`, 100 events).

Targets (issue 15): seconds per megapixel within ±25 % from 4 to 100 MP; peak RSS at most 3× the
decoded image plus the process's baseline (interpreter, libraries, the model: measured before the
image is read); a brush repaint on 100 MP within 16 ms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES_MP = (1, 4, 16, 64, 100)
QUICK_SIZES_MP = (1, 4)
STEPS = ("import", "predict", "cams", "brush")
BRUSH_EVENTS = 100
BRUSH_TARGET_MS = 16.0
PER_MP_SPREAD_TARGET = 0.25
RSS_TARGET_FACTOR = 3.0
STEP_TIMEOUT_S = 1800
CLASSIFIER_FILE = "timing-classifier.pt"  # beside the exported segmenter


def image_side(megapixels: float) -> int:
    return int(round(math.sqrt(megapixels * 1e6)))


def synthetic_surface(megapixels: float, seed: int = 0) -> np.ndarray:
    """A side × side uint8 surface with small defects, made without any array wider than a byte a pixel
    besides a few rows (the 100 MP image is 100 MB)."""
    import cv2

    rng = np.random.default_rng(seed)
    side = image_side(megapixels)
    columns = (110 + 20 * np.sin(np.arange(side) / 37.0)).astype(np.uint8)
    rows = (10 * (1 + np.sin(np.arange(side) / 53.0))).astype(np.uint8)
    image = np.add.outer(rows, columns)  # gentle shading, uint8
    grain = rng.integers(0, 12, (256, 256), dtype=np.uint8)  # sensor grain, tiled
    for y in range(0, side, 256):
        block = image[y : y + 256]
        block += np.tile(grain, (1, side // 256 + 1))[: block.shape[0], :side]
    count = max(2, int(round(2 * megapixels)))
    for _ in range(count):  # 3 px dark pits and short thin scratches
        x, y = int(rng.integers(8, side - 8)), int(rng.integers(8, side - 8))
        if rng.random() < 0.6:
            cv2.circle(image, (x, y), 1, 30, -1)
        else:
            angle, length = rng.uniform(0, np.pi), int(rng.integers(20, 120))
            end = (int(x + length * np.cos(angle)), int(y + length * np.sin(angle)))
            cv2.line(image, (x, y), end, 200, 1)
    return image


def write_surface(path: Path, megapixels: float, seed: int = 0) -> int:
    """Write the synthetic image as a PNG (fast compression); returns its decoded bytes."""
    import cv2

    image = synthetic_surface(megapixels, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"cannot write {path}")
    return int(image.nbytes)


def export_timing_model(out_dir: Path) -> Path:
    """An exported segmenter for timing: the default architecture with ImageNet's encoder, untrained decoder."""
    import torch

    from defect_studio.ml.export import export_segmenter
    from defect_studio.ml.segmenter import LoadedSegmenter, SegmenterConfig, build_segmenter

    config = SegmenterConfig(encoder_weights="imagenet")
    model = build_segmenter(1, config, imagenet_weights=True).eval()
    meta = {"in_channels": 1, "size_multiple": model.size_multiple, "config": config.to_dict(), "threshold": 0.5}
    loaded = LoadedSegmenter(model, meta, torch.device("cpu"), "bench-scale")
    parity = np.random.default_rng(0).random((96, 128, 1)).astype(np.float32)
    export_segmenter(loaded, out_dir, [parity], {"note": "bench scale timing model (untrained decoder)"})
    return out_dir


def save_timing_classifier(path: Path) -> Path:
    """A classifier checkpoint for timing: the default backbone with ImageNet's weights, an untrained head."""
    import torch

    from defect_studio.ml.classifier import checkpoint_bytes
    from defect_studio.ml.classifier_options import ClassifierConfig
    from defect_studio.ml.models import build_classifier
    from defect_studio.ml.preprocess import Preprocessing

    config = ClassifierConfig()
    torch.manual_seed(0)
    model = build_classifier(config).eval()
    preprocessing = Preprocessing(config.input_size, config.channels, config.normalisation)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(checkpoint_bytes(model, config, preprocessing, 0.5, {}, [], 0))
    return path


# ----------------------------------------------------------------------------------- one step, in a child
def peak_rss() -> int:
    """This process's peak resident memory in bytes: /proc's VmHWM where there is one, since Linux keeps
    getrusage's ru_maxrss across exec (a child started by a large parent would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _measure_import(image_path: Path, workdir: Path) -> dict[str, Any]:
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.project import Project
    from defect_studio.project.importer import import_job

    with Project.create(workdir / "project", image_path.parent) as project:  # a new project's fixed cost: not timed
        baseline = peak_rss()
        started = time.perf_counter()
        report = run_job(import_job(project, image_path.parent, None, CancelToken()))
        seconds = time.perf_counter() - started
    if report.added != 1:
        raise RuntimeError(f"the import added {report.added} images: {report.lines()}")
    return {"seconds": seconds, "baseline_rss": baseline, "peak_rss": peak_rss()}


def _measure_predict(image_path: Path, model_dir: Path, workdir: Path) -> dict[str, Any]:
    from PIL import Image

    from defect_studio.predict import load_exported, predict_image_file

    model = load_exported(model_dir)
    # "Plus the models": the network and its working memory for one full tile are part of the baseline.
    tile = model.tiling.tile_size
    model.whole_probability(np.zeros((tile, tile, model.channels), np.float32))
    baseline = peak_rss()
    started = time.perf_counter()
    predict_image_file(model, image_path, workdir)  # what `defect-studio predict` does per image
    seconds = time.perf_counter() - started
    with Image.open(image_path) as header:
        width, height = header.size
    grid = model.tiling.grid_for(height, width)
    return {"seconds": seconds, "tiles": 1 if grid is None else len(grid), "baseline_rss": baseline,
            "peak_rss": peak_rss()}


def _measure_cams(image_path: Path, classifier_path: Path) -> dict[str, Any]:
    from defect_studio.imageio import read_image_pixels
    from defect_studio.ml.cam_cache import cam_by_tiles
    from defect_studio.ml.cams.registry import DEFAULT_CAM_METHOD
    from defect_studio.ml.classifier import load_classifier
    from defect_studio.ml.pseudo import PseudoLabelSettings, pseudo_target, split_target
    from defect_studio.ml.tiled_cams import cam_tiling, tiled_cam

    classifier = load_classifier(classifier_path, "cpu")
    tiling = cam_tiling(classifier)
    warm_up = np.zeros((tiling.tile_size, tiling.tile_size, 1), np.float32)
    tiled_cam(classifier, warm_up, DEFAULT_CAM_METHOD)  # "plus the models": one tile's working memory
    baseline = peak_rss()
    started = time.perf_counter()
    image = read_image_pixels(image_path)  # 8-bit, made float tile by tile (as cam_job does)
    height, width = image.shape[:2]
    cam_map = tiled_cam(classifier, image, DEFAULT_CAM_METHOD)
    del image  # the app's proposal reads the cached map, not the image (pseudo_job)
    target, _ = pseudo_target(cam_map, PseudoLabelSettings())  # as pseudo_job labels round 0
    del cam_map
    split_target(target)  # the mask and the ignore band pseudo_job writes
    seconds = time.perf_counter() - started
    grid = tiling.grid_for(height, width) if cam_by_tiles(height, width) else None
    return {"seconds": seconds, "tiles": 1 if grid is None else len(grid), "baseline_rss": baseline,
            "peak_rss": peak_rss()}


def measure_step(step: str, image_path: Path, model_dir: Path | None, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    if step == "import":
        return _measure_import(image_path, workdir)
    if step == "predict":
        assert model_dir is not None
        return _measure_predict(image_path, model_dir, workdir)
    if step == "cams":
        assert model_dir is not None
        return _measure_cams(image_path, model_dir / CLASSIFIER_FILE)
    raise ValueError(step)


def run_step_in_child(step: str, image_path: Path, model_dir: Path, workdir: Path) -> dict[str, Any]:
    """One step in a fresh interpreter: its peak RSS is its own. The brush runs in the GUI benchmark's
    module (Qt lives there; the core never imports it)."""
    if step == "brush":
        command = [sys.executable, "-m", "defect_studio.bench.gui_responsiveness", "--brush-on", str(image_path)]
    else:
        command = [sys.executable, "-m", "defect_studio.bench.scale", "--measure", step, "--image", str(image_path),
                   "--model", str(model_dir), "--workdir", str(workdir)]
    return run_measurement_child(command, STEP_TIMEOUT_S)


def run_measurement_child(command: list[str], timeout_s: float) -> dict[str, Any]:
    """Run a measuring child process (offscreen Qt unless a platform is set) and read the JSON object it
    prints last; {"error": why} when it times out, fails or prints none (an abort: its fatal line, not the
    module list that follows it)."""
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout_s:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        errors = done.stderr.strip().splitlines()
        fatal = [line for line in errors if line.startswith("Fatal Python error")]
        return {"error": ((fatal or errors or [f"exit code {done.returncode}"])[-1])[:300]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------- the table
def _mb(value: float | None) -> float:
    return float("nan") if value is None else value / 1e6


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        megapixels, decoded = result["megapixels"], result["decoded_bytes"]
        row: dict[str, Any] = {"MP": megapixels, "image": f"{result['side']}²", "decoded MB": _mb(decoded)}
        for step in STEPS:
            measured = result.get(step)
            if measured is None:  # not run (--scale-steps)
                continue
            if "error" in measured:
                row[f"{step} s"] = f"failed: {measured['error']}"
                continue
            row[f"{step} s"] = measured.get("seconds", float("nan"))
            row[f"{step} peak MB"] = _mb(measured.get("peak_rss"))
            row[f"{step} ×decoded"] = (measured["peak_rss"] - measured["baseline_rss"]) / decoded
        predict = result.get("predict", {})
        if "seconds" in predict:
            row["predict s/MP"] = predict["seconds"] / megapixels
            row["tiles"] = predict["tiles"]
        cams = result.get("cams", {})
        if "seconds" in cams:
            row["cams s/MP"] = cams["seconds"] / megapixels
            row["CAM tiles"] = cams["tiles"]
        if "seconds" in result.get("import", {}):
            row["import s/MP"] = result["import"]["seconds"] / megapixels
        if "brush" in result:
            row["brush median ms"] = result["brush"].get("brush_median_ms", float("nan"))
            row["brush max ms"] = result["brush"].get("brush_max_ms", float("nan"))
        rows.append(row)
    return rows


COLUMNS = ["MP", "image", "decoded MB", "import s", "import s/MP", "import peak MB", "import ×decoded",
           "predict s", "predict s/MP", "tiles", "predict peak MB", "predict ×decoded",
           "cams s", "cams s/MP", "CAM tiles", "cams peak MB", "cams ×decoded",
           "brush s", "brush peak MB", "brush ×decoded", "brush median ms", "brush max ms"]


def per_mp_spread(rows: list[dict[str, Any]], column: str) -> float:
    """Largest relative distance of seconds per MP from their mean, over the sizes from 4 MP up."""
    values = [row[column] for row in rows if row["MP"] >= 4 and isinstance(row.get(column), float)]
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return max(abs(v - mean) / mean for v in values)


def target_notes(rows: list[dict[str, Any]]) -> list[str]:
    notes = []
    for column in ("import s/MP", "predict s/MP", "cams s/MP"):
        if not any(column in row for row in rows):  # a step not run (--scale-steps)
            continue
        spread = per_mp_spread(rows, column)
        verdict = "–" if math.isnan(spread) else ("met" if spread <= PER_MP_SPREAD_TARGET else "NOT met")
        notes.append(f"{column} from 4 MP up: largest distance from the mean {spread * 100:.0f} % "
                     f"(target ±{PER_MP_SPREAD_TARGET * 100:.0f} %): {verdict}.")
    for step in STEPS:
        ratios = [(row["MP"], row.get(f"{step} ×decoded")) for row in rows]
        ratios = [(mp, ratio) for mp, ratio in ratios if isinstance(ratio, float) and not math.isnan(ratio)]
        if ratios:
            over = [f"{mp:g}" for mp, ratio in ratios if ratio > RSS_TARGET_FACTOR]
            notes.append(f"{step}: peak RSS above the process's baseline / decoded bytes: "
                         + ", ".join(f"{ratio:.2f}× at {mp:g} MP" for mp, ratio in ratios)
                         + f" (target ≤ {RSS_TARGET_FACTOR:.0f}×): "
                         + ("met at every size." if not over else f"NOT met at {', '.join(over)} MP."))
    largest = max(rows, key=lambda row: row["MP"]) if rows else None
    if largest is not None and isinstance(largest.get("brush max ms"), float):
        notes.append(f"brush repaint at {largest['MP']} MP: median {largest['brush median ms']:.1f} ms, max "
                     f"{largest['brush max ms']:.1f} ms (target ≤ {BRUSH_TARGET_MS:.0f} ms): "
                     f"{'met' if largest['brush max ms'] <= BRUSH_TARGET_MS else 'NOT met'} for the max, "
                     f"{'met' if largest['brush median ms'] <= BRUSH_TARGET_MS else 'NOT met'} for the median.")
    return notes


def main(args: argparse.Namespace) -> int:
    from defect_studio.bench.report import write_report

    sizes = [float(s) for s in getattr(args, "sizes", None) or ()] or list(QUICK_SIZES_MP if args.quick else SIZES_MP)
    out = Path(args.out) if getattr(args, "out", None) else Path("bench-results")
    steps = [step for step in STEPS if step in (getattr(args, "scale_steps", None) or STEPS)]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        root = Path(scratch)
        print("exporting the timing segmenter ...", flush=True)
        model_dir = root / "model"
        if "predict" in steps:
            export_timing_model(model_dir)
        if "cams" in steps:
            save_timing_classifier(model_dir / CLASSIFIER_FILE)
        for megapixels in sizes:
            label = f"{megapixels:g}mp"
            image_path = root / label / "images" / f"surface-{label}.png"
            decoded = write_surface(image_path, megapixels, seed=int(getattr(args, "seed", 0) or 0))
            result: dict[str, Any] = {"megapixels": megapixels, "side": image_side(megapixels), "decoded_bytes": decoded}
            for step in steps:
                print(f"{label}: {step} ...", flush=True)
                result[step] = run_step_in_child(step, image_path, model_dir, root / label / f"work-{step}")
                print(f"{label}: {step}: {json.dumps(result[step])}", flush=True)
            results.append(result)
            image_path.unlink()
    rows = table_rows(results)
    step_notes = {
        "predict": "predict: the default segmenter architecture (EfficientNet-Lite0 U-Net) with an untrained decoder, "
        "onnxruntime on the CPU, auto tiling (an image that fits in one 1024² tile whole, larger ones by tiles of at "
        "most 1024 px, 128 px overlap); time includes decoding and writing the mask.",
        "cams": "cams: the default CAM method on the default classifier (untrained head), by tiles of its input size "
        "above 1 MP, then the pseudo-label; time includes decoding; the image is held in its 8-bit pixels and made "
        "float a tile at a time, the stitched map is float16, the image is let go before the pseudo-label (the "
        "app's proposal reads the cached map), and the map before the pseudo-label's target is split into the "
        "mask and the ignore band.",
        "brush": "brush: an 800 × 600 offscreen view fitted to the image, 24 px brush, a spiral stroke near the "
        f"top-left corner, {BRUSH_EVENTS} mouse-move events; 'brush s' is decoding and showing the image.",
    }
    notes = target_notes(rows) + [
        "Each step runs in its own process; 'peak MB' is its peak RSS (interpreter, libraries and model "
        "included), '×decoded' is (peak RSS − RSS before the image was read) / the decoded image's bytes; for "
        "predict the baseline includes the model's working memory for one 1024² tile (a warm-up run).",
    ] + [note for step, note in step_notes.items() if step in steps]
    markdown = write_report(out, "scale", "Scale: time and memory from 1 to 100 megapixels",
                            [("Per image size", rows, [c for c in COLUMNS if any(c in row for row in rows)])], notes,
                            extra={"results": results})
    print(markdown)
    return 0


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", choices=("import", "predict", "cams"), required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(measure_step(args.measure, args.image, args.model, args.workdir), default=float), flush=True)
    return 0


if __name__ == "__main__":
    if "--measure" in sys.argv:
        sys.exit(_child_main(sys.argv[1:]))
    from defect_studio.bench.options import add_bench_arguments

    parser = argparse.ArgumentParser(description=__doc__)
    add_bench_arguments(parser, dataset_required=False)
    sys.exit(main(parser.parse_args()))
