"""The headless loop end to end on the demo: classifier -> CAM -> pseudo-labels -> rounds -> evaluate -> export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defect_studio.cli import main as cli_main
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.classifier import train_project_classifier_job
from defect_studio.ml.models import ClassifierConfig
from defect_studio.ml.refine import RefineConfig, refine_job
from defect_studio.ml.segmenter import load_segmenter
from defect_studio.project import Project
from defect_studio.project.importer import import_job

CLASSIFIER = dict(arch="compact", width=8, input_size=64, epochs=6, min_epochs=6, batch_size=16, lr=5e-3, seed=0)
SEGMENTER = dict(architecture="unet", channels=[8, 16, 32], crop_size=48, batch_size=8, epochs=3, warm_start_epochs=2, steps_per_epoch=8,
                 learning_rate=1e-2)
# The tiny classifier's CAMs are coarse: percentile thresholds always give each defect image a proposal.
PSEUDO = dict(mode="percentile", high_percentile=97.0, low_percentile=90.0, min_area=4)


@pytest.fixture(scope="module")
def loop(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two refinement rounds; in round 0 the 'user' edits one mask and rejects another image."""
    project_dir = tmp_path_factory.mktemp("loop") / "project"
    decisions: dict[str, object] = {}

    def review(project: Project, round_index: int) -> None:
        if round_index != 0:
            return
        defects = [i for i in project.images() if i.tag == "defect"]
        edited, rejected = defects[0], defects[1]
        mask = np.zeros((edited.height, edited.width), bool)
        mask[3:9, 5:20] = True
        project.save_edited_mask(edited.id, 0, mask)
        project.review_mask(rejected.id, 0, "rejected")
        decisions.update(edited=edited, edited_mask=mask, rejected=rejected)

    with Project.create(project_dir, demo_dataset / "images") as project:
        run_job(import_job(project, demo_dataset / "images", demo_dataset / "labels.csv", CancelToken()))
        run_job(train_project_classifier_job(project, ClassifierConfig(**CLASSIFIER), CancelToken(), device="cpu"))
        config = RefineConfig(method="gradcam", pseudo=PSEUDO, segmenter=SEGMENTER, stop_change=0.0)
        events = []
        summary = run_job(refine_job(project, 2, CancelToken(), review, demo_dataset, config), events.append)
    return project_dir, summary, decisions, events


def test_loop_runs_rounds_and_records_metrics(loop) -> None:
    project_dir, summary, _, events = loop
    assert [entry["round"] for entry in summary["rounds"]] == [0, 1]
    stages = {e.stage for e in events}
    assert {"pseudo-labels", "train segmenter", "gradcam maps"} <= stages
    with Project.open(project_dir) as project:
        rounds = project.rounds()
        assert [r.status for r in rounds] == ["trained", "trained"]
        first, second = rounds[0].metrics, rounds[1].metrics
        assert first["review"]["states"]["edited"] == 1 and first["review"]["states"]["rejected"] == 1
        assert first["review"]["edited_pixel_fraction"] > 0
        flagged = [r for r in project.mask_records(round_index=0) if r.flagged]
        assert first["pseudo"]["flagged_empty"] == len(flagged)
        assert all(project.image(r.image_id).tag == "defect" and not project.load_mask(r).any() for r in flagged)
        assert 0.0 <= second["mask_change"] <= 1.0
        assert 0.0 <= first["ground_truth"]["defect_iou"] <= 1.0 and "per_type" in first["ground_truth"]
        runs = project.training_runs("segmenter")
        assert [r.round_index for r in runs] == [0, 1]
        # Round 0 trains from random init; round 1 continues from round 0's network, for fewer epochs.
        assert runs[0].metrics["started_from"] is None and runs[0].metrics["epochs_run"] == 3
        assert runs[1].metrics["started_from"] == runs[0].checkpoint_sha256 and runs[1].metrics["epochs_run"] == 2
        # Round 1's proposals were made by segmenter 0 fused with the CAM, with full provenance.
        defect = next(i for i in project.images() if i.tag == "defect")
        record = project.mask_record(defect.id, 1)
        if record.state == "proposed":
            assert record.source == "segmenter-0+cam:gradcam"
            assert record.params["segmenter_sha256"] == runs[0].checkpoint_sha256
            assert record.params["classifier_sha256"] and record.params["round"] == 1
            assert record.params["disagreeing_pixels"] >= 0  # left out of training with the ignore band
        good = next(i for i in project.images() if i.tag == "good")
        assert not project.load_mask(project.mask_record(good.id, 1)).any()


def test_human_edit_survives_the_next_round(loop) -> None:
    project_dir, _, decisions, _ = loop
    edited = decisions["edited"]
    with Project.open(project_dir) as project:
        record = project.mask_record(edited.id, 1)
        assert record.state == "edited" and record.source == "human-edit"
        assert np.array_equal(project.load_mask(record), decisions["edited_mask"])


def test_rejected_image_is_not_trained_on(loop) -> None:
    project_dir, _, decisions, _ = loop
    rejected, edited = decisions["rejected"], decisions["edited"]
    with Project.open(project_dir) as project:
        run = next(r for r in project.training_runs("segmenter") if r.round_index == 0)
        meta = load_segmenter(run.checkpoint_path).meta
        seen = set(meta["trained_images"]) | set(meta["validation_images"])
        assert rejected.stem not in seen and edited.stem in seen
        assert not any(h.startswith(rejected.sha256) for h in run.dataset_hashes)


def test_evaluate_and_export_from_the_cli(loop, demo_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project_dir, _, _, _ = loop
    assert cli_main(["evaluate", str(project_dir), "--gt", str(demo_dataset), "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"defect_iou", "miou", "dice", "detection_f1", "good_false_positive_rate", "per_type"} <= set(metrics)
    assert metrics["images"] == 20
    assert cli_main(["evaluate", str(project_dir), "--gt", str(demo_dataset / "masks"), "--round", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] > 0
    out = tmp_path / "export"
    assert cli_main(["export", str(project_dir), "--out", str(out), "--parity-images", "3"]) == 0
    card = json.loads((out / "model-card.json").read_text())
    assert [r["round"] for r in card["rounds"]] == [0, 1] and card["parity"]["passed"]


def test_pseudo_shards_compute_every_map_read_only_and_pseudo_proposes_from_them(
        loop, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Shards of an array job fill the caches (CAMs and the round-1 segmenter's maps) beside the open app;
    `pseudo` then computes no map at all. Runs on a copy: the next test adds round 2 to the loop's project."""
    import shutil

    project_dir = tmp_path / "copy"
    shutil.copytree(loop[0], project_dir)
    options = ["--method", "gradcam", "--mode", "percentile", "--high-percentile", "97", "--low-percentile", "90"]
    app = Project.open(project_dir)  # the app holds the project (and its lock) while the shards run
    try:
        defect_images = sum(i.tag == "defect" for i in app.images())
        for shard in ("1/2", "2/2"):
            assert cli_main(["pseudo", str(project_dir), *options, "--shard", shard]) == 0
        output = capsys.readouterr().out
        assert output.count("round 2, shard") == 2 and "segmenter maps" in output
        assert [r.index for r in app.rounds()] == [0, 1], "a shard writes nothing in the project"
    finally:
        app.close()
    assert cli_main(["pseudo", str(project_dir), *options, "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex('{\n  "round"'):])
    assert summary["round"] == 2 and summary["proposed"] + summary["carried_forward"] >= defect_images
    assert summary["maps_computed"] == {"cam": 0, "segmenter_maps": 0}, "the shards left every map in the caches"
    assert cli_main(["pseudo", str(project_dir), "--shard", "3/2"]) == 2  # a clear message, not a traceback


def test_pseudo_cli_starts_the_next_round_from_the_segmenter(loop, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after the tests that read the loop's two rounds: it adds round 2."""
    project_dir, _, decisions, _ = loop
    args = ["pseudo", str(project_dir), "--method", "gradcam", "--mode", "percentile", "--high-percentile", "97",
            "--low-percentile", "90", "--min-area", "4", "--train-on-disagreement"]
    assert cli_main(args) == 0
    assert "round 2:" in capsys.readouterr().out
    with Project.open(project_dir) as project:
        assert [r.index for r in project.rounds()] == [0, 1, 2]
        assert project.round(2).config["pseudo"]["ignore_disagreement"] is False
        assert all(r.params.get("disagreeing_pixels") == 0 for r in project.mask_records(round_index=2)
                   if r.state == "proposed" and r.source.startswith("segmenter"))
        edited = project.mask_record(decisions["edited"].id, 2)
        assert edited.state == "edited" and np.array_equal(project.load_mask(edited), decisions["edited_mask"])
        sources = {r.source for r in project.mask_records(round_index=2) if r.state == "proposed"}
        assert "segmenter-1+cam:gradcam" in sources
    assert cli_main(["pseudo", str(project_dir), "--high", "0.1", "--low", "0.5"]) == 2  # bad settings: clear error

def test_refine_stops_when_masks_stop_changing(loop) -> None:
    """Continues the project (round 2 was proposed by the CLI test): trains it, proposes round 3, stops there."""
    project_dir, _, _, _ = loop
    config = RefineConfig(method="gradcam", pseudo=PSEUDO, segmenter=SEGMENTER, stop_change=1.01)
    with Project.open(project_dir) as project:
        summary = run_job(refine_job(project, 5, CancelToken(), None, None, config))
        assert summary["stopped_early"] and [e["round"] for e in summary["rounds"]] == [2, 3]
        assert project.round(3).status == "converged" and "stopped" in project.round(3).metrics
        assert [r.round_index for r in project.training_runs("segmenter")] == [0, 1, 2]

def test_a_round_left_training_with_its_segmenter_recorded_is_finished_on_resume(tmp_path: Path) -> None:
    """A project written before record_round_segmenter, killed between recording the run and the round's
    status, resumes with the round trained and the run's metrics (without the history) in it."""
    from defect_studio.ml.refine import _finish_recorded_training

    images = tmp_path / "images"
    images.mkdir()
    with Project.create(tmp_path / "project", images) as project:
        project.create_round({})
        project.update_round(0, status="training", metrics={"review": {}})
        checkpoint = project.models_dir / "segmenter-round0-0.pt"
        checkpoint.parent.mkdir(exist_ok=True)
        checkpoint.write_bytes(b"weights")
        project.record_training_run("segmenter", {}, 0, {"best_val_defect_iou": 0.4, "history": [{}]}, checkpoint,
                                    [], round_index=0)  # the old first write; the kill came before the second
        _finish_recorded_training(project, 0)
        record = project.round(0)
        assert record.status == "trained"
        assert record.metrics == {"review": {}, "segmenter": {"best_val_defect_iou": 0.4}}


@pytest.mark.slow
def test_full_bench_quick_on_the_demo(demo_dataset: Path, tmp_path: Path) -> None:
    """`bench full --quick` end to end on the demo: both tables written, numbers in range; the kept project
    opens where it was kept and finds its images and models."""
    from defect_studio.bench import full
    from defect_studio.imageio import read_image
    from defect_studio.project import Project

    kept = tmp_path / "kept"
    result = full.run(demo_dataset, True, tmp_path, seed=0, classifier_path=None, as_json=False, rounds=2,
                      keep_project=kept)
    with Project.open(kept) as project:
        assert read_image(project.images("defect")[0].path).size > 0
        assert len(project.training_runs("segmenter")) == 2
    report = json.loads((tmp_path / f"full-{demo_dataset.name}-quick.json").read_text())
    assert (tmp_path / f"full-{demo_dataset.name}-quick.md").is_file()
    assert len(report["rounds"]) == 2 and 0.0 <= result["full"]["defect_iou"] <= 1.0
    assert set(report["weak_seconds"]) >= {"classifier", "CAMs", "pseudo-labels", "segmenter training"}
    tables = report["tables"]
    rows = [row["what"] for row in tables["Test split: weak loop vs full supervision"]]
    # weak and bound, then each without the test-time flips the segmenter predicts with by default
    assert len(rows) == 4 and rows[0].startswith("weak:") and rows[1].startswith("upper bound:")
    assert rows[2].startswith("weak, one view") and rows[3].startswith("upper bound, one view")
    assert 0.0 <= report["weak"]["one_view"]["defect_iou"] <= 1.0
    # every method was measured (no --method), so the report says what the app's untuned defaults would give
    markdown = (tmp_path / f"full-{demo_dataset.name}-quick.md").read_text()
    from defect_studio.ml.cams import DEFAULT_CAM_METHOD

    assert f"With the app's defaults instead ({DEFAULT_CAM_METHOD}, fixed 0.3/0.15" in markdown


def test_simulated_reviewer_edits_new_images_each_round_and_rejects_the_rest(demo_project: Path, demo_dataset: Path) -> None:
    """The full bench's careful user: K more ground-truth edits per round, locked for later rounds;
    every other defect proposal rejected."""
    from defect_studio.bench.full import SimulatedReviewer
    from defect_studio.dataset_layout import load_dataset

    samples = {sample.stem: sample for sample in load_dataset(demo_dataset, 0)}
    reviewer = SimulatedReviewer(list(samples.values()), edits_per_round=3, reject_unedited=True, seed=0)
    assert reviewer.describe() == "3 edited per round, the rest rejected"
    with Project.open(demo_project) as project:
        defects = project.images("defect")
        for round_index in (0, 1):
            project.create_round({})
            for image in project.images():
                project.save_mask_proposal(image.id, round_index, np.ones((image.height, image.width), bool), "test")
            reviewer(project, round_index)
            states = project.mask_state_counts(tag="defect")[round_index]
            assert states["edited"] == 3 * (round_index + 1)  # earlier edits are carried forward
            assert states["rejected"] == len(defects) - states["edited"] and states["proposed"] == 0
        assert project.mask_state_counts(tag="good")[1] == {"proposed": len(project.images("good")), "accepted": 0,
                                                             "edited": 0, "rejected": 0, "flagged": 0}
        assert project.mask_states(1) == {r.image_id: (r.state, r.flagged) for r in project.mask_records(1)}
        for record in project.mask_records(1, state="edited"):
            image = project.image(record.image_id)
            truth = samples[image.stem].truth((image.height, image.width))
            assert np.array_equal(project.load_mask(record) > 0, truth)


def test_full_bench_can_propose_as_a_new_project_does(demo_dataset: Path, tmp_path: Path) -> None:
    """--app-defaults: the default CAM method and the default thresholds, nothing chosen on ground truth."""
    from defect_studio.bench import full
    from defect_studio.ml.cams import DEFAULT_CAM_METHOD
    from defect_studio.ml.pseudo import PseudoLabelSettings
    from defect_studio.project import Project

    kept = tmp_path / "kept"
    full.run(demo_dataset, True, tmp_path, seed=0, classifier_path=None, as_json=False, rounds=1, keep_project=kept,
             upper_bound=False, app_defaults=True)
    markdown = (tmp_path / f"full-{demo_dataset.name}-quick.md").read_text()
    assert "The app's defaults, nothing chosen on ground truth (--app-defaults)" in markdown
    with Project.open(kept) as project:
        made_with = project.rounds()[0].config
    assert made_with["cam_method"] == DEFAULT_CAM_METHOD
    assert {k: made_with["pseudo"][k] for k in ("mode", "high", "low")} == \
        {k: PseudoLabelSettings().to_dict()[k] for k in ("mode", "high", "low")}
