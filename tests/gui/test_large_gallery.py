"""The gallery at scale: filters, counts and rows kept in arrays agree with the items they describe; the
thumbnail decoder makes the newest request first and forgets those scrolled past; the Qt bindings keep
their references of None and True (PySide6 6.12.0 on Python 3.11 dropped one on each void call and emit)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import cv2
import numpy as np
from PySide6.QtCore import QObject, QRect, Signal

from defect_studio.gui import gallery
from defect_studio.gui.gallery import FILTERS, GalleryItem, GalleryModel, ThumbnailCache


def _items(count: int, seed: int = 0) -> list[GalleryItem]:
    rng = np.random.default_rng(seed)
    tags = rng.choice(["good", "defect", "untagged"], count)
    states = rng.choice([None, "proposed", "accepted", "rejected"], count)
    return [GalleryItem(i * 3 + 1, f"image_{i:05d}", Path("."), f"{i}.png", f"{i:064x}", str(tags[i]),
                        states[i], bool(rng.random() < 0.1)) for i in range(count)]


def _expected_rows(items: list[GalleryItem], name: str) -> list[int]:
    keep = {
        "all": lambda item: True,
        "untagged": lambda item: item.tag == "untagged",
        "good": lambda item: item.tag == "good",
        "defect": lambda item: item.tag == "defect",
        "to_review": lambda item: item.mask_state == "proposed",
        "flagged": lambda item: item.flagged,
        "suspect": lambda item: item.suspect_rank is not None,
    }[name]
    rows = [item for item in items if keep(item)]
    if name == "suspect":
        rows.sort(key=lambda item: item.suspect_rank)
    return [item.image_id for item in rows]


def test_filters_counts_and_rows_follow_tag_and_mask_changes(qapp) -> None:
    items = _items(3000)
    for rank, item in enumerate(items[::97], start=1):
        item.suspect_rank = 40 - rank  # ranks in another order than the items'
    model = GalleryModel()
    model.set_items(items, None)
    rng = np.random.default_rng(1)
    for step in range(6):
        ids = [items[i].image_id for i in rng.choice(len(items), 50, replace=False)]
        model.update_tags(ids[:40], ["good", "defect", "untagged"][step % 3])
        for image_id in ids[40:]:
            model.update_mask_state(image_id, ["proposed", None][step % 2], flagged=step % 2 == 0)
        for name in FILTERS:
            model.set_filter(name)
            expected = _expected_rows(items, name)
            assert [model.item(row).image_id for row in range(model.rowCount())] == expected, name
            assert all(model.row_of(image_id) == row for row, image_id in enumerate(expected)), name
            hidden = set(item.image_id for item in items) - set(expected)
            assert all(model.row_of(image_id) is None for image_id in list(hidden)[:200]), name
        assert model.row_of(-5) is None
        assert model.counts() == {
            "images": len(items), **{tag: sum(item.tag == tag for item in items) for tag in ("good", "defect", "untagged")},
            "to_review": sum(item.mask_state == "proposed" for item in items)}


def test_thumbnails_newest_first_and_those_scrolled_past_are_forgotten(qtbot, tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "one.png"
    cv2.imwrite(str(source), np.full((40, 50), 128, np.uint8))
    items = [GalleryItem(i, f"image_{i}", tmp_path, source.name, f"{i:064x}", "untagged") for i in range(10)]
    started, release = threading.Event(), threading.Event()
    make = gallery._make_thumbnail

    def held_first(item: GalleryItem, cache_dir: Path):
        if item.image_id == 0:  # the decoder is busy with the first card while the others are asked for
            started.set()
            release.wait(10)
        return make(item, cache_dir)

    monkeypatch.setattr(gallery, "_make_thumbnail", held_first)
    cache = ThumbnailCache(tmp_path / "thumbs", max_waiting=4)
    made: list[int] = []
    cache.updated.connect(made.append)
    try:
        assert cache.get(items[0]) is None
        assert started.wait(10)
        for item in items[1:]:  # scrolling on: every card painted asks for its thumbnail
            assert cache.get(item) is None
        release.set()
        qtbot.waitUntil(cache.is_idle, timeout=10_000)
        assert made == [0, 9, 8, 7, 6]  # then the newest first; 1-5 were scrolled past and forgotten
        assert all(cache.get(item) is None for item in items[1:5])  # painted again: asked for again
        qtbot.waitUntil(cache.is_idle, timeout=10_000)
        assert sorted(made) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
        assert all(cache.get(item) is not None for item in items if item.image_id != 5)
    finally:
        release.set()
        cache.shutdown()


class _Probe(QObject):
    ping = Signal()


def test_the_installed_qt_bindings_keep_their_references() -> None:
    """PySide6 6.12.0 under Python 3.11 took a reference of None away on each void call and one of True on
    each emit: 100 000 of each aborted the process (none_dealloc / bool_dealloc); pyproject excludes it."""
    from defect_studio.gui.app import qt_bindings_problem

    assert qt_bindings_problem() is None
    rect, counted = QRect(), []
    probe = _Probe()
    probe.ping.connect(lambda: counted.append(1))
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(100_000):
        rect.setWidth(0)
        probe.ping.emit()
    assert len(counted) == 100_000
    assert sys.getrefcount(None) >= none_before - 100 and sys.getrefcount(True) >= true_before - 100


def test_the_app_refuses_bindings_that_lose_references_with_a_clear_message(monkeypatch, capsys) -> None:
    from defect_studio.gui import app

    monkeypatch.setattr(app, "_application_exists", lambda: False)
    monkeypatch.setattr(app, "qt_start_problem", lambda: None)
    monkeypatch.setattr(app, "qt_bindings_problem", lambda: "defect-studio cannot run on PySide6 6.12.0 ...")
    assert app.run_app() == 2
    assert "cannot run on PySide6 6.12.0" in capsys.readouterr().err
