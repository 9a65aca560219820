"""Review rules live in the core: the CLI and the window's review panel call the same functions, so
the same actions give the same mask states (issue 14, item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defect_studio.cli import main as cli_main
from defect_studio.errors import ProjectError
from defect_studio.project import Project, review


def _edit(project: Project, image) -> np.ndarray:
    edit = np.zeros((image.height, image.width), bool)
    edit[2:9, 3:7] = True
    review.save_edit(project, image.id, edit)
    return edit


def test_accepting_an_edited_mask_from_the_cli_keeps_it_edited(reviewed_round: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Project.open(reviewed_round) as project:
        edited, proposed = project.images("defect")[:2]
        edit = _edit(project, edited)
    capsys.readouterr()
    assert cli_main(["review", str(reviewed_round), "--accept", edited.stem, proposed.stem, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["changed"] == [proposed.stem] and printed["unchanged"] == [edited.stem]
    with Project.open(reviewed_round) as project:
        record = project.mask_record(edited.id, 0)
        assert record.state == "edited" and record.source == "human-edit"
        assert np.array_equal(project.load_mask(record), edit)
        assert [state for _, state, *_ in project.mask_history(edited.id, 0)] == ["proposed", "edited"]
        assert project.mask_record(proposed.id, 0).state == "accepted"
        assert project.mask_state_counts()[0]["edited"] == 1  # the rounds table still counts it as an edit


def test_the_cli_and_the_panels_core_call_give_the_same_states(reviewed_round: Path, tmp_path: Path) -> None:
    """The same actions through `defect-studio review` and through review.decide (the window's A/R keys)."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(reviewed_round, twin)
    with Project.open(reviewed_round) as project:
        defects = project.images("defect")[:4]
        _edit(project, defects[0])
        _edit(project, defects[1])
    with Project.open(twin) as project:
        _edit(project, defects[0])
        _edit(project, defects[1])
    actions = [("accepted", 0), ("rejected", 1), ("accepted", 2), ("rejected", 3), ("accepted", 3)]
    for state, i in actions:
        flag = "--accept" if state == "accepted" else "--reject"
        assert cli_main(["review", str(reviewed_round), flag, defects[i].stem]) == 0
    with Project.open(twin) as project:
        for state, i in actions:
            review.decide(project, defects[i].id, state)
    states = []
    for project_dir in (reviewed_round, twin):
        with Project.open(project_dir) as project:
            states.append({r.image_id: (r.state, r.sha256) for r in project.mask_records(round_index=0)})
    assert states[0] == states[1]
    assert [states[0][d.id][0] for d in defects] == ["edited", "rejected", "accepted", "accepted"]


def test_decide_refuses_what_is_not_a_decision(reviewed_round: Path) -> None:
    with Project.open(reviewed_round) as project:
        image = project.images("defect")[0]
        with pytest.raises(ValueError):
            review.decide(project, image.id, "edited")
        untagged = [i for i in project.images() if i.tag == "untagged"]
        if untagged:
            with pytest.raises(ProjectError, match="no mask"):
                review.decide(project, untagged[0].id, "accepted")
