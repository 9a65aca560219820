"""The project's workflow settings: one record the app and the commands read and write."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from defect_studio.cli import main
from defect_studio.errors import ConfigError
from defect_studio.ml.cams import DEFAULT_CAM_METHOD
from defect_studio.project import Project
from defect_studio.workflow_settings import (
    WORKFLOW_SETTING,
    WorkflowSettings,
    load_workflow_settings,
    update_workflow_settings,
)


def test_an_older_projects_window_settings_are_read_once_into_the_record(demo_project: Path, caplog) -> None:
    with Project.open(demo_project) as project:
        project.set_setting("gui.proposal_method", "fgbp")
        project.set_setting("gui.cam_settings", {"fgbp": {"stages": [3]}, "region-aware": {"gamma": 1.0},
                                                 "scorecam": {"x": 1}, "layercam": {"no_such": 2}})
        project.set_setting("gui.segmenter_config", {"epochs": 3, "learning_rate": 0.01, "retired": True})
        project.set_setting("gui.classifier_config", {"arch": "compact", "epochs": 5})
        with caplog.at_level(logging.WARNING):
            record = load_workflow_settings(project)
        assert record.cam_method == "fgbp"
        assert record.cam_settings == {"fgbp": {"stages": [3]}, "region-aware": {"gamma": 1.0}}
        assert record.cam_spec().settings["stages"] == [3]
        assert record.segmenter == {"epochs": 3, "learning_rate": 0.01}
        assert record.classifier == {"arch": "compact", "epochs": 5}
        assert "retired" in caplog.text and "scorecam" in caplog.text  # said, not silently lost
        assert project.get_setting(WORKFLOW_SETTING) == record.to_dict()
        project.set_setting("gui.proposal_method", "gradcam")  # read once: the record is the truth now
        assert load_workflow_settings(project).cam_method == "fgbp"


def test_a_new_project_starts_from_the_defaults(demo_project: Path) -> None:
    with Project.open(demo_project) as project:
        record = load_workflow_settings(project)
    assert record == WorkflowSettings() and record.cam_spec().method == DEFAULT_CAM_METHOD


def test_updates_merge_and_leave_this_machines_settings_out(demo_project: Path) -> None:
    with Project.open(demo_project) as project:
        update_workflow_settings(project, segmenter={"epochs": 2, "threads": 3, "device": "cpu"})
        record = update_workflow_settings(project, segmenter={"seed": 4}, pseudo={"high": 0.6})
    assert record.segmenter == {"epochs": 2, "seed": 4} and record.pseudo == {"high": 0.6}


def test_one_error_type_for_a_setting_nobody_has(demo_project: Path) -> None:
    from defect_studio.ml.cams import CamSpec
    from defect_studio.ml.classifier_options import ClassifierConfig
    from defect_studio.ml.pseudo import PseudoLabelSettings
    from defect_studio.ml.segmenter_options import SegmenterConfig

    for make in (lambda: CamSpec.resolve("fgbp", {"stagez": 1}), lambda: PseudoLabelSettings.from_dict({"hgh": 1}),
                 lambda: SegmenterConfig.from_dict({"epoch": 1}), lambda: ClassifierConfig.from_settings({"epoch": 1}),
                 lambda: ClassifierConfig.from_settings({"arch": "vgg"})):
        with pytest.raises(ConfigError):
            make()


def test_the_commands_start_from_and_keep_the_projects_choices(demo_project: Path) -> None:
    project = str(demo_project)
    assert main(["train", project, "--arch", "compact", "--width", "8", "--input-size", "64", "--epochs", "2",
                 "--batch-size", "16", "--threads", "1", "--max-minutes", "0", "--no-augment"]) == 0
    with Project.open(demo_project) as opened:
        record = load_workflow_settings(opened)
        assert record.classifier["epochs"] == 2 and record.classifier["arch"] == "compact"
        assert "threads" not in record.classifier  # this machine's, not the project's
        # The CAM settings chosen in the app's CAM tab (the GUI test makes the same choice with the widgets).
        update_workflow_settings(opened, cam_method="fgbp", cam_settings={"fgbp": {"stages": [3]}})
    assert main(["pseudo", project, "--high", "0.6"]) == 0
    with Project.open(demo_project) as opened:
        made_with = opened.round(0).config
        assert made_with["cam_method"] == "fgbp" and made_with["cam_settings"]["stages"] == [3]
        assert "method" not in made_with  # one key
        params = [r.params for r in opened.mask_records(round_index=0, tag="defect")]
        assert params and all(p["cam_method"] == "fgbp" and p["cam_settings"]["stages"] == [3] for p in params)
        assert all(p["settings"]["high"] == 0.6 for p in params)
        assert load_workflow_settings(opened).pseudo["high"] == 0.6
    # `cam` shows the project's method with its settings; --set changes them for both faces.
    assert main(["cam", project, "--set", "stages=2"]) == 0
    with Project.open(demo_project) as opened:
        assert load_workflow_settings(opened).cam_settings["fgbp"] == {"stages": [2]}
    # `next-round` is the Rounds tab's job: the segmenter with the project's settings, the next round with
    # round 0's own CAM and thresholds (the record's CAM settings changed since).
    small = dict(architecture="unet", channels=[8, 16, 32], crop_size=32, batch_size=4, epochs=1, steps_per_epoch=2)
    with Project.open(demo_project) as opened:
        update_workflow_settings(opened, segmenter=small)
    assert main(["next-round", project]) == 0
    with Project.open(demo_project) as opened:
        run = opened.latest_run("segmenter")
        assert run.round_index == 0 and run.config["epochs"] == 1 and run.config["architecture"] == "unet"
        made_with = opened.round(1).config
        assert made_with["cam_method"] == "fgbp" and made_with["cam_settings"]["stages"] == [3]
        assert made_with["pseudo"]["high"] == 0.6
        assert opened.mask_records(round_index=1)
        # the new round's review queue is ranked edit-first already: every proposed defect mask has a place
        proposed = {r.image_id for r in opened.mask_records(round_index=1, tag="defect") if r.state == "proposed"}
        assert proposed and proposed <= {entry.image_id for entry in opened.review_order(1)}
    # Proposing round 1 again with another CAM method: the round says what its masks are made with now.
    with Project.open(demo_project) as opened:
        update_workflow_settings(opened, cam_method="gradcam")
    assert main(["pseudo", project, "--round", "1"]) == 0
    with Project.open(demo_project) as opened:
        made_with = opened.round(1).config
        assert made_with["cam_method"] == "gradcam" and made_with["pseudo"]["high"] == 0.6
        assert all(r.params["cam_method"] == "gradcam" for r in opened.mask_records(round_index=1, tag="defect")
                   if r.state == "proposed")
