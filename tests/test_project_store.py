from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defect_studio.errors import ProjectError, ProjectLockedError
from defect_studio.project import Project
from defect_studio.project.schema import LATEST_VERSION, MIGRATIONS, migrate

REPO = Path(__file__).resolve().parents[1]


def make_project(tmp_path: Path, count: int = 3) -> Project:
    images = tmp_path / "images"
    images.mkdir()
    project = Project.create(tmp_path / "project", images)
    project.add_images(
        {"rel_path": f"img{i}.png", "sha256": f"hash{i}", "width": 6, "height": 4, "channels": 1, "bit_depth": 8}
        for i in range(count)
    )
    return project


def test_database_is_in_wal_mode_with_the_latest_schema(tmp_path: Path):
    with make_project(tmp_path) as project:
        assert project.schema_version == LATEST_VERSION
    connection = sqlite3.connect(tmp_path / "project" / "project.sqlite")
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_tags_are_saved_with_source_and_history(tmp_path: Path):
    with make_project(tmp_path) as project:
        first, second, _ = project.images()
        assert project.set_tags([first.id, second.id], "defect") == 2
        assert project.set_tags([first.id], "defect") == 0  # no change, no event
        project.set_tags([first.id], "good", source="csv")
    with Project.open(tmp_path / "project") as project:
        assert project.tag_counts() == {"good": 1, "defect": 1, "untagged": 1}
        assert [(tag, source) for tag, source, _ in project.tag_history(first.id)] == [("defect", "user"), ("good", "csv")]


def test_a_second_instance_is_refused_naming_the_holder(tmp_path: Path):
    with make_project(tmp_path):
        with pytest.raises(ProjectLockedError, match=r"process \d+ of user"):
            Project.open(tmp_path / "project")
        script = f"from defect_studio.project import Project\nProject.open({str(tmp_path / 'project')!r})"
        completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
        assert completed.returncode != 0 and "is open in another defect-studio" in completed.stderr
    Project.open(tmp_path / "project").close()  # free again once closed


def test_a_stale_lock_of_a_killed_process_is_taken_over(tmp_path: Path):
    make_project(tmp_path).close()
    script = (
        "import os\nfrom defect_studio.project import Project\n"
        f"p = Project.open({str(tmp_path / 'project')!r})\nos.kill(os.getpid(), 9)\n"
    )
    assert subprocess.run([sys.executable, "-c", script], cwd=REPO).returncode == -9
    assert json.loads((tmp_path / "project" / "project.lock").read_text())["pid"] > 0
    with Project.open(tmp_path / "project") as project:
        assert project.took_over_stale_lock and "process" in project.took_over_stale_lock
        assert len(project.images()) == 3


def test_migration_from_version_1_keeps_the_data(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    project_dir = tmp_path / "old"
    project_dir.mkdir()
    connection = sqlite3.connect(project_dir / "project.sqlite", isolation_level=None)
    migrate(connection, target=1)
    connection.execute("INSERT INTO meta VALUES ('image_root', ?)", (str(images),))
    connection.execute(
        "INSERT INTO images(rel_path, stem, sha256, width, height, channels, bit_depth, added_at, tag) "
        "VALUES ('a.png', 'a', 'h', 5, 5, 1, 8, 'then', 'defect')"
    )
    connection.close()
    with Project.open(project_dir) as project:
        assert project.schema_version == LATEST_VERSION == len(MIGRATIONS)
        assert [(i.stem, i.tag) for i in project.images()] == [("a", "defect")]
        assert project.rounds() == []  # the tables of version 2 exist
        project.create_round({})


def test_a_newer_schema_is_refused(tmp_path: Path):
    make_project(tmp_path).close()
    connection = sqlite3.connect(tmp_path / "project" / "project.sqlite", isolation_level=None)
    connection.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    connection.close()
    with pytest.raises(ProjectError, match="newer defect-studio"):
        Project.open(tmp_path / "project")


def test_not_a_project_and_damaged_database(tmp_path: Path):
    with pytest.raises(ProjectError, match="not a defect-studio project"):
        Project.open(tmp_path)
    (tmp_path / "project.sqlite").write_bytes(b"garbage" * 200)
    with pytest.raises(ProjectError, match="project database"):
        Project.open(tmp_path)


def test_user_mask_decisions_are_final_across_rounds(tmp_path: Path):
    with make_project(tmp_path) as project:
        edited, accepted, proposed = project.images()
        project.create_round({"method": "cam"})
        ones = np.ones((4, 6), bool)
        for image in (edited, accepted, proposed):
            project.save_mask_proposal(image.id, 0, ones, "cam:region-aware", {"tau": 0.5})
        drawn = np.zeros((4, 6), bool)
        drawn[1, 1:4] = True
        project.save_edited_mask(edited.id, 0, drawn)
        project.review_mask(accepted.id, 0, "accepted")
        # a re-run of round 0's proposals leaves the user's decisions alone
        assert project.save_mask_proposal(edited.id, 0, ones, "cam", {}).state == "edited"
        project.create_round({"method": "segmenter-0"})
        empty = np.zeros((4, 6), bool)
        carried = project.save_mask_proposal(edited.id, 1, empty, "segmenter-0", {})
        assert carried.state == "edited" and carried.params["carried_from_round"] == 0
        assert np.array_equal(project.load_mask(carried), drawn)
        assert project.save_mask_proposal(accepted.id, 1, empty, "segmenter-0", {}).state == "accepted"
        assert np.array_equal(project.load_mask(project.mask_record(accepted.id, 1)), ones)
        fresh = project.save_mask_proposal(proposed.id, 1, empty, "segmenter-0", {})
        assert fresh.state == "proposed" and not project.load_mask(fresh).any()
        assert [state for _, state, *_ in project.mask_history(edited.id, 0)] == ["proposed", "edited"]


def test_revert_to_proposal_and_wrong_mask_size(tmp_path: Path):
    with make_project(tmp_path) as project:
        image = project.images()[0]
        project.create_round({})
        proposal = np.zeros((4, 6), bool)
        proposal[0, 0] = True
        project.save_mask_proposal(image.id, 0, proposal, "cam", {})
        project.save_edited_mask(image.id, 0, ~proposal)
        reverted = project.revert_to_proposal(image.id, 0)
        assert reverted.state == "proposed" and reverted.source == "cam"
        assert np.array_equal(project.load_mask(reverted), proposal)
        with pytest.raises(ProjectError, match="image is 6 × 4"):
            project.save_edited_mask(image.id, 0, np.zeros((5, 6), bool))


def test_training_runs_record_checkpoint_hash(tmp_path: Path):
    with make_project(tmp_path) as project:
        checkpoint = project.models_dir / "classifier-1.pt"
        checkpoint.parent.mkdir()
        checkpoint.write_bytes(b"weights")
        run = project.record_training_run("classifier", {"arch": "x"}, 7, {"val_auroc": 0.9}, checkpoint, ["h2", "h1"])
        assert run.checkpoint_sha256 == hashlib.sha256(b"weights").hexdigest()
        assert project.latest_run("classifier") == run
        assert run.dataset_hashes == ("h1", "h2") and run.seed == 7
        with pytest.raises(ProjectError, match="inside the project"):
            project.record_training_run("classifier", {}, 0, {}, tmp_path / "images", [])


def _segmenter_checkpoint(project: Project) -> Path:
    checkpoint = project.models_dir / "segmenter-round0-0.pt"
    checkpoint.parent.mkdir(exist_ok=True)
    checkpoint.write_bytes(b"segmenter weights")
    return checkpoint


def test_a_rounds_segmenter_and_the_trained_status_are_recorded_together(tmp_path: Path):
    with make_project(tmp_path) as project:
        project.create_round({})
        project.update_round(0, status="training", metrics={"review": {"accept_rate": 1.0}})
        run = project.record_round_segmenter(0, {"epochs": 1}, 0, {"best_val_defect_iou": 0.5},
                                             _segmenter_checkpoint(project), ["h"],
                                             round_metrics={"segmenter": {"best_val_defect_iou": 0.5}, "train_s": 2.0})
        assert run.kind == "segmenter" and run.round_index == 0 and project.latest_run("segmenter") == run
        record = project.round(0)
        assert record.status == "trained"
        assert record.metrics == {"review": {"accept_rate": 1.0}, "segmenter": {"best_val_defect_iou": 0.5},
                                  "train_s": 2.0}


def test_a_failed_round_status_write_records_no_segmenter_either(tmp_path: Path, monkeypatch):
    """The run and the round's status commit together or not at all: the kill between them that left a
    round at "training" with its model recorded cannot happen."""
    with make_project(tmp_path) as project:
        project.create_round({})
        project.update_round(0, status="training", metrics={"review": {}})
        checkpoint = _segmenter_checkpoint(project)

        def disk_fails(*args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(Project, "_update_round_in", staticmethod(disk_fails))
        with pytest.raises(ProjectError, match="could not be saved"):
            project.record_round_segmenter(0, {}, 0, {}, checkpoint, ["h"], round_metrics={"train_s": 1.0})
        monkeypatch.undo()
        assert project.training_runs() == [] and project.round(0).status == "training"
        assert project.round(0).metrics == {"review": {}}
        with pytest.raises(ProjectError, match="no round 3"):  # a round that is not there: no run either
            project.record_round_segmenter(3, {}, 0, {}, checkpoint, ["h"])
        assert project.training_runs() == []


def test_duplicate_stems_in_subfolders_get_distinct_mask_names(tmp_path: Path):
    with make_project(tmp_path, count=0) as project:
        project.add_images(
            {"rel_path": p, "sha256": p, "width": 2, "height": 2, "channels": 1, "bit_depth": 8}
            for p in ("good/a.png", "defect/a.png")
        )
        assert sorted(i.stem for i in project.images()) == ["a", "defect__a"]


def test_a_background_proposal_cannot_overwrite_an_edit_saved_meanwhile(tmp_path: Path, monkeypatch):
    """The GUI thread saves an edit while a worker proposes the same mask: the edit must win."""
    import threading

    with make_project(tmp_path) as project:
        image = project.images()[0]
        project.create_round({})
        drawn = np.zeros((4, 6), bool)
        drawn[1, 2] = True
        real_check = Project._check_mask_shape
        edit_thread: list[threading.Thread] = []

        def check_then_let_the_user_edit(self, image_record, mask):  # type: ignore[no-untyped-def]
            # The worker has decided "not edited, so propose"; now the user's edit arrives.
            if not edit_thread:
                edit_thread.append(threading.Thread(target=project.save_edited_mask, args=(image.id, 0, drawn)))
                edit_thread[0].start()
                edit_thread[0].join(timeout=0.5)  # blocked on the project's lock, as it must be
            return real_check(self, image_record, mask)

        monkeypatch.setattr(Project, "_check_mask_shape", check_then_let_the_user_edit)
        project.save_mask_proposal(image.id, 0, np.ones((4, 6), bool), "cam", {})
        edit_thread[0].join()
        record = project.mask_record(image.id, 0)
        assert record.state == "edited" and np.array_equal(project.load_mask(record), drawn)
