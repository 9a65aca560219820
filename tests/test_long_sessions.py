"""Long sessions: a day of work must not leak memory, file descriptors or threads; and no model or
data file is ever unpickled (checkpoints load with weights_only=True only)."""

from __future__ import annotations

import gc
import os
import re
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from defect_studio.project import Project
from tests import crash_harness as harness

PACKAGE = Path(__file__).resolve().parents[1] / "defect_studio"
needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@needs_proc
def test_a_hundred_open_close_cycles_with_work_leak_nothing(tmp_path: Path):
    project_dir = harness.make_base_project(tmp_path / "base" / "project")

    def session(cycle: int) -> None:
        with Project.open(project_dir) as project:
            if not project.rounds():
                project.create_round({})
            image = 1 + cycle % harness.IMAGE_COUNT
            project.set_tags([image], ("good", "defect")[cycle % 2])
            project.save_edited_mask(image, 0, harness.mask_for(cycle))
            project.load_mask(project.mask_record(image, 0))
            project.summary()

    for cycle in range(10):  # warm up: first-use caches, sqlite's page cache, numpy/cv2 pools
        session(cycle)
    gc.collect()
    fds, threads = open_fds(), threading.active_count()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for cycle in range(10, 110):
        session(cycle)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 256 * 1024, f"{growth} bytes of Python objects kept over 100 cycles"
    assert open_fds() == fds, "file descriptors leaked by open/close"
    assert threading.active_count() == threads
    with Project.open(project_dir) as project:  # and the work of all 110 cycles is there
        assert len(project.mask_history(1, 0)) == 22


@needs_proc
def test_a_thousand_cam_computations_in_a_project_session_leak_nothing(tmp_path: Path):
    """The CAM engineer's test checks hooks and RSS of bare calls; this one runs them the way a
    session does, with the project open and maps going through the on-disk cache, and watches the
    file descriptors and threads too."""
    from defect_studio.ml import cams
    from defect_studio.ml.cam_cache import CamCache
    from defect_studio.ml.preprocess import Preprocessing
    from tests.cam_fixtures import StandInClassifier, TinyStandIn

    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: extra threads only contend on a busy machine
    try:
        image = np.random.default_rng(0).random((30, 40, 1), dtype=np.float32)
        classifier = StandInClassifier(TinyStandIn(), Preprocessing(input_size=32)).with_good_prior([image])
        _thousand_cams(cams, CamCache, classifier.with_affinity([image], [image]), tmp_path)
    finally:
        torch.set_num_threads(threads_before)


def _thousand_cams(cams, CamCache, classifier, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = np.random.default_rng(0).random((30, 40, 1), dtype=np.float32)
    methods = cams.CAM_METHODS
    project_dir = harness.make_base_project(tmp_path / "base" / "project")
    with Project.open(project_dir) as project:
        cache = CamCache(project.cache_dir)

        def compute(call: int) -> None:
            method = methods[call % len(methods)]
            cam_map = cams.compute_cam(classifier, image, method)
            assert cam_map.shape == (30, 40) and np.isfinite(cam_map).all()
            if call % 20 == 0:  # a map through the cache now and then, like the gallery does
                cache.put(f"{call:064d}", "0" * 64, method, None, cam_map)
                assert cache.get(f"{call:064d}", "0" * 64, method, None) is not None

        for call in range(50):
            compute(call)
        gc.collect()
        fds, threads, memory = open_fds(), threading.active_count(), rss_mb()
        for call in range(50, 1050):
            compute(call)
        gc.collect()
        assert open_fds() == fds
        assert threading.active_count() == threads
        assert rss_mb() - memory < 40.0, f"resident memory grew by {rss_mb() - memory:.1f} MiB over 1000 CAMs"


# ----------------------------------------------------------------- no unpickling, anywhere
def _package_sources() -> list[tuple[Path, str]]:
    return [(path, path.read_text(encoding="utf-8")) for path in sorted(PACKAGE.rglob("*.py"))]


def _calls(source: str, function: str) -> list[str]:
    """The full text of each call `function(...)` in source, parentheses balanced."""
    calls = []
    for match in re.finditer(re.escape(function) + r"\s*\(", source):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            if depth == 0:
                break
        calls.append(source[match.start() : end + 1])
    return calls


def test_every_torch_load_is_weights_only():
    offenders = []
    loads = 0
    for path, source in _package_sources():
        for call in _calls(source, "torch.load") + _calls(source, "torch.jit.load"):
            loads += 1
            if call.startswith("torch.load") and not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}: {call[:120]}")
        if re.search(r"from\s+torch\s+import\s+load\b", source):
            offenders.append(f"{path}: imports torch.load under another name")
    assert loads > 0  # the scan sees the loaders (else it proves nothing)
    assert not offenders, "torch.load without weights_only=True:\n" + "\n".join(offenders)


def test_nothing_unpickles_data():
    patterns = {
        r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b": "imports a pickle module",
        r"allow_pickle\s*=\s*True": "numpy loading with pickles allowed",
        r"\bpd\.read_pickle\b|\.read_pickle\(": "pandas pickle",
        r"weights_only\s*=\s*False": "torch.load that unpickles code",
        r"\byaml\.load\(|yaml\.unsafe_load": "yaml that constructs objects",
        r"(?<![.\w])(eval|exec)\(": "eval/exec of text",
    }
    offenders = []
    for path, source in _package_sources():
        for pattern, why in patterns.items():
            for match in re.finditer(pattern, source, flags=re.MULTILINE):
                line_start = source.rfind("\n", 0, match.start()) + 1
                if "#" in source[line_start : match.start()]:
                    continue  # a comment that names it
                line = source.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {why}")
    assert not offenders, "\n".join(offenders)


def test_the_scans_catch_what_they_look_for():
    assert _calls("x = torch.load(path, map_location=f(a, b))\n", "torch.load") == [
        "torch.load(path, map_location=f(a, b))"]
    assert not re.search(r"weights_only\s*=\s*True", _calls("torch.load(p, weights_only=False)", "torch.load")[0])
