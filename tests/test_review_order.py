"""The "edit these first" order (issue 16, item 1): the pure ranking, the store, and the job on the demo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from defect_studio.errors import DataError, ProjectError
from defect_studio.jobs import CancelToken, JobCancelled, run_job
from defect_studio.ml.review_order import (
    ImageSignals,
    kmeans,
    mask_iou,
    order_for_review,
    percentiles,
    rank_for_review,
    review_order_job,
    uncertainty_around,
)
from defect_studio.project import Project
from defect_studio.project.store import ReviewOrderEntry


# ----------------------------------------------------------------------------------------- the pure ranking
def _groups(sizes: list[int], seed: int = 0) -> list[np.ndarray]:
    """Features of well-separated groups: group g near the g-th unit vector."""
    rng = np.random.default_rng(seed)
    features = []
    for group, size in enumerate(sizes):
        centre = np.zeros(8)
        centre[group] = 1.0
        for _ in range(size):
            vector = centre + rng.normal(0, 0.02, 8)
            features.append(vector / np.linalg.norm(vector))
    return features


def _signals(features: list[np.ndarray], confidence: list[float], states: list[str] | None = None,
             **extra: list[float]) -> list[ImageSignals]:
    states = states or ["proposed"] * len(features)
    return [ImageSignals(i, f"img{i}", states[i], feature, confidence[i],
                         **{name: values[i] for name, values in extra.items()})
            for i, feature in enumerate(features)]


def test_percentiles_rank_values_and_share_ties() -> None:
    assert percentiles([3.0, 1.0, 2.0]).tolist() == [1.0, 0.0, 0.5]
    assert percentiles([1.0, 1.0, 2.0]).tolist() == [0.25, 0.25, 1.0]
    assert percentiles([5.0]).tolist() == [0.5]


def test_kmeans_finds_separated_groups_deterministically() -> None:
    features = np.stack(_groups([10, 10, 10]))
    labels = kmeans(features, 3, seed=1)
    assert len(set(labels[:10])) == len(set(labels[10:20])) == len(set(labels[20:])) == 1
    assert len(set(labels.tolist())) == 3
    assert np.array_equal(labels, kmeans(features, 3, seed=1))


def test_the_head_of_the_queue_covers_every_group_in_proportion() -> None:
    # Group 0 (40 images) scores highest on every signal; a plain sort would give it the whole head.
    features = _groups([40, 40, 20])
    confidence = [0.99] * 40 + [0.6] * 40 + [0.5] * 20
    items = order_for_review(_signals(features, confidence))
    groups = [item.image_id // 40 if item.image_id < 80 else 2 for item in items]
    assert [item.rank for item in items] == list(range(1, 101))
    head = groups[:10]
    assert head.count(0) == 4 and head.count(1) == 4 and head.count(2) == 2
    assert sorted(item.image_id for item in items) == list(range(100))
    assert all(item.reason and "group" in item.reason for item in items)
    assert all(0.0 <= item.score <= 1.0 for item in items)


def test_edited_masks_cover_their_group_and_only_proposed_masks_are_ranked() -> None:
    features = _groups([20, 20])
    states = ["edited"] * 6 + ["proposed"] * 14 + ["rejected"] + ["proposed"] * 19
    items = order_for_review(_signals(features, [0.9] * 40, states), clusters=2)
    ranked = {item.image_id for item in items}
    assert ranked == {i for i, state in enumerate(states) if state == "proposed"}
    # Group 0 already has 6 edits: the first picks go to group 1 until it catches up.
    assert all(item.image_id >= 20 for item in items[:6])


def test_the_segmenter_signals_lead_within_a_group_and_the_reason_names_them() -> None:
    features = [np.eye(8)[0]] * 30  # alike: typicality ties
    uncertainty = [0.1] * 30
    uncertainty[7] = 0.95
    disagreement = [0.2] * 30
    disagreement[7] = 0.9
    items = order_for_review(_signals(features, [0.9] * 30, uncertainty=uncertainty, disagreement=disagreement,
                                      change=[0.1] * 30), clusters=1)
    assert items[0].image_id == 7
    assert "segmenter is unsure" in items[0].reason and "disagree" in items[0].reason
    assert items[0].signals["raw_uncertainty"] == pytest.approx(0.95)


def test_nothing_to_rank_gives_an_empty_order() -> None:
    assert order_for_review(_signals(_groups([3]), [0.9] * 3, ["edited"] * 3)) == []


def test_mask_iou_and_uncertainty_around_the_predicted_region() -> None:
    first, second = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    assert mask_iou(first, second) == 1.0
    first[:5], second[:, :5] = True, True
    assert mask_iou(first, second) == pytest.approx(25 / 75)
    probability = np.full((40, 40), 0.01)
    probability[10:20, 10:20] = 0.5  # unsure inside
    unsure = uncertainty_around(probability, 0.4, around=2)
    probability[10:20, 10:20] = 0.99  # sure inside
    assert uncertainty_around(probability, 0.4, around=2) < unsure
    assert 0.0 <= uncertainty_around(np.full((8, 8), 0.1), 0.5) <= 1.0  # no region: the most probable pixels


# ----------------------------------------------------------------------------------------- the store
def test_the_order_is_stored_per_round_and_replaced_whole(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    with Project.create(tmp_path / "project", images) as project:
        ids = project.add_images({"rel_path": f"img{i}.png", "sha256": f"hash{i}", "width": 6, "height": 4,
                                  "channels": 1, "bit_depth": 8} for i in range(3))
        with pytest.raises(ProjectError, match="no round 0"):
            project.save_review_order(0, [ReviewOrderEntry(ids[0], 1, 0.5, "why")])
        project.create_round({})
        assert project.review_order(0) == []
        project.save_review_order(0, [ReviewOrderEntry(ids[1], 2, 0.4, "second", {"a": 1.0}),
                                      ReviewOrderEntry(ids[0], 1, 0.9, "first")])
        assert [(e.image_id, e.rank, e.reason) for e in project.review_order(0)] == [(ids[0], 1, "first"), (ids[1], 2, "second")]
        project.save_review_order(0, [ReviewOrderEntry(ids[2], 1, 0.7, "only")])
    with Project.open(tmp_path / "project") as project:
        (entry,) = project.review_order(0)
        assert (entry.image_id, entry.score, entry.signals) == (ids[2], 0.7, {})


# ----------------------------------------------------------------------------------------- on the demo project
CLASSIFIER = dict(arch="compact", width=8, input_size=64, epochs=3, min_epochs=3, batch_size=16, lr=5e-3, seed=0)
SEGMENTER = dict(architecture="unet", channels=[8, 16, 32], crop_size=48, batch_size=8, epochs=2, warm_start_epochs=1,
                 steps_per_epoch=4, learning_rate=1e-2)
PSEUDO = dict(mode="percentile", high_percentile=97.0, low_percentile=90.0, min_area=4)


@pytest.fixture(scope="module")
def ordered_rounds(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two rounds of the loop; each round's review orders the queue first, then edits the top 3 masks."""
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.ml.models import ClassifierConfig
    from defect_studio.ml.refine import RefineConfig, refine_job
    from defect_studio.project import review
    from defect_studio.project.importer import import_job

    project_dir = tmp_path_factory.mktemp("order") / "project"
    orders: dict[int, list] = {}

    def reviewer(project: Project, round_index: int) -> None:
        orders[round_index] = rank_for_review(project, round_index)
        for item in orders[round_index][:3]:
            image = project.image(item.image_id)
            mask = np.zeros((image.height, image.width), bool)
            mask[2:10, 2:10] = True
            review.save_edit(project, image.id, mask, round_index)

    with Project.create(project_dir, demo_dataset / "images") as project:
        run_job(import_job(project, demo_dataset / "images", demo_dataset / "labels.csv", CancelToken()))
        run_job(train_project_classifier_job(project, ClassifierConfig(**CLASSIFIER), CancelToken(), device="cpu"))
        config = RefineConfig(method="gradcam", pseudo=PSEUDO, segmenter=SEGMENTER, stop_change=0.0)
        run_job(refine_job(project, 2, CancelToken(), reviewer, None, config))
    return project_dir, orders


def test_each_round_orders_every_proposed_defect_mask_and_stores_it(ordered_rounds) -> None:
    project_dir, orders = ordered_rounds
    with Project.open(project_dir) as project:
        defects = {image.id for image in project.images("defect")}
        first, second = orders[0], orders[1]
        assert {item.image_id for item in first} == defects  # round 0: every defect mask is proposed
        # round 1: the three masks edited in round 0 are carried forward, decided: not in the queue
        edited_before = {item.image_id for item in first[:3]}
        assert {item.image_id for item in second} == defects - edited_before
        assert {"uncertainty", "disagreement", "change"} <= set(second[0].signals)
        assert "uncertainty" not in first[0].signals  # no segmenter before round 0
        stored = project.review_order(1)
        assert [(e.image_id, e.rank, e.reason) for e in stored] == [(i.image_id, i.rank, i.reason) for i in second]


def test_bad_input_gets_a_clear_message(ordered_rounds, tmp_path: Path) -> None:
    import shutil

    from defect_studio.errors import ModelError
    from defect_studio.project import review

    project_dir, _ = ordered_rounds
    shutil.copytree(project_dir, tmp_path / "copy")
    with Project.open(tmp_path / "copy") as project:
        with pytest.raises(ProjectError, match="no round 7"):
            run_job(review_order_job(project, 7, CancelToken()))
        cancel = CancelToken()
        cancel.cancel()
        with pytest.raises(JobCancelled):
            run_job(review_order_job(project, 0, cancel))
        segmenter = next(r for r in project.training_runs("segmenter") if r.round_index == 0)
        Path(segmenter.checkpoint_path).unlink()
        with pytest.raises(ModelError, match="missing from disk"):
            run_job(review_order_job(project, 1, CancelToken()))
        review.reject_rest(project, 1)
        with pytest.raises(DataError, match="no mask left to review"):
            run_job(review_order_job(project, 1, CancelToken()))


def test_the_review_command_lists_the_queue_edit_first_with_reasons(ordered_rounds, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    from defect_studio.cli import main as cli_main

    project_dir, orders = ordered_rounds
    shutil.copytree(project_dir, tmp_path / "copy")
    assert cli_main(["review", str(tmp_path / "copy"), "--order", "edit-first", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["round"] == 1
    # the stored order of round 1, less the three masks edited from its head
    assert [e["image_id"] for e in listed["queue"]] == [item.image_id for item in orders[1][3:]]
    assert [e["rank"] for e in listed["queue"]] == list(range(4, len(orders[1]) + 1))
    assert all(e["reason"] for e in listed["queue"])
    assert cli_main(["review", str(tmp_path / "copy"), "--order", "edit-first", "--rerank", "--round", "1"]) == 0
    text = capsys.readouterr().out
    assert "edit first at the top" in text and "group" in text
    with Project.open(tmp_path / "copy") as project:  # ranked again: the remaining masks from rank 1
        assert [e.rank for e in project.review_order(1)] == list(range(1, len(orders[1]) - 3 + 1))
