"""`bench full --edit-order`: the simulated user edits the head of the edit-first order; the report says
what the user did with the rest (it said "used as they came" even when the rest was rejected)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defect_studio.bench.full import SimulatedReviewer, report_name, review_note


def test_the_review_note_says_the_rest_was_rejected_when_it_was() -> None:
    rejected = review_note(60, True)
    assert "as they came" not in rejected
    assert "Every other defect proposal was rejected" in rejected and "chosen at random" in rejected
    assert "as they came" in review_note(30, False) and "rejected" not in review_note(30, False)
    assert "edit-first order" in review_note(30, True, "ranked")
    assert review_note(0, False).startswith("Every round's proposals were used as they came")
    assert "as they came" not in review_note(0, True)


def test_ranked_runs_report_under_their_own_name() -> None:
    options = {"edits_per_round": 30, "reject_unedited": True, "edit_order": "ranked"}
    assert report_name(Path("magnetic-tile"), options) == "full-mt-edit30-reject-ranked"
    assert report_name(Path("magnetic-tile"), {**options, "edit_order": "random"}) == "full-mt-edit30-reject"
    assert report_name(Path("magnetic-tile"), {}) == "full-mt"


def test_an_unknown_edit_order_is_refused() -> None:
    with pytest.raises(ValueError, match="random, ranked"):
        SimulatedReviewer([], 3, True, 0, edit_order="best")


@pytest.mark.slow
def test_full_bench_with_the_ranked_order_on_the_demo(demo_dataset: Path, tmp_path: Path) -> None:
    """One quick round: the user edits the head of the stored order, the rest is rejected, no upper bound."""
    from defect_studio.bench import full
    from defect_studio.project import Project

    kept = tmp_path / "kept"
    result = full.run(demo_dataset, True, tmp_path, seed=0, classifier_path=None, as_json=False, rounds=1,
                      method="gradcam", edits_per_round=4, reject_unedited=True, keep_project=kept,
                      edit_order="ranked", upper_bound=False)
    assert result["full"] is None and 0.0 <= result["weak"]["defect_iou"] <= 1.0
    with Project.open(kept) as project:
        head = [entry.image_id for entry in project.review_order(0)[:4]]
        edited = sorted(r.image_id for r in project.mask_records(round_index=0, state="edited"))
        assert sorted(head) == edited == result["edited_images"]
        assert project.mask_state_counts(tag="defect")[0]["proposed"] == 0
    report = json.loads((tmp_path / f"full-{demo_dataset.name}-edit4-reject-ranked-quick.json").read_text())
    assert report["edit_order"] == "ranked" and report["full"] is None
    assert "edit-first order" in " ".join(report["notes"]) and "as they came" not in " ".join(report["notes"])
    assert "edit-first order" in report["weak_seconds"]
