"""`defect-studio bench large-project`: a 100 000-image project (synthetic, tiny images): import speed,
time to open, and event-loop stalls of the window while its gallery scrolls, filters and tags.

1. `--images N` (default 100 000) distinct 32 × 32 gray PNGs are written under `good/`, `defect/` and
   `unsorted/` sub-folders (45 % / 5 % / 50 %; the defect images have a small dark pit or bright scratch),
   so the import takes their tags from the folder names and half the project stays untagged.
2. import: a new project (made before the clock starts) imports the folder with the core's import job,
   the one `defect-studio import` and the window run: images per second.
3. open, core: `Project.open`, then what the window reads on opening (every image record, the tag
   counts, the rounds), closed again; `--opens` times, median.
4. the window (offscreen Qt, in a process of its own: the core never imports Qt): `MainWindow.open_path`
   up to the first processed events, `--opens` times, median (target under 2 s); then a 10 ms timer's
   lateness (`gui_responsiveness.StallMeter`) while the gallery lays itself out after opening, while it
   scrolls from the top to the bottom of the whole list in `--scroll-steps` steps, while the filter
   switches between all / untagged / good / defect, and while single images are tagged with the
   keyboard's action (target: no stall over 50 ms).

Run it with `nice -n 10` on a shared machine; the markdown and JSON go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from defect_studio.bench.scale import run_measurement_child

DEFAULT_IMAGES = 100_000
IMAGE_SIDE = 32
FILES_PER_FOLDER = 1000  # keeps every folder's listing short
TAG_SHARES = (("good", 0.45), ("defect", 0.05), ("unsorted", 0.50))  # "unsorted" is no tag: those stay untagged
OPEN_TARGET_S = 2.0
STALL_TARGET_MS = 50.0  # the same target as gui_responsiveness.STALL_TARGET_MS (not imported: that module is Qt's)
WINDOW_TIMEOUT_S = 3600


# ----------------------------------------------------------------------------------- the images
def folder_of(index: int, count: int) -> str:
    """The tag folder of image `index` of `count`: the first 45 % good, the next 5 % defect, the rest unsorted."""
    start = 0
    for folder, share in TAG_SHARES:
        end = start + int(round(share * count))
        if index < end:
            return folder
        start = end
    return TAG_SHARES[-1][0]


def tiny_surface(index: int, rng: np.random.Generator, defect: bool) -> np.ndarray:
    """A 32 × 32 gray surface with grain; its index is written into the first row's pixels, so no two
    images have the same content (the import counts duplicates once)."""
    import cv2

    rows = np.arange(IMAGE_SIDE, dtype=np.int16)[:, None]
    image = (110 + 10 * np.sin(rows / 5.0 + index % 7) + rng.integers(0, 12, (IMAGE_SIDE, IMAGE_SIDE))).astype(np.uint8)
    image[0, :4] = np.frombuffer(int(index).to_bytes(4, "little"), np.uint8)
    if defect:
        x, y = (int(v) for v in rng.integers(4, IMAGE_SIDE - 4, 2))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), 1, 30, -1)
        else:
            cv2.line(image, (x, y), (min(IMAGE_SIDE - 1, x + 8), min(IMAGE_SIDE - 1, y + 5)), 200, 1)
    return image


def write_tiny_images(root: Path, count: int, seed: int = 0) -> dict[str, int]:
    """`count` distinct tiny PNGs under root/<good|defect|unsorted>/<block>/; returns files per folder."""
    import cv2

    rng = np.random.default_rng(seed)
    written: dict[str, int] = {folder: 0 for folder, _ in TAG_SHARES}
    for index in range(count):
        folder = folder_of(index, count)
        path = root / folder / f"{index // FILES_PER_FOLDER:04d}" / f"img-{index:07d}.png"
        if index % FILES_PER_FOLDER == 0 or written[folder] == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        ok, encoded = cv2.imencode(".png", tiny_surface(index, rng, folder == "defect"), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise OSError(f"cannot encode {path.name}")
        path.write_bytes(encoded.tobytes())
        written[folder] += 1
    return written


# ----------------------------------------------------------------------------------- import and open (core)
def measure_import(project_dir: Path, image_root: Path) -> dict[str, Any]:
    """The core's import job on a new project (made before the clock starts)."""
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.project import Project
    from defect_studio.project.importer import import_job

    with Project.create(project_dir, image_root) as project:
        started = time.perf_counter()
        report = run_job(import_job(project, image_root, None, CancelToken()))
        seconds = time.perf_counter() - started
        counts = project.tag_counts()
    return {"seconds": seconds, "found": report.found, "added": report.added, "duplicates": len(report.duplicates),
            "skipped": len(report.skipped), "images_per_s": report.added / seconds if seconds > 0 else float("nan"),
            "tags": counts}


def measure_core_open(project_dir: Path, opens: int) -> dict[str, list[float]]:
    """Seconds of `Project.open`, and of reading what the window lists on opening (records, counts, rounds)."""
    from defect_studio.project import Project

    open_s, records_s = [], []
    for _ in range(opens):
        started = time.perf_counter()
        project = Project.open(project_dir)
        opened = time.perf_counter()
        try:
            records = project.images()
            project.tag_counts()
            rounds = project.rounds()
            if rounds:
                project.mask_states(rounds[-1].index)
            read = time.perf_counter()
        finally:
            project.close()
        if not records:
            raise RuntimeError(f"{project_dir}: the project lists no image")
        open_s.append(opened - started)
        records_s.append(read - started)
    return {"project_open_s": open_s, "open_and_records_s": records_s}


def measure_window_in_child(project_dir: Path, opens: int, scroll_steps: int) -> dict[str, Any]:
    """The window's measurements (gui_responsiveness.large_project_window) in a fresh process: Qt lives there."""
    command = [sys.executable, "-m", "defect_studio.bench.gui_responsiveness", "--large-project", str(project_dir),
               "--opens", str(opens), "--scroll-steps", str(scroll_steps)]
    return run_measurement_child(command, WINDOW_TIMEOUT_S)


# ----------------------------------------------------------------------------------- the tables
def _seconds_row(name: str, values: list[float], target_s: float | None) -> dict[str, Any]:
    median = statistics.median(values) if values else float("nan")
    row: dict[str, Any] = {"measurement": name, "runs": len(values), "median_s": median,
                           "min_s": min(values) if values else float("nan"),
                           "max_s": max(values) if values else float("nan"),
                           "target_s": f"< {target_s:g}" if target_s is not None else "–"}
    row["verdict"] = "–" if target_s is None or math.isnan(median) else ("met" if median < target_s else "NOT met")
    return row


def open_rows(core: dict[str, list[float]], window: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [_seconds_row("core: Project.open", core["project_open_s"], None),
            _seconds_row("core: Project.open + image records, tag counts, rounds", core["open_and_records_s"], None)]
    if "open_s" in window:
        rows.append(_seconds_row("window: open_path until the gallery is listed", window["open_s"], OPEN_TARGET_S))
    return rows


STALL_CONDITIONS = (
    ("after_open", "after opening: the gallery lays itself out, first thumbnails"),
    ("scroll", "scrolling the gallery top to bottom"),
    ("filter", "switching the filter all / untagged / good / defect"),
    ("tag", "tagging single images (G, next)"),
)


def stall_rows(window: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, label in STALL_CONDITIONS:
        stalls = window.get(key)
        if not stalls:
            continue
        detail = window.get(f"{key}_detail", "")
        rows.append({"condition": label + (f" ({detail})" if detail else ""), **{k: stalls[k] for k in
                     ("ticks", "median_ms", "p99_ms", "max_ms", "over_50ms", "gc_max_ms")},
                     "target_ms": f"≤ {STALL_TARGET_MS:g}",
                     "verdict": "met" if stalls["max_ms"] <= STALL_TARGET_MS else "NOT met"})
    return rows


IMPORT_COLUMNS = ["images", "added", "duplicates", "skipped", "seconds", "images_per_s"]
OPEN_COLUMNS = ["measurement", "runs", "median_s", "min_s", "max_s", "target_s", "verdict"]
STALL_COLUMNS = ["condition", "ticks", "median_ms", "p99_ms", "max_ms", "over_50ms", "gc_max_ms", "target_ms", "verdict"]


def main(args: argparse.Namespace) -> int:
    from defect_studio.bench.report import write_report

    count = int(getattr(args, "images", None) or DEFAULT_IMAGES)
    opens = max(1, int(getattr(args, "opens", None) or 5))
    scroll_steps = max(1, int(getattr(args, "scroll_steps", None) or 2000))
    out = Path(args.out) if getattr(args, "out", None) else Path("bench-results")
    workdir = getattr(args, "workdir", None)
    with tempfile.TemporaryDirectory(prefix="bench-large-project-", dir=workdir) as scratch:
        root = Path(scratch)
        print(f"writing {count} synthetic {IMAGE_SIDE}² images ...", flush=True)
        started = time.perf_counter()
        folders = write_tiny_images(root / "images", count, seed=int(getattr(args, "seed", 0) or 0))
        write_s = time.perf_counter() - started
        print(f"written in {write_s:.1f} s: {folders}; importing ...", flush=True)
        imported = measure_import(root / "project", root / "images")
        print(f"import: {imported['added']} images in {imported['seconds']:.1f} s "
              f"({imported['images_per_s']:.0f} images/s); opening ...", flush=True)
        core = measure_core_open(root / "project", opens)
        print(f"core open: {json.dumps(core)}; the window ...", flush=True)
        window = measure_window_in_child(root / "project", opens, scroll_steps)
        print(f"window: {json.dumps({k: v for k, v in window.items() if not k.endswith('_ms_each')})}", flush=True)

    import_rows = [{"images": count, **{k: imported[k] for k in ("added", "duplicates", "skipped", "seconds", "images_per_s")}}]
    stalls = stall_rows(window)
    notes = [f"{count} distinct {IMAGE_SIDE} × {IMAGE_SIDE} gray PNGs ({folders}), written in {write_s:.0f} s "
             "(not timed); tags from the folder names: " + ", ".join(f"{k} {v}" for k, v in imported["tags"].items()) + "."]
    if "error" in window:
        notes.append(f"The window's measurements failed: {window['error']}")
    else:
        worst = max((row["max_ms"] for row in stalls), default=float("nan"))
        open_median = statistics.median(window["open_s"])
        notes += [
            f"Open: median {open_median:.2f} s over {len(window['open_s'])} opens (target < {OPEN_TARGET_S:g} s): "
            f"{'met' if open_median < OPEN_TARGET_S else 'NOT met'}; the first open took {window['open_s'][0]:.2f} s.",
            f"Stalls: lateness of a 10 ms timer; worst {worst:.1f} ms (target ≤ {STALL_TARGET_MS:g} ms): "
            f"{'met' if worst <= STALL_TARGET_MS else 'NOT met'}.",
            f"Filter switches: median {statistics.median(window['filter_ms_each']):.1f} ms, max "
            f"{max(window['filter_ms_each']):.1f} ms per switch (the call itself); tag + next: median "
            f"{statistics.median(window['tag_ms_each']):.1f} ms, max {max(window['tag_ms_each']):.1f} ms.",
            f"Thumbnails made by the end of the scroll: {window['thumbnails']} (every card painted on the way "
            f"asks for one; one decoder thread makes them); the cards on screen at the bottom had theirs "
            f"{window['thumbnails_on_screen_s']:.1f} s after the scroll stopped.",
            f"Platform plugin: {os.environ.get('QT_QPA_PLATFORM', 'offscreen')}; window {window.get('window_size')}, "
            f"{window.get('columns')} thumbnails a row.",
        ]
    markdown = write_report(out, "large-project", f"Large project: {count} images",
                            [("Import", import_rows, IMPORT_COLUMNS), ("Open", open_rows(core, window), OPEN_COLUMNS),
                             ("Event-loop stalls", stalls, STALL_COLUMNS)],
                            notes, extra={"import": imported, "core_open": core, "window": window, "folders": folders})
    print(markdown)
    return 0 if "error" not in window else 1


if __name__ == "__main__":
    from defect_studio.bench.options import add_bench_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, dataset_required=False)
    sys.exit(main(parser.parse_args()))
