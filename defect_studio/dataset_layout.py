"""The dataset layout the benchmarks and `import --labels` read.

    DATASET/images/<stem>.<ext>   any readable image
    DATASET/masks/<stem>.png      0 background, 255 defect (ground truth, evaluation only)
    DATASET/labels.csv            stem,label     label in {good, defect}
    DATASET/split.csv             stem,split     split in {train, test}   (optional)
    DATASET/metadata.csv          stem,...,defect_type,...                (optional)

When split.csv is absent, a seeded stratified split is made (`stratified_split`).
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from defect_studio.errors import DataError
from defect_studio.imageio import IMAGE_EXTENSIONS, read_mask

LABELS = ("good", "defect")
GOOD_NAMES = frozenset({"good", "ok", "normal", "pass", "okay"})
DEFECT_NAMES = frozenset({"defect", "defective", "ng", "bad", "nok", "fail", "anomaly"})


def normalise_label(text: str) -> str | None:
    """'OK', 'ng', 'Defect'... -> 'good' / 'defect'; None if the word is not a known tag."""
    word = text.strip().lower()
    if word in GOOD_NAMES:
        return "good"
    if word in DEFECT_NAMES:
        return "defect"
    return None


@dataclass(frozen=True)
class DatasetSample:
    stem: str
    image_path: Path
    label: str  # "good" | "defect"
    split: str  # "train" | "test"
    mask_path: Path | None  # ground truth, evaluation only
    defect_type: str | None

    def truth(self, shape: tuple[int, int]) -> np.ndarray:
        """The ground-truth mask at `shape`; all background when the dataset has no mask for it."""
        return read_mask(self.mask_path, shape) if self.mask_path else np.zeros(shape, bool)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read the CSV file ({error}).") from error


def read_label_csv(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """`stem,label` rows -> ({stem: good|defect}, problems). A header row is optional."""
    path = Path(path)
    labels: dict[str, str] = {}
    problems: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: cannot read the label file (it is not UTF-8 text: {error.reason} at byte {error.start})."
        ) from error
    except (OSError, csv.Error) as error:
        raise DataError(f"{path}: cannot read the label file ({error}).") from error
    for line_number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            problems.append(f"line {line_number}: expected 'stem,label', got {','.join(row)!r}")
            continue
        stem, raw_label = row[0].strip(), row[1].strip()
        if line_number == 1 and stem.lower() in ("stem", "name", "image", "file", "filename"):
            continue
        label = normalise_label(raw_label)
        if label is None:
            problems.append(f"line {line_number}: unknown label {raw_label!r} for {stem!r} (use good or defect)")
            continue
        labels[Path(stem).stem if Path(stem).suffix.lower() in IMAGE_EXTENSIONS else stem] = label
    return labels, problems


def stratified_split(labels: Mapping[str, str], fraction: float, seed: int) -> dict[str, bool]:
    """Pick `fraction` of each class, reproducibly: {key: True if held out}."""
    rng = random.Random(seed)
    held_out: dict[str, bool] = {}
    for label in sorted(set(labels.values())):
        keys = sorted(k for k, v in labels.items() if v == label)
        rng.shuffle(keys)
        count = int(round(len(keys) * fraction))
        if len(keys) >= 2:
            count = min(max(count, 1), len(keys) - 1)
        else:
            count = 0
        for index, key in enumerate(keys):
            held_out[key] = index < count
    return held_out


def load_dataset(root: str | Path, seed: int = 0, test_fraction: float = 0.3) -> list[DatasetSample]:
    """All labelled samples of a dataset folder, sorted by stem."""
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(f"{root}: no images/ folder; see the dataset layout in the README.")
    labels_file = root / "labels.csv"
    if not labels_file.is_file():
        raise DataError(f"{root}: no labels.csv (stem,label with good|defect).")
    labels, problems = read_label_csv(labels_file)
    if problems:
        raise DataError(f"{labels_file}: " + "; ".join(problems[:5]))
    image_paths = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
    missing = sorted(set(labels) - set(image_paths))
    if missing:
        raise DataError(f"{labels_file}: {len(missing)} labelled stems have no image, e.g. {missing[:3]}.")
    split_file = root / "split.csv"
    if split_file.is_file():
        splits = {row["stem"]: row["split"] for row in read_csv_rows(split_file)}
        unknown = sorted({s for s in splits.values() if s not in ("train", "test")})
        if unknown:
            raise DataError(f"{split_file}: unknown split names {unknown} (use train or test).")
    else:
        held_out = stratified_split(labels, test_fraction, seed)
        splits = {stem: "test" if held_out[stem] else "train" for stem in labels}
    defect_types: dict[str, str] = {}
    metadata_file = root / "metadata.csv"
    if metadata_file.is_file():
        defect_types = {r["stem"]: r["defect_type"] for r in read_csv_rows(metadata_file) if r.get("defect_type")}
    samples = []
    for stem in sorted(labels):
        mask = root / "masks" / f"{stem}.png"
        samples.append(
            DatasetSample(
                stem=stem,
                image_path=image_paths[stem],
                label=labels[stem],
                split=splits.get(stem, "train"),
                mask_path=mask if mask.is_file() else None,
                defect_type=defect_types.get(stem) if labels[stem] == "defect" else None,
            )
        )
    return samples


def check_two_classes(labels: Iterable[str], what: str = "training") -> None:
    """Raise a clear DataError unless both good and defect examples are present."""
    counts = {label: 0 for label in LABELS}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if counts["good"] == 0 or counts["defect"] == 0:
        raise DataError(
            f"{what} needs images tagged both good and defect; found {counts['good']} good and "
            f"{counts['defect']} defect. Tag some images of the missing class first."
        )
