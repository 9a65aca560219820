"""The README is what a newcomer copies: its commands and its key table must match the code."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_key_table_is_the_apps_shortcut_table():
    from defect_studio.gui.shortcuts import markdown_table

    assert markdown_table() in README


def test_ci_runs_exactly_the_readme_test_command():
    ci_script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    test_command = next(line for line in ci_script.splitlines() if "pytest" in line)
    assert test_command.strip() in README


def test_readme_commands_exist_in_the_cli():
    from defect_studio.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    for command in ("import", "status", "tag", "train", "cam", "pseudo", "review", "refine", "evaluate", "export", "predict", "bench", "demo"):
        assert command in commands
        assert f"defect-studio {command}" in README
