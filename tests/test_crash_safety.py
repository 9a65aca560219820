"""Crash safety: kill a working session at every point where it writes, then reopen the project.

A kill point is one call of `defect_studio.atomic.fault_point` (before and after every file
replace and every database commit). The session is killed there with SIGKILL; the reopened
project must hold every reported save byte-identical, show no half-written file, and take over
the dead session's lock with a message. DEFECT_STUDIO_SOAK=1 runs more (every resume, more random
external kills).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from defect_studio.atomic import FAULT_ENV, configure_faults
from defect_studio.errors import DefectStudioError, ModelError
from defect_studio.predict import load_exported
from defect_studio.project import Project
from defect_studio.project.schema import MIGRATIONS
from tests import crash_harness as harness
from tests.image_files import gradient, write_cv2

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fast_dir(tmp_path: Path):
    """A work folder on tmpfs where there is one: a kill test needs no fsync to reach the disk (the
    kernel keeps what a killed process wrote), and fsync is what makes each kill point slow."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 256 * 2**20:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="ds-crash-", dir=shm))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


def test_every_kill_point_of_an_editing_session_keeps_the_saved_work(fast_dir: Path):
    base = harness.make_base_project(fast_dir / "base" / "project")
    points = harness.count_fault_points(base, fast_dir)
    assert len(points) >= 100, points  # the session passes every kind of write
    outcomes = [
        harness.kill_and_verify(base, fast_dir, point, resume=harness.SOAK or point % 3 == 0)
        for point in range(1, len(points) + 1)
    ]
    assert all(outcome.killed for outcome in outcomes)
    lost_or_ahead = Counter(outcome.state_index - outcome.saved for outcome in outcomes)
    # both sides of a commit were hit: killed before it (the op is not there) and after it (it is)
    assert lost_or_ahead[0] > 0 and lost_or_ahead[1] > 0
    assert sum(outcome.recovered_files for outcome in outcomes) > 0  # committed saves finished on open
    kinds = Counter(point.split(" ")[0] for point in points)
    print(f"\n{len(points)} kill points: {dict(kinds)}; reopened state = reported saves + {dict(lost_or_ahead)}")


def test_the_harness_catches_a_store_that_replaces_a_saved_mask_before_committing(fast_dir: Path):
    """The harness must be able to fail: a naive save (file first, row second) loses a saved edit."""
    base = harness.make_base_project(fast_dir / "base" / "project")
    points = harness.count_fault_points(base, fast_dir)
    second_edit = harness.SESSION.index(("edit", 1, 0, 22))
    for point in range(1, len(points) + 1):  # every point until the loss is seen
        try:
            harness.kill_and_verify(base, fast_dir, point, ops=harness.SESSION[: second_edit + 1], resume=False,
                                    naive=True)
        except AssertionError as failure:
            assert "matches neither" in str(failure) or "does not match its recorded hash" in str(failure)
            return
    pytest.fail("the harness did not notice a saved edit overwritten before its commit")


def test_external_sigkill_after_random_delays(fast_dir: Path):
    """A real interpreter playing the session, killed from outside at random moments."""
    base = harness.make_base_project(fast_dir / "base" / "project")
    rng = random.Random(7)
    runs = 30 if harness.SOAK else 4
    outcomes = []
    for attempt in range(runs):
        project_dir = fast_dir / f"ext-{attempt}" / "project"
        shutil.copytree(base, project_dir)
        log = project_dir.parent / "saved.log"
        process = subprocess.Popen([sys.executable, "-m", "tests.crash_harness", "session", str(project_dir), str(log)],
                                   cwd=REPO, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        wanted = rng.randint(1, len(harness.SESSION) - 1)  # kill once this many saves were reported
        while harness.saved_count(log) < wanted and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.random() * 0.01)  # somewhere inside the next operation
        process.send_signal(signal.SIGKILL)
        process.wait()
        stderr = process.stderr.read().decode() if process.stderr else ""
        process.stderr.close()  # type: ignore[union-attr]
        assert "Traceback" not in stderr, stderr
        killed_while_open = process.returncode == -9 and not harness.closed_cleanly(log)
        outcomes.append(harness.verify_reopened(project_dir, harness.saved_count(log), killed=killed_while_open,
                                                label=f"external kill {attempt}"))
    assert sum(1 for outcome in outcomes if outcome.killed) >= runs // 2


def test_a_full_disk_at_every_write_fails_cleanly_and_loses_nothing(fast_dir: Path):
    """ENOSPC at the N-th disk write: the operation fails with a message, the ones before stay."""
    base = harness.make_base_project(fast_dir / "base" / "project")
    points = harness.count_fault_points(base, fast_dir)
    disk_writes = sum(1 for point in points if point.split(" ")[0] in ("write-temp", "commit"))
    failed_ops = Counter()
    for write in range(1, disk_writes + 1):
        project_dir = fast_dir / f"full-{write}" / "project"
        shutil.copytree(base, project_dir)
        configure_faults(f"enospc:{write}")
        failed_at = None
        try:
            with Project.open(project_dir) as project:
                for index, op in enumerate(harness.SESSION):
                    try:
                        harness.apply_to_project(project, op)
                    except DefectStudioError as error:
                        assert "No space left on device" in str(error)
                        failed_at = index
                        break
        finally:
            configure_faults(None)
        assert failed_at is not None, f"disk write {write} did not fail"
        failed_ops[harness.SESSION[failed_at][0]] += 1
        with Project.open(project_dir) as project:
            assert not harness.leftovers(project_dir)
            assert harness.matches(harness.observe(project), harness.model_after(harness.SESSION[:failed_at]))
        shutil.rmtree(project_dir.parent)
    assert disk_writes >= 40 and set(failed_ops) >= {"tag", "propose", "edit", "review", "checkpoint"}


# ----------------------------------------------------------------- the real CLI in a subprocess
def _image_folder(root: Path, count: int = 12) -> Path:
    for index in range(count):
        image = gradient(channels=1)
        image.flat[index] = 3  # distinct content
        write_cv2(root / ("good" if index % 3 else "defect") / f"i{index:02d}.png", image)
    return root


def _cli(*args: str, fault: str | None = None) -> harness.CliResult:
    """The CLI in a child process that a fault can kill (forked: no interpreter start per run)."""
    return harness.run_cli(list(args), fault or "")


def _real_cli(*args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a fresh `python -m defect_studio` process."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "defect_studio", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def _content(project_dir: Path) -> list[tuple[str, str, str]]:
    with Project.open(project_dir) as project:
        return sorted((i.rel_path, i.sha256, i.tag) for i in project.images())


def test_import_killed_at_every_point_then_rerun_gives_the_complete_project(fast_dir: Path):
    images = _image_folder(fast_dir / "images")
    reference = fast_dir / "reference"
    assert _cli("import", str(reference), "--images", str(images)).returncode == 0
    expected = _content(reference)
    points_log = fast_dir / "points.log"
    assert _cli("import", str(fast_dir / "counted"), "--images", str(images), fault=f"count:{points_log}").returncode == 0
    points = points_log.read_text().splitlines()
    assert len(points) >= 6, points  # migrations, the creation, the image batch
    for point in range(1, len(points) + 1):
        project_dir = fast_dir / f"import-{point}"
        killed = _cli("import", str(project_dir), "--images", str(images), fault=f"kill:{point}")
        assert killed.returncode == -9 and "Traceback" not in killed.stderr
        again = _cli("import", str(project_dir), "--images", str(images))
        assert again.returncode == 0, (points[point - 1], again.stderr)
        assert "Traceback" not in again.stderr
        assert "took over the lock" in again.stderr  # the dead import's lock, recognised as stale
        assert _content(project_dir) == expected, points[point - 1]
        assert not harness.leftovers(project_dir)


def test_tag_killed_at_every_point_keeps_a_reported_tag(fast_dir: Path):
    images = _image_folder(fast_dir / "images", count=4)
    project_dir = fast_dir / "project"
    assert _cli("import", str(project_dir), "--images", str(images)).returncode == 0
    points_log = fast_dir / "points.log"
    _cli("tag", str(project_dir), "defect", "i01", fault=f"count:{points_log}")
    _cli("tag", str(project_dir), "good", "i01")
    points = len(points_log.read_text().splitlines())
    assert points == 2  # before and after the one commit
    for point in range(1, points + 1):
        result = _cli("tag", str(project_dir), "defect", "i01", "i02", fault=f"kill:{point}")
        assert result.returncode == -9
        reported = "tagged defect" in result.stdout
        with Project.open(project_dir) as project:
            tags = {i.stem: i.tag for i in project.images()}
            assert project.took_over_stale_lock
            if reported:
                assert tags["i01"] == tags["i02"] == "defect"
            assert tags["i01"] == tags["i02"]  # one transaction: both or neither
            project.set_tags([project.find_images(["i01"])[0].id, project.find_images(["i02"])[0].id], "good")


def test_a_real_interpreter_killed_mid_import_then_status_names_the_stale_lock(fast_dir: Path):
    images = _image_folder(fast_dir / "images", count=3)
    project_dir = fast_dir / "project"
    # Each schema migration passes two fault points, the creation's commit two more; the next two are the
    # images' commit: kill at its "committed" point.
    after_images_commit = 2 * len(MIGRATIONS) + 4
    killed = _real_cli("import", str(project_dir), "--images", str(images), fault=f"kill:{after_images_commit}")
    assert killed.returncode == -9
    lock = json.loads((project_dir / "project.lock").read_text())
    status = _real_cli("status", str(project_dir))
    assert status.returncode == 0, status.stderr
    assert f"took over the lock of process {lock['pid']}" in status.stderr
    assert "Traceback" not in status.stderr and "3 images" in status.stdout


def test_fault_injection_is_off_unless_asked_for():
    import defect_studio.atomic as atomic

    assert os.environ.get(FAULT_ENV) is None and atomic._fault_plan is None
    with pytest.raises(ValueError, match="expected count:FILE"):
        configure_faults("explode:3")
    configure_faults(None)
    assert atomic._fault_plan is None


# ----------------------------------------------------------------- training checkpoint writes
def test_training_killed_while_saving_its_checkpoint_keeps_the_previous_model(fast_dir: Path):
    import zipfile

    from defect_studio.demo import make_demo_dataset
    from defect_studio.ml.classifier import load_classifier

    dataset = make_demo_dataset(fast_dir / "dataset", count=16, size=48, seed=0)
    project_dir = fast_dir / "project"
    assert _cli("import", str(project_dir), "--images", str(dataset / "images"), "--labels",
                str(dataset / "labels.csv")).returncode == 0
    train = ["train", str(project_dir), "--arch", "compact", "--epochs", "1", "--input-size", "32", "--width", "4", "--device", "cpu"]
    first = _cli(*train)
    assert first.returncode == 0 and "Classifier saved to" in first.stdout, first.stderr
    with Project.open(project_dir) as project:
        (saved_run,) = project.training_runs("classifier")
    saved_bytes = saved_run.checkpoint_path.read_bytes()
    # A second run passes: write-temp, replaced (the checkpoint), commit, committed (its run row).
    points = range(1, 5)
    for point in points:
        killed = _cli(*train, fault=f"kill:{point}")
        assert killed.returncode == -9, killed.stderr
        with Project.open(project_dir) as project:
            assert project.took_over_stale_lock
            runs = project.training_runs("classifier")
            assert runs[0] == saved_run and saved_run.checkpoint_path.read_bytes() == saved_bytes
            for run in runs:
                assert harness.sha256(run.checkpoint_path.read_bytes()) == run.checkpoint_sha256
        assert not harness.leftovers(project_dir)
        for checkpoint in (project_dir / "models").glob("*.pt"):  # recorded or orphaned: never half-written
            with zipfile.ZipFile(checkpoint) as archive:  # torch.save writes a zip archive
                assert archive.testzip() is None, checkpoint
            load_classifier(checkpoint)
    again = _cli(*train)  # and training works again afterwards
    assert again.returncode == 0, again.stderr


# ----------------------------------------------------------------- CAM computation and pseudo-labels
def _round_masks(project_dir: Path, round_index: int) -> dict[str, tuple[str, str, bool]]:
    """{stem: (state, sha256, flagged)} of a round, checking each file is whole and as recorded."""
    with Project.open(project_dir) as project:
        masks = {}
        for record in project.mask_records(round_index):
            image = project.image(record.image_id)
            assert harness.sha256(record.path.read_bytes()) == record.sha256, record.path
            project.load_mask(record)
            masks[image.stem] = (record.state, record.sha256, record.flagged)
        return masks


def _classified_demo_project(fast_dir: Path, seed: int) -> Path:
    """A 12-image demo project with a tiny trained classifier, at fast_dir/base/project: every copy
    made two levels below fast_dir keeps the image paths valid."""
    from defect_studio.demo import make_demo_dataset
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.ml.device import torch_threads
    from defect_studio.ml.models import ClassifierConfig
    from defect_studio.project.importer import import_job

    dataset = make_demo_dataset(fast_dir / "dataset", count=12, size=48, seed=seed)
    base = fast_dir / "base" / "project"
    with torch_threads(1), Project.create(base, dataset / "images") as project:
        run_job(import_job(project, dataset / "images", dataset / "labels.csv", CancelToken()))
        # output stride 8: the default CAM's stride-16 stage of a one-epoch classifier at 32 px is a 2×2 map whose
        # guided gradients are often all zero, so no proposal would mark anything and refine would have nothing to do
        config = ClassifierConfig(arch="compact", epochs=1, min_epochs=1, input_size=32, width=4, batch_size=8, seed=0,
                                  output_stride=8)
        run_job(train_project_classifier_job(project, config, CancelToken(), device="cpu"))
    return base


def test_pseudo_labelling_killed_anywhere_then_rerun_gives_the_uninterrupted_masks(fast_dir: Path):
    """Kill `defect-studio pseudo` while it computes and caches CAMs and saves proposals; after a
    rerun of the round the masks are byte-identical to those of an uninterrupted run."""
    base = _classified_demo_project(fast_dir, seed=2)
    reference = fast_dir / "reference" / "project"
    shutil.copytree(base, reference)
    assert _cli("pseudo", str(reference)).returncode == 0
    expected = _round_masks(reference, 0)
    assert expected and any(state == "proposed" for state, _, _ in expected.values())
    counted = fast_dir / "counted" / "project"
    shutil.copytree(base, counted)
    points_log = fast_dir / "pseudo-points.log"
    assert _cli("pseudo", str(counted), fault=f"count:{points_log}").returncode == 0
    points = points_log.read_text().splitlines()
    assert sum(1 for p in points if p.startswith("write-temp") and ".png" in p) > len(expected)  # CAM cache + masks
    tried = range(1, len(points) + 1, 1 if harness.SOAK else max(1, len(points) // 12))
    for point in tried:
        project_dir = fast_dir / f"pseudo-{point}" / "project"
        shutil.copytree(base, project_dir)
        killed = _cli("pseudo", str(project_dir), fault=f"kill:{point}")
        assert killed.returncode == -9, (points[point - 1], killed.stderr[-2000:])
        with Project.open(project_dir) as project:
            assert project.took_over_stale_lock
            has_round = bool(project.rounds())
        assert not harness.leftovers(project_dir)
        if has_round:
            _round_masks(project_dir, 0)  # whatever was saved is whole and as recorded
        rerun = _cli("pseudo", str(project_dir), *(["--round", "0"] if has_round else []))
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert _round_masks(project_dir, 0) == expected, f"kill point {point} ({points[point - 1]})"
        shutil.rmtree(project_dir.parent)
    print(f"\npseudo: {len(points)} kill points, {len(tried)} tried")


def test_refine_killed_anywhere_keeps_whole_rounds_and_a_rerun_finishes_them(fast_dir: Path):
    """Kill `defect-studio refine` while it proposes, trains and records rounds: every mask and model
    on disk is whole and as recorded, and running refine again completes the interrupted round."""
    base = _classified_demo_project(fast_dir, seed=3)
    refine = ["refine", "--rounds", "2", "--epochs", "1", "--steps-per-epoch", "1", "--device", "cpu",
              "--stop-change", "0", "--mode", "percentile"]
    counted = fast_dir / "counted" / "project"
    shutil.copytree(base, counted)
    points_log = fast_dir / "refine-points.log"
    first = _cli(refine[0], str(counted), *refine[1:], fault=f"count:{points_log}")
    assert first.returncode == 0, first.stderr[-2000:]
    points = points_log.read_text().splitlines()
    tried = range(1, len(points) + 1, 1 if harness.SOAK else max(1, len(points) // 10))
    for point in tried:
        project_dir = fast_dir / f"refine-{point}" / "project"
        shutil.copytree(base, project_dir)
        killed = _cli(refine[0], str(project_dir), *refine[1:], fault=f"kill:{point}")
        assert killed.returncode == -9, (points[point - 1], killed.stderr[-2000:])
        with Project.open(project_dir) as project:
            assert project.took_over_stale_lock
            rounds = [r.index for r in project.rounds()]
            for run in project.training_runs("segmenter"):
                assert harness.sha256(run.checkpoint_path.read_bytes()) == run.checkpoint_sha256
        assert not harness.leftovers(project_dir)
        for index in rounds:
            _round_masks(project_dir, index)  # whatever was saved is whole and as recorded
        rerun = _cli(refine[0], str(project_dir), *refine[1:])
        assert rerun.returncode == 0, (points[point - 1], rerun.stderr[-2000:])
        with Project.open(project_dir) as project:
            tagged = {i.id for i in project.images() if i.tag in ("good", "defect")}
            trained = {r.round_index for r in project.training_runs("segmenter")}
            for record in project.rounds():
                # every round was completed: all tagged images have a mask, and a segmenter trained on them
                assert {m.image_id for m in project.mask_records(round_index=record.index)} == tagged, (
                    f"kill point {point} ({points[point - 1]}): round {record.index} is missing masks")
                assert record.index in trained and record.status == "trained"
        shutil.rmtree(project_dir.parent)
    print(f"\nrefine: {len(points)} kill points, {len(tried)} tried")


def _demo_kill_points(fast_dir: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    reference = fast_dir / "reference"
    assert _cli("demo", "--out", str(reference), "--no-gui", "--count", "12").returncode == 0
    points_log = fast_dir / "demo-points.log"
    assert _cli("demo", "--out", str(fast_dir / "counted"), "--no-gui", "--count", "12",
                fault=f"count:{points_log}").returncode == 0
    return points_log.read_text().splitlines(), _content(reference / "project")


def _kill_demo_and_rerun(fast_dir: Path, point: int, expected, label: str) -> None:  # type: ignore[no-untyped-def]
    out = fast_dir / f"demo-{point}"
    assert _cli("demo", "--out", str(out), "--no-gui", "--count", "12", fault=f"kill:{point}").returncode == -9
    again = _cli("demo", "--out", str(out), "--no-gui", "--count", "12")
    assert again.returncode == 0, (label, again.stderr[-2000:])
    assert _content(out / "project") == expected, label
    assert not harness.leftovers(out)


def test_demo_project_creation_killed_anywhere_is_completed_by_running_it_again(fast_dir: Path):
    points, expected = _demo_kill_points(fast_dir)
    dataset_done = points.index("replaced metadata.csv") + 1  # after it: creating and importing the project
    tried = range(dataset_done + 1, len(points) + 1)
    for point in tried:
        _kill_demo_and_rerun(fast_dir, point, expected, points[point - 1])
    print(f"\ndemo: {len(points)} kill points, {len(tried)} in the project phase tried")


def test_demo_dataset_killed_midway_is_completed_by_running_it_again(fast_dir: Path):
    points, expected = _demo_kill_points(fast_dir)
    _kill_demo_and_rerun(fast_dir, 1, expected, points[0])


# ----------------------------------------------------------------- export
def test_a_crash_while_re_exporting_never_leaves_a_model_with_another_models_card(tmp_path: Path, monkeypatch):
    from defect_studio.jobs import CancelToken, run_job
    from defect_studio.ml import export as export_module
    from defect_studio.ml.segmenter import (
        SegmentationSample, SegmenterConfig, load_segmenter, make_target, train_segmenter_job,
    )

    rng = np.random.default_rng(0)
    samples = []
    for index in range(4):
        mask = np.zeros((48, 48), bool)
        mask[10:20, 10:30] = True
        samples.append(SegmentationSample(f"s{index}", rng.random((48, 48, 3), dtype=np.float32), make_target(mask)))
    models = []
    for seed in (1, 2):
        checkpoint = tmp_path / f"segmenter-{seed}.pt"
        config = SegmenterConfig(architecture="unet", channels=(8, 16, 32), crop_size=48, batch_size=4, epochs=1, steps_per_epoch=2, seed=seed)
        run_job(train_segmenter_job(samples, config, checkpoint, CancelToken()))
        models.append(load_segmenter(checkpoint, device="cpu"))
    out = tmp_path / "export"
    export_module.export_segmenter(models[0], out, [samples[0].image])
    old_onnx = (out / "model.onnx").read_bytes()
    real_replace, renames = os.replace, []

    def crash_on_the_second_rename(source, target):  # type: ignore[no-untyped-def]
        if Path(target).parent == out:  # the renames into the export folder, not the staging writes
            renames.append(target)
            if len(renames) == 2:
                raise SystemExit("killed")  # the process dies here; nothing after runs
        real_replace(source, target)

    monkeypatch.setattr(export_module.os, "replace", crash_on_the_second_rename)
    with pytest.raises(SystemExit):
        export_module.export_segmenter(models[1], out, [samples[0].image])
    monkeypatch.undo()
    assert len(renames) == 2  # the crash did fall between the renames
    card_path = out / "model-card.json"
    if (out / "model.onnx").read_bytes() != old_onnx and card_path.is_file():  # a new model: its own card, or none
        assert json.loads(card_path.read_text())["checkpoint_sha256"] == models[1].checkpoint_sha256
    assert not card_path.is_file()  # the old card went first: the folder reads as an incomplete export
    with pytest.raises(ModelError, match="not an exported model folder"):
        load_exported(out)
