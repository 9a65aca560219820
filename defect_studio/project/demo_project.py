"""The demo project: the synthetic demo dataset imported into a ready, tagged project."""

from __future__ import annotations

from pathlib import Path

from defect_studio.dataset_layout import read_label_csv
from defect_studio.demo import make_demo_dataset
from defect_studio.jobs import CancelToken, run_job
from defect_studio.project.importer import import_job
from defect_studio.project.store import Project


def default_demo_dir() -> Path:
    return Path.home() / "defect-studio-demo"


def make_demo_project(out_dir: str | Path | None = None, count: int = 240, seed: int = 0) -> Path:
    """Make (or reuse) OUT/dataset in the dataset layout and OUT/project tagged from its labels.csv;
    returns the project folder. Running it again changes nothing."""
    out = Path(out_dir) if out_dir is not None else default_demo_dir()
    dataset = out / "dataset"
    if not all((dataset / name).is_file() for name in ("labels.csv", "split.csv", "metadata.csv")):
        make_demo_dataset(dataset, count=count, seed=seed)  # absent, or its writing was interrupted
    project_dir = out / "project"
    # A demo whose preparation was killed midway is completed (import only adds what is missing);
    # a complete one is left exactly as the user left it.
    with Project.open_or_create(project_dir, dataset / "images") as project:
        expected = len(read_label_csv(dataset / "labels.csv")[0])
        if len(project.images()) < expected:
            run_job(import_job(project, dataset / "images", dataset / "labels.csv", CancelToken()))
    return project_dir
