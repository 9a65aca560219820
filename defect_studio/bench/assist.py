"""`defect-studio bench assist`: how many actions a mask takes with the brush, and with the assist tool.

A scripted user redraws each ground-truth defect mask of the train split (Magnetic Tile: `--dataset`)
until its IoU with the truth reaches the target or the action cap:

- **brush**: each action is one stroke on the largest error component (missing: brush, extra:
  eraser) along its medial axis (the largest connected piece of its skeleton, spurs pruned: what one
  continuous stroke can follow), with the brush radius set to the skeleton's median distance to the
  edge: a hand that picks the right brush size each time (size changes are not counted);
- **assist**: a missing component gets an assist stroke: a thin seed stroke (radius <= 2, kept 1 px
  inside the edge) along the same skeleton, grown by `defect_studio.ml.assist.grow_region` and
  merged. The user keeps the result if it fits the truth better than before and better than the stroke
  alone would; otherwise undoes it (one more action) and brushes the component (another). Pieces
  under ASSIST_MIN_AREA pixels or thinner than MIN_ASSIST_HALF_WIDTH (cracks) are brushed, and extra
  pixels erased, as above.

Each user runs with a steady hand (strokes land where aimed) and, for brush and the default assist
method, with an aiming error: each stroke shifted as a whole by a seeded normal offset of HAND_ERROR
× the half-width of the component aimed at, per axis (see `Hand`).

No prior is given to the assist tool: the only honest priors are the app's CAM proposals, which need a
trained classifier; a prior made from the truth would leak it. Ground truth is used to choose where
the user acts and to score, never as the tool's input.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from defect_studio.bench.report import write_report
from defect_studio.dataset_layout import DatasetSample, load_dataset
from defect_studio.imageio import decode_image
from defect_studio.ml.assist import ASSIST_METHODS, DEFAULT_ASSIST_METHOD, grow_region, merge_region

TARGET_IOU = 0.8
ACTION_CAP = 20
QUICK_PER_TYPE = 3
ASSIST_MIN_AREA = 40  # px: smaller missing pieces are touched up with the brush, as a user would
MAX_SEED_RADIUS = 2  # a loose stroke: thin, whatever the defect's width
SEED_INSET = 1  # px the seed stroke keeps inside the defect's edge
HAND_ERROR = 0.25  # the second pair of users' aiming error, × the half-width aimed at (per stroke, per axis)
MIN_ASSIST_HALF_WIDTH = 2.0  # px: a thinner component (a crack) is traced with the brush, as a user would
COLUMNS = ["defect type", "tool", "masks", "median actions", "mean actions", f"reach IoU {TARGET_IOU}",
           "final IoU", "assist actions", "undone", "ms / assist action"]
TIMING_COLUMNS = ["image", "action", "method", "window", "ms"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def largest_error(truth: np.ndarray, mask: np.ndarray) -> tuple[str, np.ndarray] | None:
    """('missing' | 'extra', the largest 8-connected component of that error), or None if none."""
    best: tuple[int, str, np.ndarray] | None = None
    for kind, error in (("missing", truth & ~mask), ("extra", mask & ~truth)):
        if not error.any():
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), connectivity=8)
        index = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[index, cv2.CC_STAT_AREA])
        if best is None or area > best[0]:
            best = (area, kind, labels == index)
    return None if best is None else (best[1], best[2])


def thin(mask: np.ndarray) -> np.ndarray:
    """The one-pixel-wide skeleton of a binary mask (Zhang-Suen thinning, vectorised)."""
    image = np.pad(mask.astype(np.uint8), 1)
    while True:
        changed = False
        for step in (0, 1):
            centre = image[1:-1, 1:-1]
            n, ne, e, se = image[:-2, 1:-1], image[:-2, 2:], image[1:-1, 2:], image[2:, 2:]
            s, sw, w, nw = image[2:, 1:-1], image[2:, :-2], image[1:-1, :-2], image[:-2, :-2]
            ring = [n, ne, e, se, s, sw, w, nw, n]
            neighbours = sum(p.astype(np.int32) for p in ring[:-1])
            transitions = sum(((ring[i] == 0) & (ring[i + 1] == 1)).astype(np.int32) for i in range(8))
            if step == 0:
                sides = ((n * e * s) == 0) & ((e * s * w) == 0)
            else:
                sides = ((n * e * w) == 0) & ((n * s * w) == 0)
            remove = (centre == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & sides
            if remove.any():
                centre[remove] = 0
                changed = True
        if not changed:
            return image[1:-1, 1:-1] > 0


def medial_axis(component: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What one continuous stroke along the component's middle follows: the largest connected piece of
    its skeleton, spurs towards the edge left out, as points (x, y) with their distances to the edge."""
    ys, xs = np.nonzero(component)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = component[y0:y1, x0:x1]
    # Distances as if the image border were background: a defect at the border is brushed along its middle.
    distance = cv2.distanceTransform(np.pad(crop.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    skeleton = thin(crop)
    if skeleton.any():
        # A spur runs out to a bump of the edge; the hand follows the middle, where the defect is wide.
        core = skeleton & (distance >= 0.6 * float(np.median(distance[skeleton])))
        skeleton = core if core.any() else skeleton
        count, labels, stats, _ = cv2.connectedComponentsWithStats(skeleton.astype(np.uint8), connectivity=8)
        if count > 2:
            skeleton = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    else:
        skeleton = distance >= distance.max()
    ys, xs = np.nonzero(skeleton)
    return np.stack([xs + x0, ys + y0], axis=1), distance[ys, xs]


class Hand:
    """Where a stroke lands: on the aimed points, or shifted as a whole by an aiming error (normal per
    axis, seeded) whose spread is `error` × the half-width of what is aimed at: the user zooms until the
    defect is comfortably large, so a fine correction is aimed as well, relatively, as a broad stroke."""

    def __init__(self, error: float = 0.0, seed: int = 0) -> None:
        self.error = error
        self.rng = np.random.default_rng(seed)

    def land(self, points: np.ndarray, half_width: float) -> np.ndarray:
        if self.error <= 0 or len(points) == 0:
            return points
        offset = self.rng.normal(0.0, self.error * max(1.0, half_width), 2)
        return points + np.round(offset).astype(points.dtype)


def paint(mask: np.ndarray, points: np.ndarray, radius: int, value: int) -> np.ndarray:
    """`mask` with discs of `radius` painted at `points` (a stroke through them), as a new bool array."""
    canvas = mask.astype(np.uint8)
    for x, y in points:
        cv2.circle(canvas, (int(x), int(y)), radius, value, -1, cv2.LINE_8)
    return canvas > 0


def brush_action(mask: np.ndarray, component: np.ndarray, value: int, hand: Hand) -> np.ndarray:
    """One brush (value 1) or eraser (value 0) stroke along the component's medial axis."""
    points, distances = medial_axis(component)
    half_width = float(np.median(distances))
    radius = max(0, int(round(half_width - 0.5)))
    return paint(mask, hand.land(points, half_width), radius, value)


@dataclass
class UserRun:
    actions: int = 0
    assist_actions: int = 0
    undone: int = 0
    assist_seconds: list[float] = field(default_factory=list)
    final_iou: float = 0.0
    reached: bool = False


def draw_with_brush(image: np.ndarray, truth: np.ndarray, hand: Hand) -> UserRun:
    mask = np.zeros_like(truth)
    run = UserRun()
    while iou(mask, truth) < TARGET_IOU and run.actions < ACTION_CAP:
        kind, component = largest_error(truth, mask)  # type: ignore[misc]
        mask = brush_action(mask, component, 1 if kind == "missing" else 0, hand)
        run.actions += 1
    run.final_iou, run.reached = iou(mask, truth), iou(mask, truth) >= TARGET_IOU
    return run


def draw_with_assist(image: np.ndarray, truth: np.ndarray, hand: Hand, method: str = DEFAULT_ASSIST_METHOD) -> UserRun:
    mask = np.zeros_like(truth)
    run = UserRun()
    while iou(mask, truth) < TARGET_IOU and run.actions < ACTION_CAP:
        kind, component = largest_error(truth, mask)  # type: ignore[misc]
        points, distances = medial_axis(component)
        if kind == "extra" or np.count_nonzero(component) < ASSIST_MIN_AREA or np.median(distances) < MIN_ASSIST_HALF_WIDTH:
            mask = brush_action(mask, component, 1 if kind == "missing" else 0, hand)
            run.actions += 1
            continue
        radius = int(min(MAX_SEED_RADIUS, max(1, np.floor(np.median(distances)) - SEED_INSET)))
        if (distances > radius).any():  # aimed to stay inside the defect
            points = points[distances > radius]
        points = hand.land(points, float(np.median(distances)))
        started = time.perf_counter()
        grown = grow_region(image, [[(int(x), int(y))] for x, y in points], radius, method=method)
        candidate = mask.astype(np.uint8)
        merge_region(candidate, grown)
        run.assist_seconds.append(time.perf_counter() - started)
        run.actions += 1
        run.assist_actions += 1
        # Kept if the grown region fits the defect better than before and than the stroke alone would.
        if iou(candidate > 0, truth) > max(iou(mask, truth), iou(paint(mask, points, radius, 1), truth)):
            mask = candidate > 0
        elif run.actions + 2 <= ACTION_CAP:
            run.undone += 1  # undo (an action), then brush the component (another)
            mask = brush_action(mask, component, 1, hand)
            run.actions += 2
        else:
            break
    run.final_iou, run.reached = iou(mask, truth), iou(mask, truth) >= TARGET_IOU
    return run


def pick_samples(dataset: Path, quick: bool, seed: int) -> list[DatasetSample]:
    samples = [s for s in load_dataset(dataset, seed=seed) if s.split == "train" and s.label == "defect" and s.mask_path]
    if not quick:
        return samples
    by_type: dict[str, list[DatasetSample]] = defaultdict(list)
    for sample in samples:
        by_type[sample.defect_type or "defect"].append(sample)
    rng = np.random.default_rng(seed)
    picked = []
    for kind in sorted(by_type):
        members = by_type[kind]
        picked += [members[i] for i in sorted(rng.choice(len(members), size=min(QUICK_PER_TYPE, len(members)), replace=False))]
    return picked


def _summary(kind: str, tool: str, runs: list[UserRun]) -> dict[str, Any]:
    actions = np.array([r.actions for r in runs], float)
    seconds = [s for r in runs for s in r.assist_seconds]
    return {
        "defect type": kind, "tool": tool, "masks": len(runs),
        "median actions": float(np.median(actions)) if runs else float("nan"),
        "mean actions": float(actions.mean()) if runs else float("nan"),
        f"reach IoU {TARGET_IOU}": float(np.mean([r.reached for r in runs])) if runs else float("nan"),
        "final IoU": float(np.mean([r.final_iou for r in runs])) if runs else float("nan"),
        "assist actions": int(sum(r.assist_actions for r in runs)),
        "undone": int(sum(r.undone for r in runs)),
        "ms / assist action": 1000.0 * float(np.mean(seconds)) if seconds else "-",
    }


def large_image_timings(seed: int) -> list[dict[str, Any]]:
    """ms per assist action on a 4096 × 4096 gray image (a dark blob on noise): a click and a long stroke."""
    rng = np.random.default_rng(seed)
    size = 4096
    image = rng.normal(130, 12, (size, size)).clip(0, 255).astype(np.uint8)
    cv2.ellipse(image, (2000, 2100), (300, 120), 30, 0, 360, 70, -1)
    cv2.circle(image, (900, 800), 9, 60, -1)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    actions = {"click on a 9 px pit": [[(900, 800)]], "600 px stroke along a blob": [[(1760, 1960), (2000, 2100), (2240, 2240)]]}
    rows = []
    for name, strokes in actions.items():
        for method in ASSIST_METHODS:
            started = time.perf_counter()
            grown = grow_region(image, strokes, 2, method=method)
            elapsed = time.perf_counter() - started
            x0, y0, x1, y1 = grown.box
            rows.append({"image": f"{size} × {size}", "action": name, "method": method,
                         "window": f"{x1 - x0} × {y1 - y0}", "ms": 1000.0 * elapsed})
    return rows


def run(dataset: Path, quick: bool, out: Path, seed: int = 0, report_name: str | None = None,
        log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)) -> dict[str, Any]:
    samples = pick_samples(dataset, quick, seed)
    users: dict[str, Callable[[np.ndarray, np.ndarray, Hand], UserRun]] = {"brush": draw_with_brush}
    for method in ASSIST_METHODS:
        users[f"assist ({method})"] = lambda image, truth, hand, method=method: draw_with_assist(image, truth, hand, method)
    # The same users with an aiming error (the watershed user left out: it loses already with a steady hand).
    tools = [(name, 0.0) for name in users] + [("brush", HAND_ERROR), (f"assist ({DEFAULT_ASSIST_METHOD})", HAND_ERROR)]
    runs: dict[tuple[str, str], list[UserRun]] = defaultdict(list)
    per_mask: list[dict[str, Any]] = []
    started = time.perf_counter()
    for index, sample in enumerate(samples):
        pixels, _ = decode_image(sample.image_path)
        truth = sample.truth(pixels.shape[:2])
        if not truth.any():
            continue
        kind = sample.defect_type or "defect"
        entry: dict[str, Any] = {"stem": sample.stem, "defect_type": kind, "pixels": int(truth.sum())}
        for number, (name, error) in enumerate(tools):
            tool = name if error == 0 else f"{name}, aim ±{error:g}"
            result = users[name](pixels, truth, Hand(error, seed=seed * 100_003 + index * 17 + number))
            runs[(kind, tool)].append(result)
            entry[tool] = {"actions": result.actions, "final_iou": round(result.final_iou, 4), "undone": result.undone}
        per_mask.append(entry)
        if (index + 1) % 20 == 0 or index + 1 == len(samples):
            log(f"  {index + 1}/{len(samples)} masks, {time.perf_counter() - started:.0f} s")
    kinds = sorted({kind for kind, _ in runs})
    rows = []
    tool_names = list(dict.fromkeys(tool for _, tool in runs))
    for tool in tool_names:
        rows.append(_summary("all", tool, [r for kind in kinds for r in runs[(kind, tool)]]))
    for kind in kinds:
        for tool in tool_names:
            rows.append(_summary(kind, tool, runs[(kind, tool)]))
    timings = large_image_timings(seed)
    notes = [
        f"Dataset {dataset.name}: {len(per_mask)} defect masks of the train split" + (f" ({QUICK_PER_TYPE} per type, --quick)" if quick else "")
        + f"; a mask is done at IoU >= {TARGET_IOU} with the truth or after {ACTION_CAP} actions (a capped mask counts its actions as spent).",
        "Brush user: one stroke per action on the largest error component, along its medial axis (the largest connected "
        "piece of its skeleton, spurs pruned), brush radius = the skeleton's median distance to the component's edge "
        "(size changes not counted).",
        f"Assist user: a missing component gets one assist stroke (radius <= {MAX_SEED_RADIUS} px along the same skeleton, "
        f"{SEED_INSET} px inside the edge, no prior); kept if it fits the truth better than before and than the stroke alone, "
        f"else undone (counted) and brushed (counted). Pieces under {ASSIST_MIN_AREA} px or thinner than "
        f"{2 * MIN_ASSIST_HALF_WIDTH:g} px: brush; extra pixels: eraser. 'assist actions' counts the assist strokes, "
        "'undone' the ones that did not help.",
        f"'aim ±{HAND_ERROR:g}': every stroke lands shifted as a whole by a seeded normal offset whose standard deviation "
        f"per axis is {HAND_ERROR:g} × the half-width of the component aimed at (the user zooms to the defect); the other "
        "rows aim perfectly.",
        "No prior: the app gives the round's proposal as a hint, but the proposals need a trained classifier, and a prior "
        "made from the truth would leak it.",
        "ms / assist action: grow_region alone (window, conversion, segmentation), on this shared 2-core CPU.",
        f"Default method: {DEFAULT_ASSIST_METHOD}.",
    ]
    name = report_name or f"assist-{dataset.name}" + ("-quick" if quick else "")
    markdown = write_report(out, name, f"Assisted masks on {dataset.name}: actions per mask, brush vs assist",
                            [("Actions per mask", rows, COLUMNS), ("ms per assist action on a large image", timings, TIMING_COLUMNS)],
                            notes, extra={"per_mask": per_mask, "target_iou": TARGET_IOU, "action_cap": ACTION_CAP,
                                          "quick": quick, "seed": seed})
    print(markdown)
    return {"rows": rows, "timings": timings, "per_mask": per_mask}


def main(args: argparse.Namespace) -> int:
    dataset = Path(args.dataset)
    if not (dataset / "masks").is_dir():
        print(f"bench assist: {dataset} has no masks/ folder with ground truth to redraw; nothing to measure.", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("bench-results")
    run(dataset, bool(args.quick), out, int(args.seed))
    return 0


if __name__ == "__main__":
    from defect_studio.bench.options import add_bench_arguments

    parser = argparse.ArgumentParser(description=__doc__)
    add_bench_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
