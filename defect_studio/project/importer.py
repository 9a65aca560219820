"""Importing an image folder into a project: recursive, every common format, tags from folder
names or a CSV, duplicates counted once, unreadable files listed (never fatal), re-import safe.

Images larger than the project's limit (`import.max_megapixels`, 300 MP by default, never more
than what every reader accepts, `imageio.MAX_PIXELS`) are refused from their header before any
pixel is decoded, and listed with the reason."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generator

from defect_studio.dataset_layout import normalise_label, read_label_csv
from defect_studio.errors import BadImageError, DataError
from defect_studio.imageio import IMAGE_EXTENSIONS, MAX_PIXELS, decode_image, file_sha256, is_image_file
from defect_studio.jobs import CancelToken, EtaClock, Progress
from defect_studio.project.store import Project

COMMIT_EVERY = 64  # images per transaction: a kill loses at most one batch, and re-import picks it up
IMPORT_LIMIT_SETTING = "import.max_megapixels"
DEFAULT_IMPORT_MEGAPIXELS = MAX_PIXELS / 1e6


def checked_import_megapixels(value: object) -> float:
    """`value` as an import limit in megapixels, or a DataError saying what a limit may be."""
    ceiling = MAX_PIXELS / 1e6
    try:
        megapixels = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(f"the import limit must be a number of megapixels, got {value!r}.") from None
    if not 0 < megapixels <= ceiling:
        raise DataError(
            f"the import limit must be more than 0 and at most {ceiling:g} megapixels (got {megapixels:g}): "
            f"no part of defect-studio decodes a larger image."
        )
    return megapixels


def import_pixel_limit(project: Project) -> int:
    """The largest image (in pixels) this project imports."""
    return int(checked_import_megapixels(project.get_setting(IMPORT_LIMIT_SETTING, DEFAULT_IMPORT_MEGAPIXELS)) * 1e6)


def set_import_megapixels(project: Project, megapixels: object) -> None:
    project.set_setting(IMPORT_LIMIT_SETTING, checked_import_megapixels(megapixels))


@dataclass
class ImportReport:
    found: int = 0
    added: int = 0
    already_known: int = 0
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (file, same content as)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    tagged: dict[str, int] = field(default_factory=lambda: {"folder": 0, "csv": 0})

    def lines(self) -> list[str]:
        out = [
            f"{self.found} image files found: {self.added} added, {self.already_known} already in the project, "
            f"{len(self.duplicates)} duplicates, {len(self.skipped)} skipped.",
            f"tags taken from folder names: {self.tagged['folder']}, from the CSV: {self.tagged['csv']}.",
        ]
        for path, same_as in self.duplicates[:20]:
            out.append(f"  duplicate: {path} (same content as {same_as})")
        for path, reason in self.skipped:
            out.append(f"  skipped: {path}: {reason}")
        return out


def find_image_files(root: Path, exclude: Path | None = None) -> list[Path]:
    """Image files under root, sorted; hidden folders, the project folder and symlinked folders
    (which could loop) are not entered."""
    files: list[Path] = []
    exclude_resolved = exclude.resolve() if exclude is not None else None
    for folder, subfolders, names in os.walk(root, followlinks=False):
        here = Path(folder)
        subfolders[:] = sorted(
            name for name in subfolders
            if not name.startswith(".") and (exclude_resolved is None or (here / name).resolve() != exclude_resolved)
        )
        files.extend(here / name for name in sorted(names) if not name.startswith(".") and is_image_file(name))
    return files


def tag_from_folders(rel_path: Path) -> str | None:
    """The nearest enclosing folder named like a tag (good/ok/normal, defect/ng/bad...) decides."""
    for part in reversed(rel_path.parts[:-1]):
        label = normalise_label(part)
        if label is not None:
            return label
    return None


def read_import_labels(labels_csv: Path, stems: set[str]) -> dict[str, str]:
    """The CSV's tags, checked: unknown labels or stems that match no image are refused up front."""
    try:
        labels, problems = read_label_csv(labels_csv)
    except DataError as error:
        raise DataError(f"{error} Nothing was imported.") from error
    unknown_stems = sorted(set(labels) - stems)
    if unknown_stems:
        problems.append(
            f"{len(unknown_stems)} stems match no image in the folder, e.g. {', '.join(unknown_stems[:5])}"
        )
    if problems:
        raise DataError(f"{labels_csv}: " + "; ".join(problems[:8]) + ". Nothing was imported.")
    return labels


def import_job(project: Project, images_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None,
               cancel: CancelToken) -> Generator[Progress, None, ImportReport]:
    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder.")
    if root.resolve() != project.image_root.resolve():
        raise DataError(f"this project's images are in {project.image_root}, not {root}.")
    yield Progress("scan", 0, None, f"looking for images in {root}")
    files = find_image_files(root, exclude=project.path)
    if not files:
        raise DataError(
            f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in all sub-folders)."
        )
    labels = read_import_labels(Path(labels_csv), {f.stem for f in files}) if labels_csv else {}
    max_pixels = import_pixel_limit(project)  # a bad stored value is refused here, before anything is imported
    report = ImportReport(found=len(files))
    clock = EtaClock(len(files))
    pending: list[dict] = []
    pending_hashes: dict[str, str] = {}
    retag: dict[str, list[int]] = {"good": [], "defect": []}
    retag_source: dict[str, str] = {}
    known = {record.rel_path: record for record in project.images()}  # one query, not one a file

    def flush() -> None:
        if pending:
            project.add_images(pending)
            report.added += len(pending)
            pending.clear()
            pending_hashes.clear()

    for done, path in enumerate(files, start=1):
        cancel.raise_if_cancelled()
        rel_path = path.relative_to(root).as_posix()
        tag, source = (labels.get(path.stem), "csv") if path.stem in labels else (tag_from_folders(Path(rel_path)), "folder")
        if rel_path in known:
            report.already_known += 1
            if tag and known[rel_path].tag == "untagged":  # re-import keeps tags; only untagged images get one
                retag[tag].append(known[rel_path].id)
                retag_source[tag] = source
        else:
            try:
                _, info = decode_image(path, max_pixels)  # over the limit: refused from the header
                sha256 = file_sha256(path)
            except (BadImageError, OSError) as error:
                report.skipped.append((rel_path, str(error).split(": ", 1)[-1]))
            else:
                known_id = project.image_id_by_hash(sha256)
                if known_id is not None:
                    report.duplicates.append((rel_path, project.image(known_id).rel_path))
                elif sha256 in pending_hashes:
                    report.duplicates.append((rel_path, pending_hashes[sha256]))
                else:
                    pending_hashes[sha256] = rel_path
                    pending.append({"rel_path": rel_path, "sha256": sha256, "width": info.width, "height": info.height,
                                    "channels": info.channels, "bit_depth": info.bit_depth, "tag": tag, "tag_source": source})
                    if tag:
                        report.tagged[source] += 1
        if len(pending) >= COMMIT_EVERY:
            flush()
        if done % 16 == 0 or done == len(files):
            yield clock.progress("import", done, rel_path, {"added": report.added + len(pending), "skipped": len(report.skipped)})
    flush()
    for tag, ids in retag.items():
        if ids:
            project.set_tags(ids, tag, source=retag_source[tag])
    return report
