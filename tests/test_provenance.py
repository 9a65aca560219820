"""Provenance and rollback (issue 16, item 4): every model records what it was trained on and how;
an earlier round's segmenter can be made current or exported without losing later work; bad input
(a missing model file, a round with no masks) is a clear message and changes nothing."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from defect_studio.cli import main as cli_main
from defect_studio.errors import DataError, ModelError
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.classifier import train_project_classifier_job
from defect_studio.ml.models import ClassifierConfig
from defect_studio.ml.refine import RefineConfig, refine_job
from defect_studio.project import Project, RunInput
from defect_studio.project.provenance import lineage, segmenter_to_build_on, use_segmenter
from defect_studio.project.schema import migrate

CLASSIFIER = dict(arch="compact", width=8, input_size=64, epochs=3, min_epochs=3, batch_size=16, lr=5e-3, seed=0,
                  augment=False, threads=1)
SEGMENTER = dict(architecture="unet", channels=[8, 16, 32], crop_size=48, batch_size=8, epochs=1, warm_start_epochs=1, steps_per_epoch=2,
                 learning_rate=1e-2)
PSEUDO = dict(mode="percentile", high_percentile=97.0, low_percentile=90.0, min_area=4)


# ----------------------------------------------------------------------------------------- the store
def _project_with_images(tmp_path: Path, count: int = 4) -> Project:
    images = tmp_path / "images"
    images.mkdir()
    project = Project.create(tmp_path / "project", images)
    project.add_images({"rel_path": f"img{i}.png", "sha256": f"hash{i}", "width": 6, "height": 4, "channels": 1,
                        "bit_depth": 8, "tag": "defect" if i % 2 else "good", "tag_source": "csv"} for i in range(count))
    return project


def _checkpoint(project: Project, name: str, content: bytes) -> Path:
    path = project.models_dir / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


def _segmenter_run(project: Project, round_index: int, content: bytes) -> int:
    path = _checkpoint(project, f"segmenter-round{round_index}-0.pt", content)
    images = project.images()
    inputs = [RunInput(i.id, round_index, "accepted", i.sha256, f"mask{i.id}-{round_index}") for i in images]
    run = project.record_training_run("segmenter", {"epochs": 1}, 0, {}, path, [f"{i.sha256}:x" for i in images],
                                      round_index, provenance={"round": round_index}, inputs=inputs)
    return run.id


def test_runs_record_their_inputs_and_a_classifier_the_tags_it_was_trained_with(tmp_path: Path) -> None:
    with _project_with_images(tmp_path) as project:
        images = project.images()
        path = _checkpoint(project, "classifier-1.pt", b"weights")
        # The user retags an image while the classifier trains in the background (60 s, say): the run
        # records the tag it was trained with, not the one it finds at the end.
        project.set_tags([images[0].id], "defect")
        db = project._db
        db.execute("UPDATE tag_events SET at='2000-01-01T00:00:00.000+00:00' WHERE source='csv'")
        run = project.record_training_run("classifier", {"arch": "compact"}, 0, {"seconds": 60.0}, path,
                                          [i.sha256 for i in images])
        labels = {i.image_id: i.label for i in project.run_inputs(run.id)}
        assert labels[images[0].id] == "good" and project.image(images[0].id).tag == "defect"
        assert labels == {i.id: ("good" if n % 2 == 0 else "defect") for n, i in enumerate(images)}
        assert run.provenance["round"] is None and run.provenance["tags_as_of"] < run.created_at

        seg_id = _segmenter_run(project, 0, b"seg0")
        inputs = project.run_inputs(seg_id)
        assert [(i.round_index, i.label, i.mask_sha256) for i in inputs][:1] == [(0, "accepted", f"mask{images[0].id}-0")]
        assert project.training_run(seg_id).provenance == {"round": 0}


def test_an_old_project_is_upgraded_and_its_runs_say_they_predate_provenance(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    project_dir = tmp_path / "old"
    project_dir.mkdir()
    (project_dir / "models").mkdir()
    (project_dir / "models" / "segmenter-round0-0.pt").write_bytes(b"old")
    connection = sqlite3.connect(project_dir / "project.sqlite", isolation_level=None)
    migrate(connection, target=2)
    connection.execute("INSERT INTO meta VALUES ('image_root', ?)", (str(images),))
    connection.execute("INSERT INTO rounds(idx, created_at, status) VALUES (0, 'then', 'trained')")
    connection.execute(
        "INSERT INTO training_runs(kind, created_at, config, seed, metrics, checkpoint_path, checkpoint_sha256, "
        "dataset_hashes, round_idx) VALUES ('segmenter', 'then', '{}', 0, '{}', 'models/segmenter-round0-0.pt', ?, "
        "'[\"a:b\"]', 0)", (hashlib.sha256(b"old").hexdigest(),))
    connection.close()
    with Project.open(project_dir) as project:
        (run,) = project.training_runs()
        assert run.provenance == {} and project.run_inputs(run.id) == []
    assert cli_main(["models", str(project_dir), "--json"]) == 0


def test_use_segmenter_rolls_back_and_refuses_a_missing_file_changing_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _project_with_images(tmp_path) as project:
        for index in range(3):
            project.create_round({})
            for image in project.images():
                project.save_mask_proposal(image.id, index, np.zeros((4, 6), bool), "test")
        first, second = _segmenter_run(project, 0, b"seg0"), _segmenter_run(project, 1, b"seg1")
        assert project.current_segmenter().id == second
        project_dir = project.path
    # Round 0's segmenter becomes current; nothing of round 1 is lost.
    assert cli_main(["use-segmenter", str(project_dir), "--round", "0"]) == 0
    assert "is now current" in capsys.readouterr().out
    with Project.open(project_dir) as project:
        assert project.current_segmenter().id == first
        assert [r.id for r in project.training_runs("segmenter")] == [first, second]
        assert len(project.mask_records(round_index=1)) == 4
        # The next round builds on the chosen segmenter; re-proposing round 1 still on round 0's.
        assert segmenter_to_build_on(project, 3).id == first and segmenter_to_build_on(project, 1).id == first
        (project.path / "models" / "segmenter-round1-0.pt").unlink()
    # A model file missing from disk: a clear message, exit code 2, the current segmenter unchanged.
    assert cli_main(["use-segmenter", str(project_dir), "--round", "1"]) == 2
    error = capsys.readouterr().err
    assert "missing from disk" in error and f"still run {first} (round 0)" in error
    # A round with no segmenter, a round with no masks, a round that does not exist.
    assert cli_main(["use-segmenter", str(project_dir), "--round", "2"]) == 2
    assert "no segmenter has been trained on round 2" in capsys.readouterr().err
    with Project.open(project_dir) as project:
        project.create_round({})
        with pytest.raises(DataError, match="round 3 has no masks"):
            use_segmenter(project, round_index=3)
        assert project.current_segmenter().id == first
    assert cli_main(["use-segmenter", str(project_dir), "--round", "9"]) == 2
    assert "no round 9" in capsys.readouterr().err
    # The listing marks the current model and the missing file.
    assert cli_main(["models", str(project_dir)]) == 0
    listing = capsys.readouterr().out
    assert f"* run {first:>3}  segmenter" in listing and "[checkpoint MISSING]" in listing
    # Back to the newest; a newly trained segmenter is current again by itself.
    assert cli_main(["use-segmenter", str(project_dir), "--latest"]) == 0
    with Project.open(project_dir) as project:
        assert project.current_segmenter().id == second
        project.choose_segmenter(first)
        third = _segmenter_run(project, 2, b"seg2")
        assert project.current_segmenter().id == third and project.chosen_segmenter() is None
        classifier = project.record_training_run("classifier", {}, 0, {}, _checkpoint(project, "c.pt", b"c"), [])
        with pytest.raises(ModelError, match="is a classifier, not a segmenter"):
            use_segmenter(project, run_id=classifier.id)
        assert project.current_segmenter().id == third


def test_training_on_a_round_with_no_masks_is_a_clear_message_and_records_nothing(tmp_path: Path) -> None:
    from defect_studio.ml.refine import train_project_segmenter_job
    from defect_studio.ml.segmenter import SegmenterConfig

    with _project_with_images(tmp_path) as project:
        project.create_round({})
        with pytest.raises(DataError, match="round 0 has no mask to train on"):
            run_job(train_project_segmenter_job(project, 0, SegmenterConfig(), CancelToken()))
        for image in project.images():  # every mask rejected: the same
            project.save_mask_proposal(image.id, 0, np.zeros((4, 6), bool), "test")
            project.review_mask(image.id, 0, "rejected")
        with pytest.raises(DataError, match="round 0 has no mask to train on"):
            run_job(train_project_segmenter_job(project, 0, SegmenterConfig(), CancelToken()))
        assert project.training_runs() == [] and not list(project.models_dir.glob("*.pt"))


# ----------------------------------------------------------------------------------------- a real loop
@pytest.fixture(scope="module")
def loop(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny classifier and two refinement rounds; in round 0 one mask is edited and one rejected."""
    project_dir = tmp_path_factory.mktemp("provenance") / "project"
    from defect_studio.project.importer import import_job

    decisions: dict[str, object] = {}

    def review(project: Project, round_index: int) -> None:
        if round_index != 0:
            return
        defects = project.images("defect")
        mask = np.zeros((defects[0].height, defects[0].width), bool)
        mask[3:9, 5:20] = True
        project.save_edited_mask(defects[0].id, 0, mask)
        project.review_mask(defects[1].id, 0, "rejected")
        decisions.update(edited=defects[0].id, rejected=defects[1].id)

    with Project.create(project_dir, demo_dataset / "images") as project:
        run_job(import_job(project, demo_dataset / "images", demo_dataset / "labels.csv", CancelToken()))
        run_job(train_project_classifier_job(project, ClassifierConfig(**CLASSIFIER), CancelToken(), device="cpu"))
        config = RefineConfig(method="gradcam", pseudo=PSEUDO, segmenter=SEGMENTER, stop_change=0.0)
        run_job(refine_job(project, 2, CancelToken(), review, None, config))
    return project_dir, decisions


def test_a_trained_segmenter_records_each_mask_it_trained_on(loop) -> None:
    project_dir, decisions = loop
    with Project.open(project_dir) as project:
        (classifier,) = project.training_runs("classifier")
        tags = {i.image_id: i.label for i in project.run_inputs(classifier.id)}
        assert tags == {i.id: i.tag for i in project.images()} and classifier.provenance["round"] is None
        first, second = project.training_runs("segmenter")
        inputs = {i.image_id: i for i in project.run_inputs(first.id)}
        masks = {r.image_id: r for r in project.mask_records(round_index=0)}
        assert set(inputs) == set(masks) - {decisions["rejected"]}
        assert all(inputs[i].mask_sha256 == masks[i].sha256 and inputs[i].label == masks[i].state for i in inputs)
        assert inputs[decisions["edited"]].label == "edited"
        assert all(i.image_sha256 == project.image(i.image_id).sha256 and i.round_index == 0 for i in inputs.values())
        assert first.provenance["round_config"]["cam_method"] == "gradcam" and first.provenance["rejected_left_out"] == 1
        assert first.provenance["proposals_from"]["classifier_sha256"] == [classifier.checkpoint_sha256]
        assert first.provenance["warm_start"] is None
        assert second.provenance["warm_start"]["run"] == first.id
        assert second.provenance["proposals_from"]["segmenter_sha256"] == [first.checkpoint_sha256]
        card = lineage(project, second)
        assert card["continued_from"] == [{"run": first.id, "round": 0, "checkpoint_sha256": first.checkpoint_sha256}]
        assert card["proposals_from"]["segmenter"] == [{"checkpoint_sha256": first.checkpoint_sha256, "run": first.id}]


def test_export_an_earlier_round_writes_its_lineage_and_keeps_later_work(loop, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    project_dir, _ = loop
    with Project.open(project_dir) as project:
        first, second = project.training_runs("segmenter")
        before = {(r.image_id, r.round_index): r.sha256 for r in project.mask_records()}
        expected = {(project.image(i.image_id).stem, i.mask_sha256) for i in project.run_inputs(first.id)}
    out = tmp_path / "round0"
    assert cli_main(["export", str(project_dir), "--round", "0", "--out", str(out), "--parity-images", "2"]) == 0
    card = json.loads((out / "model-card.json").read_text())
    assert card["checkpoint_sha256"] == first.checkpoint_sha256 and card["training"]["round"] == 0
    assert card["lineage"]["run"] == first.id and card["lineage"]["round"] == 0
    assert {(m["image"], m["mask_sha256"]) for m in card["lineage"]["trained_on"]["masks"]} == expected
    assert card["lineage"]["trained_on"]["by_label"]["edited"] == 1
    assert card["lineage"]["settings"]["seed"] == first.config["seed"]
    assert [r["round"] for r in card["rounds"]] == [0]
    with Project.open(project_dir) as project:  # exporting changed nothing
        assert project.current_segmenter().id == second.id
        assert {(r.image_id, r.round_index): r.sha256 for r in project.mask_records()} == before
    capsys.readouterr()
    # The details of a run, as the CLI lists them.
    assert cli_main(["models", str(project_dir), "--run", str(first.id)]) == 0
    details = capsys.readouterr().out
    assert f"run {first.id}: segmenter, round 0" in details and "1 edited" in details


def test_export_refuses_a_missing_model_file_and_writes_nothing(loop, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    project_dir, _ = loop
    with Project.open(project_dir) as project:
        first = project.training_runs("segmenter")[0]
    moved = first.checkpoint_path.with_name("elsewhere.bin")
    first.checkpoint_path.rename(moved)
    try:
        out = tmp_path / "never"
        assert cli_main(["export", str(project_dir), "--round", "0", "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert "missing from disk" in error and "nothing was exported" in error
        assert not out.exists()
    finally:
        moved.rename(first.checkpoint_path)
