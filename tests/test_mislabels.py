"""The mislabel queue (issue 16, item 2): images whose tag the models contradict, ranked with a
reason; confirm / flip a tag, undoable; a flip that contradicts an edited mask is refused with a
clear message and nothing is lost; the benchmark on the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defect_studio.cli import main as cli_main
from defect_studio.errors import DataError, ProjectError
from defect_studio.jobs import CancelToken, run_job
from defect_studio.ml.mislabels import (
    ImageEvidence,
    assign_folds,
    calibrate,
    good_prior_distances,
    leave_fold_out_prior,
    rank_suspects,
)
from defect_studio.project import Project
from defect_studio.project.mislabels import confirm_tags, flip_tags, open_suspects, undo_last

# EfficientNet-Lite0 (its ImageNet stages give the good-image prior its features) at a small input: seconds.
CLASSIFIER = dict(input_size=128, epochs=2, min_epochs=1, batch_size=8, augment=False, max_train_seconds=None,
                  threads=1, seed=0)


# ----------------------------------------------------------------------------------------- the ranking
def _synthetic_features(count: int = 60, seed: int = 0) -> tuple[list[torch.Tensor], np.ndarray]:
    """Images as 16 locations of 8 features: normal texture near the origin; a defect image has one
    location far out (in one of two directions: two kinds of defect)."""
    rng = np.random.default_rng(seed)
    features, is_defect = [], np.arange(count) % 3 == 0
    for index in range(count):
        cells = rng.normal(0.0, 0.3, size=(16, 8))
        if is_defect[index]:
            cells[rng.integers(16)] += 4.0 * np.eye(8)[index % 2]
        features.append(torch.tensor(cells, dtype=torch.float32))
    return features, is_defect


def test_the_prior_is_leave_fold_out_so_a_defect_tagged_good_cannot_hide_in_the_bank() -> None:
    features, is_defect = _synthetic_features()
    tagged_good = ~is_defect
    wrong = np.flatnonzero(is_defect)[:2]  # two defect images tagged good
    tagged_good[wrong] = True
    folds = assign_folds(len(features), 5, seed=0)
    scores = leave_fold_out_prior(features, tagged_good, folds, bank_size=64)
    truly_good = np.flatnonzero(~is_defect)
    assert scores[wrong].min() > scores[truly_good].max()  # found: their defect is unlike every other good image
    # A bank of every good-tagged image (as the checkpoint's is) would hide them: each finds itself in it.
    bank = torch.cat([features[j] for j in np.flatnonzero(tagged_good)])
    assert max(float(torch.cdist(features[i], bank).min(1).values.max()) for i in wrong) < 1e-2


def test_a_defect_tagged_good_does_not_vouch_for_the_defects_of_its_kind() -> None:
    """Through the other folds' banks, a defect image tagged good makes the real defects of its kind
    look normal; the second pass leaves it out of the banks."""
    features, is_defect = _synthetic_features(count=90, seed=2)
    good = ~is_defect
    wrong = np.flatnonzero(is_defect)[0]
    good[wrong] = True
    kind = np.arange(90) % 2 == wrong % 2
    same_kind = np.flatnonzero(is_defect & kind & (np.arange(90) != wrong))
    folds = assign_folds(90, 5, seed=0)
    one_pass = leave_fold_out_prior(features, good, folds, bank_size=64)
    two_pass, left_out = good_prior_distances(features, good, folds, bank_size=64)
    assert left_out == 1
    hidden = [i for i in same_kind if folds[i] != folds[wrong]]
    truly_good = np.flatnonzero(~is_defect)
    assert one_pass[hidden].min() < one_pass[truly_good].max()  # one pass: some hide among the good images
    assert two_pass[hidden].min() > 2 * two_pass[truly_good].max()  # two passes: every one stands out


def test_suspects_are_ranked_with_reasons_even_when_the_classifier_learnt_the_wrong_tag() -> None:
    features, is_defect = _synthetic_features(seed=1)
    tags = np.where(is_defect, "defect", "good")
    defect_as_good, good_as_defect = np.flatnonzero(is_defect)[0], np.flatnonzero(~is_defect)[0]
    tags[defect_as_good], tags[good_as_defect] = "good", "defect"
    prior, _ = good_prior_distances(features, tags == "good", assign_folds(len(features), 5, 0), bank_size=64)
    # The classifier learnt every tag by heart, the two wrong ones included.
    evidence = [ImageEvidence(i, f"img{i}", str(tags[i]), 0.95 if tags[i] == "defect" else 0.05, float(prior[i]))
                for i in range(len(tags))]
    ranked = rank_suspects(evidence)
    assert {ranked[0].image_id, ranked[1].image_id} == {defect_as_good, good_as_defect}
    assert ranked[0].suspicion > ranked[2].suspicion
    by_id = {s.image_id: s for s in ranked}
    assert by_id[defect_as_good].suggested_tag == "defect"
    assert by_id[defect_as_good].reason.startswith("tagged good, but the good-image prior finds a spot unlike")
    assert by_id[good_as_defect].reason.startswith("tagged defect, but the good-image prior finds nothing unusual")
    assert "classifier defect probability 0.95" in by_id[good_as_defect].reason  # named among the agreeing signals


def test_calibration_is_monotone_and_follows_the_tags() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    tags = np.array([0, 0, 1, 0, 0, 1, 1, 1], bool)
    calibrated = calibrate(scores, tags)
    assert np.all(np.diff(calibrated) >= 0) and calibrated[0] == 0.0 and calibrated[-1] == 1.0
    assert calibrated[2] == calibrated[3] == calibrated[4] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------- decisions
def _tiny_project(tmp_path: Path) -> Project:
    images = tmp_path / "images"
    images.mkdir()
    project = Project.create(tmp_path / "project", images)
    project.add_images({"rel_path": f"img{i}.png", "sha256": f"hash{i}", "width": 6, "height": 4, "channels": 1,
                        "bit_depth": 8, "tag": "defect" if i % 2 else "good", "tag_source": "csv"} for i in range(4))
    return project


def test_confirm_flip_and_undo_are_one_action_each(tmp_path: Path) -> None:
    with _tiny_project(tmp_path) as project:
        good, defect, other_good, _ = project.images()
        flipped = flip_tags(project, [good.id, defect.id])
        assert [r.decision for r in flipped.reviews] == ["flipped", "flipped"]
        assert project.image(good.id).tag == "defect" and project.image(defect.id).tag == "good"
        assert project.tag_history(good.id)[-1][:2] == ("defect", "user")
        confirm_tags(project, [other_good.id])
        assert project.settled_tags() == {good.id: "defect", defect.id: "good", other_good.id: "good"}
        undone = undo_last(project)  # the confirmation
        assert [r.decision for r in undone.reviews] == ["confirmed"] and project.image(other_good.id).tag == "good"
        assert other_good.id not in project.settled_tags()
        undo_last(project)  # both flips, together
        assert project.image(good.id).tag == "good" and project.image(defect.id).tag == "defect"
        assert project.settled_tags() == {} and undo_last(project).messages == ["no confirm or flip to undo."]
        # A flip whose image was retagged since cannot be undone: refused, nothing changes.
        flip_tags(project, [good.id])
        project.set_tags([good.id], "untagged")
        with pytest.raises(ProjectError, match="has been tagged untagged since. Nothing was undone"):
            undo_last(project)
        assert project.image(good.id).tag == "untagged" and len(project.tag_reviews()) == 1
        with pytest.raises(ProjectError, match="not tagged good or defect"):
            confirm_tags(project, [good.id])


def test_flipping_a_defect_with_an_edited_mask_is_refused_and_loses_nothing(tmp_path: Path) -> None:
    with _tiny_project(tmp_path) as project:
        _, defect, _, other_defect = project.images()
        project.create_round({})
        drawn = np.zeros((4, 6), bool)
        drawn[1:3, 2:5] = True
        for image in project.images():
            project.save_mask_proposal(image.id, 0, np.zeros((4, 6), bool), "test")
        edited = project.save_edited_mask(defect.id, 0, drawn)
        with pytest.raises(DataError, match=r"has a mask you edited in round 0 with 6 defect pixel\(s\).*Nothing was changed"):
            flip_tags(project, [other_defect.id, defect.id])
        assert project.image(defect.id).tag == project.image(other_defect.id).tag == "defect"
        assert project.tag_reviews() == []
        forced = flip_tags(project, [defect.id], force=True)
        assert project.image(defect.id).tag == "good"
        assert forced.messages == [f"{defect.stem}: your edited mask of round 0 (6 defect pixel(s)) is kept as it is."]
        record = project.mask_record(defect.id, 0)
        assert record.state == "edited" and record.sha256 == edited.sha256
        assert np.array_equal(project.load_mask(record), drawn)


# ----------------------------------------------------------------------------------------- the CLI on a real project
@pytest.fixture(scope="module")
def flipped_project(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """The demo tagged from labels.csv, four tags flipped (two each way), a tiny classifier trained on them."""
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.ml.models import ClassifierConfig
    from defect_studio.project.importer import import_job

    project_dir = tmp_path_factory.mktemp("mislabels") / "project"
    with Project.create(project_dir, demo_dataset / "images") as project:
        run_job(import_job(project, demo_dataset / "images", demo_dataset / "labels.csv", CancelToken()))
        wrong = project.images("good")[:2] + project.images("defect")[:2]
        for image in wrong:
            project.set_tags([image.id], "defect" if image.tag == "good" else "good", source="csv")
        run_job(train_project_classifier_job(project, ClassifierConfig(**CLASSIFIER), CancelToken(), device="cpu"))
    return project_dir, {image.stem for image in wrong}


def _json_result(output: str) -> dict:
    return json.loads(output[output.index("{\n"):])  # after the one-line JSON progress events


def test_mislabels_cli_ranks_confirms_flips_and_undoes(flipped_project, capsys: pytest.CaptureFixture[str]) -> None:
    project_dir, wrong = flipped_project
    assert cli_main(["mislabels", str(project_dir), "--json", "--min-suspicion", "0", "--top", "1000"]) == 0
    listing = _json_result(capsys.readouterr().out)
    suspects = listing["suspects"]
    assert listing["signals"] == ["classifier", "good_prior"] and len(suspects) == 80
    assert [s["rank"] for s in suspects] == list(range(1, 81))
    assert all(a["suspicion"] >= b["suspicion"] for a, b in zip(suspects, suspects[1:]))
    ranks = {s["stem"]: s["rank"] for s in suspects}
    assert np.mean([ranks[stem] for stem in wrong]) < 40  # above the middle (random order: 40.5)
    assert all(s["reason"].startswith(f"tagged {s['tag']}, but ") for s in suspects)
    # The ranking is saved: listing again computes nothing (no progress events) and gives the same order.
    assert cli_main(["mislabels", str(project_dir), "--min-suspicion", "0", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("80 suspect tag(s)") and f"   1. {suspects[0]['stem']} (id {suspects[0]['image_id']})" in text
    assert "ranking the tags" not in text

    top, second = suspects[0], suspects[1]
    assert cli_main(["mislabels", str(project_dir), "--confirm", top["stem"]]) == 0
    assert "1 tag(s) confirmed" in capsys.readouterr().out
    assert cli_main(["mislabels", str(project_dir), "--flip", str(second["image_id"])]) == 0
    assert "1 tag(s) flipped" in capsys.readouterr().out
    with Project.open(project_dir) as project:
        assert project.image(second["image_id"]).tag == second["suggested_tag"]
        remaining = [s["image_id"] for s in open_suspects(project, min_suspicion=0.0)]
        assert top["image_id"] not in remaining and second["image_id"] not in remaining and len(remaining) == 78
    assert cli_main(["mislabels", str(project_dir), "--undo"]) == 0
    assert f"undone: {second['stem']} back to {second['tag']}" in capsys.readouterr().out
    assert cli_main(["mislabels", str(project_dir), "--undo"]) == 0
    with Project.open(project_dir) as project:
        assert project.image(second["image_id"]).tag == second["tag"]
        assert len(open_suspects(project, min_suspicion=0.0)) == 80
    assert cli_main(["mislabels", str(project_dir), "--flip", "no-such-image"]) == 2
    assert "no such image" in capsys.readouterr().err


def test_mislabels_without_a_classifier_is_a_clear_message(demo_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["mislabels", str(demo_project)]) == 2
    assert "classifier" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- the benchmark
def test_mislabel_bench_on_the_demo_finds_flipped_tags(demo_dataset: Path, tmp_path: Path) -> None:
    from defect_studio.bench import mislabels
    from defect_studio.bench.options import BENCH_NAMES

    assert "mislabels" in BENCH_NAMES
    overrides = {k: v for k, v in CLASSIFIER.items() if k != "seed"}
    result = mislabels.run(demo_dataset, False, tmp_path, seed=0, overrides=overrides, top=10, fraction=0.1,
                           report_name="mislabels-demo")
    report = json.loads((tmp_path / "mislabels-demo.json").read_text())
    assert (tmp_path / "mislabels-demo.md").is_file()
    flipped = report["flipped"]
    assert len(flipped) == 6 == len(set(flipped))  # 10 % of the 60 training images
    queue, classifier_alone, prior_alone = result["rows"]
    assert queue["ranking"] == "mislabel queue" and queue["flipped"] == 6
    assert queue["in top N"] == sum(stem in flipped for stem in result["order"][:10])
    assert sum(d["in top N"] for d in result["directions"]) == queue["in top N"]
    assert sum(d["flipped"] for d in result["directions"]) == 6
    assert queue["random@N"] == pytest.approx(1.0)  # 6 flipped × 10 / 60
    assert queue["in top N"] >= 2 and queue["AUROC"] > 0.65  # better than random order (1 and 0.5)
