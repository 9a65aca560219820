"""Property-based tests: random sequences of store operations against the model of
tests/crash_harness.py (the store's specification), and mask / atomic-write round trips."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from defect_studio.atomic import atomic_write_bytes, configure_faults
from defect_studio.errors import DefectStudioError, ProjectError
from defect_studio.imageio import encode_mask_png, read_mask, write_mask
from defect_studio.project import Project
from tests import crash_harness as harness

EXAMPLES = 200 if harness.SOAK else 25

images = st.integers(1, harness.IMAGE_COUNT)
rounds = st.integers(0, 2)
seeds = st.integers(0, 10_000)
operations = st.one_of(
    st.tuples(st.just("tag"), st.lists(images, max_size=3, unique=True).map(tuple),
              st.sampled_from(["good", "defect", "untagged"])),
    st.just(("round",)),
    st.tuples(st.just("propose"), images, rounds, seeds),
    st.tuples(st.just("edit"), images, rounds, seeds),
    st.tuples(st.just("review"), images, rounds, st.sampled_from(["accepted", "rejected", "proposed"])),
    st.tuples(st.just("revert"), images, rounds),
    st.tuples(st.just("setting"), st.just("threshold"), st.floats(0, 1) | st.integers(-5, 5) | st.text(max_size=5)),
)

_BASE: Path | None = None


def _base_project() -> Path:
    """One empty project of harness images, copied for each example (creating one costs fsyncs)."""
    global _BASE
    if _BASE is None:
        shm = Path("/dev/shm")
        fast = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 256 * 2**20
        root = Path(tempfile.mkdtemp(prefix="ds-props-", dir=shm if fast else None))
        atexit.register(shutil.rmtree, root, True)
        _BASE = harness.make_base_project(root / "base" / "project")
    return _BASE


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(operations, max_size=30))
def test_random_operation_sequences_match_the_model_and_survive_reopening(ops):
    project_dir = Path(tempfile.mkdtemp(dir=_base_project().parent.parent)) / "project"
    shutil.copytree(_base_project(), project_dir)
    model = harness.Model()
    try:
        with Project.open(project_dir) as project:
            for op in ops:
                if model.is_valid(op):
                    harness.apply_to_project(project, op)
                else:  # the store refuses what the model says is impossible, with a message
                    try:
                        harness.apply_to_project(project, op)
                    except ProjectError:
                        pass
                    else:
                        raise AssertionError(f"{op} should have been refused")
                model.apply(op)
            assert harness.matches(harness.observe(project), model)
        with Project.open(project_dir) as project:
            assert harness.matches(harness.observe(project), model)
            assert project._query("PRAGMA integrity_check")[0][0] == "ok"
        assert not harness.leftovers(project_dir)
    finally:
        shutil.rmtree(project_dir.parent)


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(mask=arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_mask_png_round_trip_is_exact_and_deterministic(mask):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "Maske ü.png"
        data = write_mask(path, mask)
        assert data == encode_mask_png(mask.copy()) == path.read_bytes()  # same mask, same bytes
        assert np.array_equal(read_mask(path, mask.shape), mask)


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(values=arrays(np.uint8, st.tuples(st.integers(1, 16), st.integers(1, 16))))
def test_any_nonzero_pixel_is_defect(values):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.png"
        write_mask(path, values)
        assert np.array_equal(read_mask(path), values > 0)


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(old=st.binary(max_size=2000), new=st.binary(max_size=2000), fail=st.booleans())
def test_an_atomic_write_leaves_the_old_or_the_new_content_never_a_mix(old, new, fail):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file.bin"
        atomic_write_bytes(path, old)
        configure_faults("enospc:1" if fail else None)
        try:
            atomic_write_bytes(path, new)
        except DefectStudioError:
            assert fail
        finally:
            configure_faults(None)
        assert path.read_bytes() == (old if fail else new)
        assert [p.name for p in Path(folder).iterdir()] == ["file.bin"]
