"""Determinism on CPU: the same seed and data give the same classifier (metrics and weights), the
same CAMs and the same pseudo-label masks, byte for byte. (Where CUDA differs: docs/data-safety.md.)"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest
import torch  # a dependency, not an option: a broken install fails here instead of skipping

from defect_studio.jobs import CancelToken, run_job
from defect_studio.project import Project


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models: more threads only contend on a busy machine (and results must not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def twin_projects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two projects of the same small synthetic data, each trained once with the same seed
    (in different folders, so nothing but the data and the seed is shared)."""
    from defect_studio.demo import make_demo_dataset
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.ml.models import ClassifierConfig
    from defect_studio.project.importer import import_job

    root = tmp_path_factory.mktemp("determinism")
    dataset = make_demo_dataset(root / "dataset", count=20, size=48, seed=1)
    projects = []
    with one_thread():
        for name in ("first", "second"):
            project_dir = root / name
            with Project.create(project_dir, dataset / "images") as project:
                run_job(import_job(project, dataset / "images", dataset / "labels.csv", CancelToken()))
                config = ClassifierConfig(arch="compact", epochs=2, min_epochs=1, input_size=32, width=4, batch_size=8, seed=3)
                run_job(train_project_classifier_job(project, config, CancelToken(), device="cpu"))
            projects.append(project_dir)
    return projects[0], projects[1]


def _latest_run(project_dir: Path):  # type: ignore[no-untyped-def]
    with Project.open(project_dir) as project:
        return project.latest_run("classifier")


def _without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "second" not in k}


def test_the_same_seed_and_data_give_the_same_classifier(twin_projects):
    first, second = (_latest_run(p) for p in twin_projects)
    assert _without_timings(first.metrics) == _without_timings(second.metrics) and first.seed == second.seed == 3
    assert first.dataset_hashes == second.dataset_hashes
    a = torch.load(first.checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(second.checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_classifier_gives_the_same_cams_and_pseudo_masks(twin_projects):
    from defect_studio.ml.pseudo import pseudo_job

    masks = []
    with one_thread():
        for project_dir in twin_projects:
            with Project.open(project_dir) as project:
                round_index = project.create_round({"method": "region-aware"}).index
                run_job(pseudo_job(project, round_index, "region-aware", None, CancelToken()))
                masks.append({project.image(r.image_id).stem: (r.state, r.sha256, r.flagged)
                              for r in project.mask_records(round_index)})
    assert masks[0] and masks[0] == masks[1]


def test_a_different_seed_gives_a_different_classifier(twin_projects, tmp_path: Path):
    """The equality above is not vacuous: the seed does reach the weights."""
    from defect_studio.ml.classifier import train_project_classifier_job
    from defect_studio.ml.models import ClassifierConfig

    from defect_studio.project.importer import import_job

    dataset = twin_projects[0].parent / "dataset"
    with one_thread(), Project.create(tmp_path / "other", dataset / "images") as project:
        run_job(import_job(project, dataset / "images", dataset / "labels.csv", CancelToken()))
        config = ClassifierConfig(arch="compact", epochs=2, min_epochs=1, input_size=32, width=4, batch_size=8, seed=4)
        run_job(train_project_classifier_job(project, config, CancelToken(), device="cpu"))
        other = project.latest_run("classifier")
    a = torch.load(_latest_run(twin_projects[0]).checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(other.checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], b[k]) for k in a)
