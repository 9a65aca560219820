"""The demo project: the synthetic demo dataset imported into a ready, tagged project."""

from __future__ import annotations

from pathlib import Path

from defect_studio.demo import make_demo_dataset
from defect_studio.jobs import CancelToken, run_job
from defect_studio.project.importer import import_job
from defect_studio.project.store import DB_NAME, Project


def default_demo_dir() -> Path:
    return Path.home() / "defect-studio-demo"


def make_demo_project(out_dir: str | Path | None = None, count: int = 240, seed: int = 0) -> Path:
    """Make (or reuse) OUT/dataset in the dataset layout and OUT/project tagged from its labels.csv;
    returns the project folder. Running it again changes nothing."""
    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    dataset = out / "dataset"
    if not (dataset / "labels.csv").is_file():
        make_demo_dataset(dataset, count=count, seed=seed)
    project_dir = out / "project"
    if (project_dir / DB_NAME).is_file():
        return project_dir
    with Project.create(project_dir, dataset / "images") as project:
        run_job(import_job(project, dataset / "images", dataset / "labels.csv", CancelToken()))
    return project_dir
