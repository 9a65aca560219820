"""The demo project: the synthetic demo dataset imported into a ready, tagged project."""

from __future__ import annotations

from pathlib import Path
from typing import Generator

from defect_studio.dataset_layout import read_label_csv
from defect_studio.demo import demo_dataset_job
from defect_studio.jobs import CancelToken, Progress, run_job
from defect_studio.project.importer import import_job
from defect_studio.project.store import DB_NAME, Project


def default_demo_dir() -> Path:
    return Path.home() / "defect-studio-demo"


def demo_project_exists(out_dir: str | Path | None = None) -> bool:
    """Whether OUT/project is a project already (the window opens it without making anything)."""
    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    return (out / "project" / DB_NAME).is_file()


def demo_project_job(
    out_dir: str | Path | None, cancel: CancelToken, count: int = 240, seed: int = 0,
) -> Generator[Progress, None, Path]:
    """Make (or reuse) OUT/dataset in the dataset layout and OUT/project tagged from its labels.csv;
    returns the project folder. Running it again changes nothing. The job of `defect-studio demo` and of
    the window's File ▸ Open the demo project."""
    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    dataset = out / "dataset"
    if not all((dataset / name).is_file() for name in ("labels.csv", "split.csv", "metadata.csv")):
        yield from demo_dataset_job(dataset, cancel, count=count, seed=seed)  # absent, or its writing was interrupted
    project_dir = out / "project"
    # A demo whose preparation was killed midway is completed (import only adds what is missing);
    # a complete one is left exactly as the user left it.
    with Project.open_or_create(project_dir, dataset / "images") as project:
        expected = len(read_label_csv(dataset / "labels.csv")[0])
        if len(project.images()) < expected:
            yield from import_job(project, dataset / "images", dataset / "labels.csv", cancel)
    return project_dir


def make_demo_project(out_dir: str | Path | None = None, count: int = 240, seed: int = 0) -> Path:
    """`demo_project_job` run to its end (no progress shown)."""
    return run_job(demo_project_job(out_dir, CancelToken(), count, seed))
