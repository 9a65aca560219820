"""The synthetic demo dataset: complete layout, determinism, masks that agree with the images."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from defect_studio.dataset_layout import load_dataset
from defect_studio.demo import ALTERATION_THRESHOLD, DEFECT_KINDS, DEMO_MARKER, PlannedImage, make_demo_dataset, render_image
from defect_studio.errors import DataError
from defect_studio.imageio import decode_image, read_mask


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo80(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "dataset", count=80, size=96, seed=0)


def test_layout_is_complete_and_loads(demo80: Path) -> None:
    assert isinstance(demo80, Path)
    samples = load_dataset(demo80)
    assert len(samples) == 80
    assert len({s.stem for s in samples}) == 80
    assert {p.name for p in demo80.iterdir()} == {"images", "masks", "labels.csv", "split.csv", "metadata.csv", DEMO_MARKER}
    assert len(list((demo80 / "images").glob("*.png"))) == 80
    assert len(list((demo80 / "masks").glob("*.png"))) == 80
    assert [r["stem"] for r in _rows(demo80 / "labels.csv")] == [r["stem"] for r in _rows(demo80 / "metadata.csv")]
    assert list(_rows(demo80 / "metadata.csv")[0]) == ["stem", "label", "defect_type", "width", "height", "mask_pixels"]
    for sample in samples:
        family, number = sample.stem.split("_")
        assert family in ("metal", "weave", "ceramic") and number.isdigit()
        assert sample.mask_path is not None
        assert (sample.defect_type in DEFECT_KINDS) == (sample.label == "defect")
    assert {s.stem.split("_")[0] for s in samples} == {"metal", "weave", "ceramic"}


def test_masks_match_images_and_metadata(demo80: Path) -> None:
    for row in _rows(demo80 / "metadata.csv"):
        pixels, info = decode_image(demo80 / "images" / f"{row['stem']}.png")
        mask_pixels, _ = decode_image(demo80 / "masks" / f"{row['stem']}.png")
        assert mask_pixels.dtype == np.uint8 and set(np.unique(mask_pixels)) <= {0, 255}
        mask = read_mask(demo80 / "masks" / f"{row['stem']}.png", shape=pixels.shape[:2])
        assert (info.width, info.height) == (int(row["width"]), int(row["height"]))
        assert int(mask.sum()) == int(row["mask_pixels"])
        if row["label"] == "good":
            assert row["defect_type"] == "none" and not mask.any()
        else:
            assert row["defect_type"] in DEFECT_KINDS and mask.sum() >= 3


def test_splits_hold_both_classes_about_a_quarter_test(demo80: Path) -> None:
    samples = load_dataset(demo80)
    by_split = Counter((s.split, s.label) for s in samples)
    for split in ("train", "test"):
        for label in ("good", "defect"):
            assert by_split[(split, label)] > 0, (split, label)
    test_share = sum(1 for s in samples if s.split == "test") / len(samples)
    assert 0.2 <= test_share <= 0.3
    defect_share = sum(1 for s in samples if s.label == "defect") / len(samples)
    assert 0.3 <= defect_share <= 0.5


def test_gray_and_rgb_images_and_varied_aspect_ratios(demo80: Path) -> None:
    channels = Counter()
    aspects = set()
    for path in sorted((demo80 / "images").glob("*.png")):
        pixels, info = decode_image(path)
        assert pixels.dtype == np.uint8 and info.bit_depth == 8
        channels[info.channels] += 1
        aspects.add(round(info.width / info.height, 2))
        assert 0.85 * 96 - 1 <= info.width <= 1.25 * 96 + 1 and 0.85 * 96 - 1 <= info.height <= 1.25 * 96 + 1
    assert set(channels) == {1, 3}
    assert 0.2 <= channels[3] / sum(channels.values()) <= 0.45
    assert len(aspects) > 10
    assert min(aspects) < 0.95 and max(aspects) > 1.05


def test_every_defect_type_present(demo80: Path) -> None:
    kinds = Counter(r["defect_type"] for r in _rows(demo80 / "metadata.csv") if r["label"] == "defect")
    assert set(kinds) == set(DEFECT_KINDS)


def test_defects_are_visible_and_mask_is_exactly_the_change() -> None:
    # The same (seed, index) rendered as good and as defect share the surface; they differ only in the mask.
    for index, kind in enumerate(DEFECT_KINDS * 2):
        good, good_mask = render_image(PlannedImage(index, f"metal_{index:04d}", "metal", None, False), 96, 7)
        rendered, mask = render_image(PlannedImage(index, f"metal_{index:04d}", "metal", kind, False), 96, 7)
        assert not good_mask.any() and mask.any()
        assert good.shape == rendered.shape == mask.shape
        difference = np.abs(rendered.astype(np.int16) - good.astype(np.int16))
        assert difference[~mask].max() == 0, kind
        # Well above the sensor noise and texture: the median change inside the mask is clearly visible.
        assert np.median(difference[mask]) > 2 * ALTERATION_THRESHOLD * 255, kind


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    first = _all_bytes(make_demo_dataset(tmp_path / "a", count=40, size=64, seed=3))
    second = _all_bytes(make_demo_dataset(tmp_path / "b", count=40, size=64, seed=3))
    other = _all_bytes(make_demo_dataset(tmp_path / "c", count=40, size=64, seed=4))
    assert len(first) == 40 * 2 + 3 + 1  # images and masks, three CSVs, the demo marker
    assert first == second
    differing_images = [k for k in first if k.startswith("images") and other.get(k) != first[k]]
    assert len(differing_images) > 30


def test_rerun_into_same_folder_replaces_an_earlier_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    make_demo_dataset(out, count=40, size=48, seed=1)
    make_demo_dataset(out, count=20, size=48, seed=1)
    assert len(list((out / "images").glob("*.png"))) == 20
    assert len(load_dataset(out)) == 20


def test_refuses_a_folder_with_other_files_and_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "holiday.jpg").write_bytes(b"not mine")
    with pytest.raises(DataError, match="holiday.jpg"):
        make_demo_dataset(tmp_path, count=20)
    assert (tmp_path / "holiday.jpg").read_bytes() == b"not mine"
    # A real dataset in the same layout (no demo metadata.csv) is never overwritten either.
    real = tmp_path / "real"
    (real / "images").mkdir(parents=True)
    (real / "images" / "metal_0001.png").write_bytes(b"a real photo")
    (real / "labels.csv").write_text("stem,label\nmetal_0001,good\n")
    with pytest.raises(DataError, match="not an earlier demo"):
        make_demo_dataset(real, count=20)
    assert (real / "images" / "metal_0001.png").read_bytes() == b"a real photo"
    with pytest.raises(DataError):
        make_demo_dataset(tmp_path / "x", count=2)
    with pytest.raises(DataError):
        make_demo_dataset(tmp_path / "y", count=20, defect_fraction=1.0)


def test_the_demo_project_job_reports_each_image_and_a_cancelled_one_is_completed_next_time(tmp_path: Path) -> None:
    """One job for `defect-studio demo` and the window's File ▸ Open the demo project: progress per image,
    a cancel honoured, and a demo stopped midway finished by the next run."""
    from defect_studio.jobs import CancelToken, JobCancelled, ProgressKind, run_job
    from defect_studio.project import Project
    from defect_studio.project.demo_project import demo_project_exists, demo_project_job

    cancel, events = CancelToken(), []

    def cancel_after_three(event) -> None:  # type: ignore[no-untyped-def]
        events.append(event)
        if event.stage == "demo images" and event.step == 3:
            cancel.cancel()

    with pytest.raises(JobCancelled):
        run_job(demo_project_job(tmp_path, cancel, count=12), cancel_after_three)
    assert [e.step for e in events if e.stage == "demo images"] == [1, 2, 3]
    assert all(e.kind == ProgressKind.STEP and e.total == 12 for e in events)
    assert not (tmp_path / "dataset" / "labels.csv").exists() and not demo_project_exists(tmp_path)

    events.clear()
    project_dir = run_job(demo_project_job(tmp_path, CancelToken(), count=12), events.append)
    assert demo_project_exists(tmp_path) and project_dir == tmp_path / "project"
    assert {e.stage for e in events} >= {"demo images"}
    with Project.open(project_dir) as project:
        assert len(project.images()) == 12 and {i.tag for i in project.images()} == {"good", "defect"}
