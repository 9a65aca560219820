"""Bad input: every file and folder a careless user, a broken camera or a full disk produces gets a
clear message and a non-zero exit code from the CLI, never a traceback, and the project stays as it
was. The corpus is generated here; nothing is checked in."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from defect_studio.atomic import configure_faults
from defect_studio.cli import main
from defect_studio.errors import BadImageError, DefectStudioError
from defect_studio.imageio import decode_image, read_mask
from defect_studio.project.schema import MIGRATIONS
from defect_studio.project import Project
from tests.image_files import (
    gradient, write_cv2, write_float_tiff, write_palette_png, write_png_header_only, write_tiff_header_only,
)

EXIT_PARTIAL = 4


def distinct(index: int, channels: int = 1, dtype: type = np.uint8) -> np.ndarray:
    image = gradient(channels=channels, dtype=dtype)
    image.flat[index] = 5
    return image


def write_huge_jpeg_header(path: Path, width: int, height: int) -> Path:
    """A small real JPEG whose frame header (SOF0) claims width × height."""
    ok, data = cv2.imencode(".jpg", distinct(0))
    assert ok
    data = bytearray(data.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


def cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupt_middle(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    for offset in range(8, len(data), 7):  # past the signature: the header and data chunks become garbage
        data[offset] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


GOOD_FILES = {  # name -> why it is valid although unusual
    "sixteen_bit.tif": "16-bit TIFF",
    "float.tif": "32-bit float TIFF",
    "rgba.png": "RGBA PNG",
    "palette.png": "palette PNG",
    "tiny.png": "1×1 image",
    "Prüfung Ω/Oberfläche mit Leerzeichen ✓.png": "unicode and spaces",
    "sixteen_bit.png": "16-bit PNG",
    "gray_alpha.png": "gray + alpha PNG",
}
BAD_FILES = {  # name -> a word the skip reason must contain
    "truncated.jpg": "truncated",
    "truncated.png": "not a readable image",
    "truncated.tif": "not a readable image",
    "corrupt.jpg": "not a readable image",
    "corrupt.png": "not a readable image",
    "corrupt.tif": "not a readable image",
    "zero.png": "empty",
    "zero.jpg": "empty",
    "text.png": "not a readable image",
    "pdf.tiff": "not a readable image",
    "huge.png": "megapixel limit",
    "huge.jpg": "megapixel limit",
    "huge.tif": "megapixel limit",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "images"
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    write_cv2(root / "sixteen_bit.tif", distinct(1, dtype=np.uint16))
    write_float_tiff(root / "float.tif")
    write_cv2(root / "rgba.png", distinct(2, channels=4))
    write_palette_png(root / "palette.png")
    write_cv2(root / "tiny.png", np.full((1, 1), 9, np.uint8))
    write_cv2(root / "Prüfung Ω" / "Oberfläche mit Leerzeichen ✓.png", distinct(3))
    write_cv2(root / "sixteen_bit.png", distinct(4, dtype=np.uint16))
    Image.fromarray(distinct(5)).convert("LA").save(root / "gray_alpha.png")
    for suffix in (".jpg", ".png", ".tif"):
        cut(write_cv2(root / f"truncated{suffix}", noise))
        corrupt_middle(write_cv2(root / f"corrupt{suffix}", noise))
    (root / "zero.png").write_bytes(b"")
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is a note, not a picture\n")
    (root / "pdf.tiff").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4)
    write_png_header_only(root / "huge.png", 20_000, 20_000)
    write_huge_jpeg_header(root / "huge.jpg", 20_000, 20_000)
    write_tiff_header_only(root / "huge.tif", 20_000, 20_000)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a folder that contains itself
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    return root


def test_each_bad_file_is_refused_with_its_reason_and_never_decoded_when_huge(corpus: Path, monkeypatch):
    for name, reason in BAD_FILES.items():
        with pytest.raises(BadImageError, match=reason) as refused:
            if name.startswith("huge"):  # refused from the header: the pixels are never decoded
                with monkeypatch.context() as patch:
                    patch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("a 400-megapixel image was decoded"))
                    decode_image(corpus / name)
            else:
                decode_image(corpus / name)
        assert name.split("/")[-1] in str(refused.value)
    for name in GOOD_FILES:
        pixels, info = decode_image(corpus / name)
        assert pixels.shape[:2] == (info.height, info.width)


def test_importing_the_corpus_lists_every_bad_file_and_keeps_the_good_ones(corpus: Path, tmp_path: Path, capsys):
    project_dir = tmp_path / "projekt ü"
    assert main(["import", str(project_dir), "--images", str(corpus)]) == EXIT_PARTIAL
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    for name, reason in BAD_FILES.items():
        line = next((line for line in captured.out.splitlines() if f"skipped: {name}:" in line), None)
        assert line is not None and reason in line, (name, captured.out)
    assert "dangling.png" in captured.out  # a broken link is listed too
    with Project.open(project_dir) as project:
        assert sorted(image.rel_path for image in project.images()) == sorted(GOOD_FILES)
        by_name = {image.rel_path: image for image in project.images()}
        assert by_name["sixteen_bit.tif"].bit_depth == 16 and by_name["float.tif"].bit_depth == 32
        assert (by_name["tiny.png"].width, by_name["tiny.png"].height) == (1, 1)
    # importing again changes nothing and says the same
    assert main(["import", str(project_dir), "--images", str(corpus)]) == EXIT_PARTIAL
    assert f"{len(GOOD_FILES)} already in the project" in capsys.readouterr().out


def test_a_folder_of_only_bad_files_and_an_empty_folder(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["import", str(tmp_path / "p1"), "--images", str(empty)]) == 2
    assert "no images found" in capsys.readouterr().err
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"")
    assert main(["import", str(tmp_path / "p2"), "--images", str(only_bad)]) == EXIT_PARTIAL
    assert "0 added" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "p3"), "--images", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert "no such image folder" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("stem,label\ni0,good\nghost,defect\n", "1 stems match no image"),
        ("i0,maybe\ni1,good\n", "unknown label 'maybe'"),
        ("i0\n", "expected 'stem,label'"),
        (b"\xff\xfe\x00garbage\x80\x81", "cannot read the label file"),
    ],
)
def test_a_bad_label_csv_is_refused_before_anything_is_imported(tmp_path: Path, capsys, content, message):
    images = tmp_path / "images"
    for index in range(3):
        write_cv2(images / f"i{index}.png", distinct(index))
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["import", str(tmp_path / "p"), "--images", str(images), "--labels", str(labels)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Nothing was imported" in captured.err and "Traceback" not in captured.err
    with Project.open(tmp_path / "p") as project:
        assert project.images() == []


def _tagged_project(tmp_path: Path, tags: list[str]) -> Path:
    images = tmp_path / "images"
    for index, tag in enumerate(tags):
        write_cv2(images / tag / f"i{index}.png", distinct(index))
    assert main(["import", str(tmp_path / "p"), "--images", str(images)]) == 0
    return tmp_path / "p"


@pytest.mark.parametrize("tags", [["good"] * 6, ["defect"] * 4], ids=["no-defect-images", "only-defect-images"])
def test_training_with_one_class_is_refused_with_advice(tmp_path: Path, capsys, tags):
    project_dir = _tagged_project(tmp_path, tags)
    capsys.readouterr()
    code = main(["train", str(project_dir), "--epochs", "1", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2 and "needs images tagged both good and defect" in captured.err
    assert "Traceback" not in captured.err
    with Project.open(project_dir) as project:
        assert project.training_runs() == [] and not list(project.models_dir.glob("*.pt"))


def test_pseudo_labels_without_a_classifier_is_a_message(tmp_path: Path, capsys):
    project_dir = _tagged_project(tmp_path, ["good", "good", "defect"])
    capsys.readouterr()
    code = main(["pseudo", str(project_dir)])
    captured = capsys.readouterr()
    assert code != 0 and captured.err.startswith("error: ") and "Traceback" not in captured.err
    with Project.open(project_dir) as project:
        assert project.mask_records() == []


def test_imported_masks_of_the_wrong_size_are_refused_and_nothing_changes(tmp_path: Path, capsys):
    project_dir = _tagged_project(tmp_path, ["good", "defect", "defect"])
    with Project.open(project_dir) as project:
        project.create_round({"method": "test"})
        for image in project.images():
            project.save_mask_proposal(image.id, 0, np.zeros((image.height, image.width), bool), "cam:test", {})
        before = [(r.image_id, r.state, r.sha256) for r in project.mask_records()]
        height, width = project.images()[0].height, project.images()[0].width
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "i1.png"), np.full((height, width), 255, np.uint8))  # right size
    cv2.imwrite(str(masks / "i2.png"), np.full((height + 1, width), 255, np.uint8))  # wrong size
    (masks / "ghost.png").write_bytes(b"")  # no such image, and empty
    code = main(["review", str(project_dir), "--import-masks", str(masks)])
    captured = capsys.readouterr()
    assert code == 2 and "wrong size" in captured.err and "i2.png" in captured.err and "Traceback" not in captured.err
    with Project.open(project_dir) as project:
        assert [(r.image_id, r.state, r.sha256) for r in project.mask_records()] == before  # all or nothing


def test_a_damaged_or_foreign_project_database(tmp_path: Path, demo_project: Path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(demo_project, damaged)
    database = damaged / "project.sqlite"
    data = bytearray(database.read_bytes())
    data[100:4096] = b"\x00" * (4096 - 100)  # the schema page wiped
    database.write_bytes(bytes(data))
    assert main(["status", str(damaged)]) == 2
    captured = capsys.readouterr()
    assert "project database" in captured.err and "Traceback" not in captured.err
    text = tmp_path / "text"
    text.mkdir()
    (text / "project.sqlite").write_text("not a database")
    assert main(["tag", str(text), "good", "x"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_half_created_project_is_finished_by_the_next_import(tmp_path: Path, capsys):
    images = tmp_path / "images"
    write_cv2(images / "good" / "a.png", distinct(0))
    configure_faults("enospc:3")  # the third disk write: the creation's own commit (after 2 migrations)
    try:
        assert main(["import", str(tmp_path / "p"), "--images", str(images)]) == 2
    finally:
        configure_faults(None)
    assert "No space left on device" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "p")]) == 2
    assert "interrupted before it was finished" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "p"), "--images", str(images)]) == 0
    with Project.open(tmp_path / "p") as project:
        assert [i.tag for i in project.images()] == ["good"]


# ----------------------------------------------------------------- read-only folders and a full disk
def _writes_are_refused_by_permissions(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return True
    probe.unlink()
    return False  # root (as in CI containers) writes through any mode bits


def _make_read_only(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only by mode bits; where they do not stop us (root), every open for writing under the
    folder fails as it would on a read-only mount."""
    for path in [project_dir, *project_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    if _writes_are_refused_by_permissions(project_dir):
        return
    real_open = os.open
    inside = str(project_dir.resolve())

    def refusing_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and os.path.abspath(os.fspath(path)).startswith(inside):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)


def test_a_read_only_project_is_a_message_and_stays_intact(demo_project: Path, monkeypatch, capsys):
    with Project.open(demo_project) as project:
        before = [(i.id, i.tag) for i in project.images()]
        stem = project.images("good")[0].stem
    _make_read_only(demo_project, monkeypatch)
    try:
        assert main(["tag", str(demo_project), "defect", stem]) == 2
        captured = capsys.readouterr()
        assert "not writable" in captured.err and "Traceback" not in captured.err
    finally:
        monkeypatch.undo()
        for path in [demo_project, *demo_project.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    with Project.open(demo_project) as project:
        assert [(i.id, i.tag) for i in project.images()] == before


def test_a_mask_folder_that_refuses_writes_keeps_the_saved_mask(demo_project: Path, monkeypatch):
    with Project.open(demo_project) as project:
        image = project.images("defect")[0]
        project.create_round({})
        saved = np.zeros((image.height, image.width), bool)
        saved[2:5, 2:9] = True
        record = project.save_edited_mask(image.id, 0, saved)
        real_open = os.open
        masks = str(project.masks_dir)

        def refusing_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
            if flags & os.O_CREAT and os.fspath(path).startswith(masks):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
        with pytest.raises(DefectStudioError, match="cannot write .*Permission denied.*previous version is unchanged"):
            project.save_edited_mask(image.id, 0, ~saved)
        monkeypatch.undo()
        assert project.mask_record(image.id, 0) == record
        assert np.array_equal(project.load_mask(record), saved)


def test_a_full_disk_during_import_and_tagging_is_a_message(tmp_path: Path, capsys):
    images = tmp_path / "images"
    for index in range(5):
        write_cv2(images / ("good" if index % 2 else "defect") / f"i{index}.png", distinct(index))
    project_dir = tmp_path / "p"
    configure_faults(f"enospc:{len(MIGRATIONS) + 2}")  # each migration, the creation, then the images' commit
    try:
        assert main(["import", str(project_dir), "--images", str(images)]) == 2
    finally:
        configure_faults(None)
    captured = capsys.readouterr()
    assert "No space left on device" in captured.err and "Traceback" not in captured.err
    with Project.open(project_dir) as project:
        assert project.images() == []  # the batch was rolled back as a whole
    assert main(["import", str(project_dir), "--images", str(images)]) == 0  # space freed: it completes
    capsys.readouterr()
    configure_faults("enospc:1")
    try:
        assert main(["tag", str(project_dir), "good", "i0", "i2"]) == 2
    finally:
        configure_faults(None)
    assert "could not be saved" in capsys.readouterr().err
    with Project.open(project_dir) as project:
        assert {i.stem: i.tag for i in project.images()}["i0"] == "defect"


def test_a_corrupted_mask_file_on_disk_is_reported_not_crashing(demo_project: Path):
    with Project.open(demo_project) as project:
        image = project.images()[0]
        project.create_round({})
        record = project.save_edited_mask(image.id, 0, np.ones((image.height, image.width), bool))
        record.path.write_bytes(record.path.read_bytes()[:20])  # someone else's tool broke it
        with pytest.raises(BadImageError, match=record.path.name):
            project.load_mask(record)
        with pytest.raises(BadImageError):
            read_mask(record.path)


def test_a_database_that_cannot_grow_refuses_the_change_and_keeps_the_rest(demo_project: Path):
    """SQLite's own "database or disk is full" (its page limit stands in for the disk here)."""
    from defect_studio.errors import ProjectError

    with Project.open(demo_project) as project:
        before = [(i.id, i.tag) for i in project.images()]
        (pages,) = project._query("PRAGMA page_count")[0]
        project._query(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(ProjectError, match="could not be saved .*full.*as it was before"):
            project.set_setting("notes", "x" * 200_000)  # needs new pages
        assert project.get_setting("notes") is None
        assert [(i.id, i.tag) for i in project.images()] == before
        project.set_tags([before[0][0]], "defect" if before[0][1] == "good" else "good")  # small changes still fit
    with Project.open(demo_project) as project:
        assert project._query("PRAGMA integrity_check")[0][0] == "ok"


def test_proposals_without_a_classifier_are_refused_before_a_round_exists(tmp_path: Path, capsys):
    project_dir = _tagged_project(tmp_path, ["good", "defect", "good", "defect"])
    capsys.readouterr()
    assert main(["pseudo", str(project_dir)]) != 0
    captured = capsys.readouterr()
    assert "no trained classifier" in captured.err and "defect-studio train PROJECT" in captured.err
    assert "Traceback" not in captured.err
    with Project.open(project_dir) as project:
        assert project.rounds() == []


def test_a_dataset_without_defect_images(tmp_path: Path, capsys):
    """Proposing masks, and benchmarking, on data with no defect: a message each, nothing written."""
    project_dir = _tagged_project(tmp_path, ["good"] * 4)
    capsys.readouterr()
    assert main(["pseudo", str(project_dir)]) == 2
    captured = capsys.readouterr()
    assert "no image is tagged defect" in captured.err and "Traceback" not in captured.err
    with Project.open(project_dir) as project:
        assert project.mask_records() == [] and project.rounds() == []  # refused before a round was made
    dataset = tmp_path / "dataset"
    for index in range(4):
        write_cv2(dataset / "images" / f"g{index}.png", distinct(index))
    (dataset / "labels.csv").write_text("stem,label\n" + "".join(f"g{index},good\n" for index in range(4)))
    code = main(["bench", "classifier", "--dataset", str(dataset), "--quick", "--out", str(tmp_path / "bench")])
    captured = capsys.readouterr()
    assert code == 2 and "needs images tagged both good and defect" in captured.err
    assert "Traceback" not in captured.err
