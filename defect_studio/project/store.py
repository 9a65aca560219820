"""The project store: one folder with `project.sqlite` (WAL) and plain files beside it.

    <project>/project.sqlite          images, tags, rounds, masks, training runs (schema.py)
    <project>/project.lock            who has the project open (lock.py)
    <project>/masks/round-<k>/<stem>.png            the round's mask, 0 background / 255 defect
    <project>/masks/round-<k>/proposed/<stem>.png   the proposal as made, kept for "revert"
    <project>/models/                 state_dict checkpoints
    <project>/cache/                  derived data that can always be recomputed (CAMs, thumbnails)

Every file is written atomically before the database row that points at it is committed, so a
row never points at a half-written file. A mask the user accepted or edited is never replaced.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from defect_studio.atomic import (
    STAGED_SUFFIX,
    fault_point,
    parse_staged_name,
    promote_staged,
    remove_stale_temporaries,
    stage_bytes,
)
from defect_studio.errors import ProjectError
from defect_studio.imageio import encode_mask_png, file_sha256, read_mask
from defect_studio.project.lock import ProjectLock
from defect_studio.project.schema import LATEST_VERSION, migrate
from defect_studio.project.schema import schema_version as database_schema_version

log = logging.getLogger(__name__)

DB_NAME = "project.sqlite"
TAGS = ("good", "defect", "untagged")
TAG_SOURCES = ("user", "folder", "csv", "import")
MASK_STATES = ("proposed", "accepted", "rejected", "edited")
LOCKED_STATES = ("accepted", "edited")  # the user's word is final: never overwritten by a later round
DECIDED_STATES = (*LOCKED_STATES, "rejected")  # a new proposal in the same round keeps any of these


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class ImageRecord:
    id: int
    rel_path: str
    stem: str
    image_root: Path = field(repr=False)
    sha256: str
    width: int
    height: int
    channels: int
    bit_depth: int
    tag: str

    @property
    def path(self) -> Path:
        """The absolute path, built on use: listing 10 000 images need not build 10 000 paths."""
        return self.image_root / self.rel_path


@dataclass(frozen=True)
class RoundRecord:
    index: int
    created_at: str
    status: str
    config: dict
    metrics: dict


@dataclass(frozen=True)
class MaskRecord:
    image_id: int
    round_index: int
    project_dir: Path = field(repr=False)
    rel_path: str
    state: str
    source: str
    params: dict
    flagged: bool
    sha256: str
    updated_at: str

    @property
    def path(self) -> Path:
        """The absolute path, built on use (see ImageRecord.path)."""
        return self.project_dir / self.rel_path


@dataclass(frozen=True)
class TrainingRun:
    id: int
    kind: str
    created_at: str
    config: dict
    seed: int
    metrics: dict
    checkpoint_path: Path  # absolute
    checkpoint_sha256: str
    round_index: int | None
    dataset_hashes: tuple[str, ...]
    provenance: dict = field(default_factory=dict)  # settings and lineage beyond `config` (schema 3 on; {} before)


@dataclass(frozen=True)
class RunInput:
    """One image a model was trained on: a segmenter's mask (round, state, hash) or a classifier's tag."""

    image_id: int
    round_index: int | None  # the mask's round (a segmenter's input); None for a classifier's tag
    label: str  # the mask's review state (accepted, edited, proposed) or the tag (good, defect)
    image_sha256: str
    mask_sha256: str | None


@dataclass(frozen=True)
class TagReview:
    """A decision taken on the mislabel queue: a tag confirmed, or flipped to the other tag."""

    id: int
    action: int  # reviews taken together (one command, one key press) share it and are undone together
    image_id: int
    decision: str  # confirmed | flipped
    old_tag: str
    new_tag: str
    at: str
    undone_at: str | None


@dataclass(frozen=True)
class ReviewOrderEntry:
    """One mask's place in a round's "edit these first" order (ml.review_order makes the order)."""

    image_id: int
    rank: int  # 1 = edit first
    score: float  # expected gain from editing, in [0, 1]
    reason: str  # why it sits there, for the user
    signals: dict = field(default_factory=dict)  # the measured signals behind the score


CURRENT_SEGMENTER_SETTING = "current_segmenter_run"  # a run id the user chose; unset: the newest segmenter


class Project:
    """An open project. Thread-safe: the GUI thread and one worker thread may share it."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock: ProjectLock, read_only: bool = False) -> None:
        self.path = path
        self._db = connection
        self._lock = lock
        self._mutex = threading.RLock()
        self.took_over_stale_lock = lock.took_over_from
        self.recovered_files = 0  # mask files whose interrupted save was finished on open
        self.read_only = read_only  # opened by open_for_reading: every write fails
        self.image_root = self._resolve_image_root()

    # ----------------------------------------------------------------- opening and closing
    @classmethod
    def create(cls, project_dir: str | os.PathLike[str], image_root: str | os.PathLike[str]) -> "Project":
        project_dir = Path(project_dir).absolute()
        image_root = Path(image_root).absolute()
        if not image_root.is_dir():
            raise ProjectError(f"{image_root}: no such image folder.")
        try:
            project_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ProjectError(f"{project_dir}: cannot create the project folder ({error.strerror or error}).") from error
        # A creation that a crash interrupted (database there, image folder never recorded) is finished.
        project = cls._open(project_dir, creating=True)
        if project._creation_finished():
            project.close()
            raise ProjectError(f"{project_dir} already holds a project; open it instead.")
        try:
            relative = os.path.relpath(image_root, project_dir)
        except ValueError:  # different drives on Windows
            relative = str(image_root)
        try:
            with project._transaction() as db:
                db.execute("INSERT INTO meta(key, value) VALUES ('image_root', ?)", (relative,))
                db.execute("INSERT INTO meta(key, value) VALUES ('created_at', ?) "
                           "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (utc_now(),))
        except BaseException:
            project.close()
            raise
        project.image_root = project._resolve_image_root()
        return project

    def _creation_finished(self) -> bool:
        return bool(self._query("SELECT 1 FROM meta WHERE key='image_root'"))

    @staticmethod
    def _existing_database(project_dir: str | os.PathLike[str]) -> Path:
        database = Path(project_dir).absolute() / DB_NAME
        if not database.is_file():
            raise ProjectError(f"{database.parent}: not a defect-studio project (no {DB_NAME}).")
        return database

    def _refuse_if_unfinished(self) -> "Project":
        """This project, or closed and a ProjectError when its creation was interrupted."""
        if not self._creation_finished():
            self.close()
            raise ProjectError(
                f"{self.path}: creating this project was interrupted before it was finished; "
                "run `defect-studio import` on it again to finish it."
            )
        return self

    @classmethod
    def open(cls, project_dir: str | os.PathLike[str]) -> "Project":
        database = cls._existing_database(project_dir)
        return cls._open(database.parent, creating=False)._refuse_if_unfinished()

    @classmethod
    def open_for_reading(cls, project_dir: str | os.PathLike[str]) -> "Project":
        """The project opened read-only, without taking its lock: for the shards of a batch job (`cam --shard`),
        which read the project while another process may hold it. Nothing is recovered, cleaned up or upgraded;
        every write fails with sqlite's "readonly database" error."""
        database = cls._existing_database(project_dir)
        try:
            connection = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, isolation_level=None,
                                         check_same_thread=False, timeout=10.0)
        except sqlite3.Error as error:
            raise ProjectError(f"{database}: cannot open the project database to read ({error}).") from error
        try:
            version = database_schema_version(connection)
        except sqlite3.Error as error:
            connection.close()
            raise ProjectError(f"{database}: cannot open the project database to read ({error}).") from error
        if version != LATEST_VERSION:
            connection.close()
            raise ProjectError(f"{database.parent}: this project's database is at schema {version}, this defect-studio "
                               f"reads {LATEST_VERSION}; open it once without --shard to upgrade it.")
        # The lock is never acquired: closing releases nothing.
        project = cls(database.parent, connection, ProjectLock(database.parent), read_only=True)
        return project._refuse_if_unfinished()

    @classmethod
    def open_or_create(cls, project_dir: str | os.PathLike[str], image_root: str | os.PathLike[str]) -> "Project":
        if (Path(project_dir) / DB_NAME).is_file():
            project = cls._open(Path(project_dir).absolute(), creating=False)
            if not project._creation_finished():  # a creation that a crash interrupted: finish it
                project.close()
                return cls.create(project_dir, image_root)
            if project.image_root.resolve() != Path(image_root).resolve():
                project.close()
                raise ProjectError(
                    f"{project_dir} is a project of the images in {project.image_root}, not {image_root}."
                )
            return project
        return cls.create(project_dir, image_root)

    @classmethod
    def _open(cls, project_dir: Path, creating: bool) -> "Project":
        lock = ProjectLock(project_dir)
        lock.acquire()
        try:
            try:
                connection = sqlite3.connect(
                    project_dir / DB_NAME, isolation_level=None, check_same_thread=False, timeout=10.0
                )
            except sqlite3.Error as error:
                raise ProjectError(f"{project_dir / DB_NAME}: cannot open the project database ({error}).") from error
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=FULL")
                connection.execute("PRAGMA foreign_keys=ON")
                if not creating:
                    status = connection.execute("PRAGMA quick_check").fetchone()[0]
                    if status != "ok":
                        raise ProjectError(f"{project_dir / DB_NAME} is damaged ({status}).")
                migrate(connection)
            except sqlite3.DatabaseError as error:
                connection.close()
                raise ProjectError(f"{project_dir / DB_NAME}: cannot open the project database ({error}).") from error
            except OSError as error:  # e.g. the disk filled up while an old project was upgraded
                connection.close()
                raise ProjectError(f"{project_dir / DB_NAME}: cannot upgrade the project database ({error}).") from error
            except BaseException:
                connection.close()
                raise
        except BaseException:
            lock.release()
            raise
        if lock.took_over_from:
            log.warning("took over the lock of %s, which had stopped without closing the project", lock.took_over_from)
        project = cls(project_dir, connection, lock)
        try:
            project.recovered_files = project._recover_staged_files()
            for folder in ("masks", "models", "cache"):
                remove_stale_temporaries(project_dir / folder)
        except BaseException:
            project.close()
            raise
        return project

    def _recover_staged_files(self) -> int:
        """Finish the mask promotions a crash interrupted after their commit; discard the others
        (their commit never happened, so the old file and row are the saved state)."""
        if not self.masks_dir.is_dir():
            return 0
        finished = 0
        for staged in sorted(self.masks_dir.rglob(f".*{STAGED_SUFFIX}")):
            parsed = parse_staged_name(staged)
            if parsed is None:
                continue
            target, sha_prefix = parsed
            # A proposal `round-k/proposed/<stem>.png` is committed together with `round-k/<stem>.png`.
            row_file = target.parent.parent / target.name if target.parent.name == "proposed" else target
            rows = self._query("SELECT sha256 FROM masks WHERE path=?", (str(row_file.relative_to(self.path)),))
            if rows and str(rows[0][0]).startswith(sha_prefix):
                promote_staged(staged, target)
                finished += 1
            else:
                with contextlib.suppress(OSError):
                    staged.unlink()
        if finished:
            log.warning("finished saving %d mask file(s) that an interrupted session had committed", finished)
        return finished

    def close(self) -> None:
        with self._mutex:
            if self._db is None:
                return
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            self._db = None  # type: ignore[assignment]
            self._lock.release()

    @property
    def closed(self) -> bool:
        return self._db is None

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r})"

    # ----------------------------------------------------------------- plumbing
    class _Transaction:
        def __init__(self, project: "Project") -> None:
            self.project = project

        def __enter__(self) -> sqlite3.Connection:
            self.project._mutex.acquire()
            if self.project._db is None:
                self.project._mutex.release()
                raise ProjectError("the project is closed.")
            try:
                self.project._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:  # read-only database, disk I/O error, locked by a foreign tool
                self.project._mutex.release()
                raise ProjectError(f"{self.project.path}: the project cannot be changed now ({error}).") from error
            return self.project._db

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            db = self.project._db
            try:
                if exc_type is not None:
                    if db.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
                        db.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.DatabaseError):  # disk full or damage found mid-statement
                        raise ProjectError(
                            f"{self.project.path}: the change could not be saved ({exc}); "
                            "the project is as it was before it."
                        ) from exc
                    return
                try:
                    fault_point("commit", disk_write=True)
                    db.execute("COMMIT")
                except BaseException as error:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    if isinstance(error, (OSError, sqlite3.OperationalError)):
                        raise ProjectError(
                            f"{self.project.path}: the change could not be saved ({error}); "
                            "the project is as it was before it."
                        ) from error
                    raise
                fault_point("committed")
            finally:
                self.project._mutex.release()

    def _transaction(self) -> "_Transaction":
        return Project._Transaction(self)

    def _query(self, sql: str, parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._mutex:
            if self._db is None:
                raise ProjectError("the project is closed.")
            try:
                return self._db.execute(sql, tuple(parameters)).fetchall()
            except sqlite3.DatabaseError as error:  # damaged on disk since it was opened, I/O error
                raise ProjectError(f"{self.path / DB_NAME}: cannot read the project database ({error}).") from error

    def _resolve_image_root(self) -> Path:
        rows = self._query("SELECT value FROM meta WHERE key='image_root'")
        if not rows:
            return self.path
        root = Path(rows[0][0])
        return (root if root.is_absolute() else self.path / root).resolve()

    @property
    def models_dir(self) -> Path:
        return self.path / "models"

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    @property
    def masks_dir(self) -> Path:
        return self.path / "masks"

    def round_dir(self, round_index: int) -> Path:
        return self.masks_dir / f"round-{round_index}"

    @property
    def schema_version(self) -> int:
        return int(self._query("SELECT value FROM meta WHERE key='schema_version'")[0][0])

    # ----------------------------------------------------------------- settings
    def get_setting(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM settings WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value)),
            )

    # ----------------------------------------------------------------- images and tags
    _IMAGE_COLUMNS = "id, rel_path, stem, sha256, width, height, channels, bit_depth, tag"

    def _image(self, row: sqlite3.Row) -> ImageRecord:
        image_id, rel_path, stem, sha256, width, height, channels, bit_depth, tag = row
        return ImageRecord(image_id, rel_path, stem, self.image_root, sha256, width, height, channels, bit_depth, tag)

    def images(self, tag: str | None = None) -> list[ImageRecord]:
        if tag is not None and tag not in TAGS:
            raise ValueError(f"tag must be one of {TAGS}, got {tag!r}")
        if tag is None:
            rows = self._query(f"SELECT {self._IMAGE_COLUMNS} FROM images ORDER BY rel_path")
        else:
            rows = self._query(f"SELECT {self._IMAGE_COLUMNS} FROM images WHERE tag=? ORDER BY rel_path", (tag,))
        return [self._image(row) for row in rows]

    def image(self, image_id: int) -> ImageRecord:
        rows = self._query(f"SELECT {self._IMAGE_COLUMNS} FROM images WHERE id=?", (image_id,))
        if not rows:
            raise ProjectError(f"no image with id {image_id} in this project.")
        return self._image(rows[0])

    def find_images(self, names: Iterable[str]) -> list[ImageRecord]:
        """Images by id, stem or relative path; a clear error lists the names that match nothing."""
        by_key: dict[str, ImageRecord] = {}
        for record in self.images():
            by_key[str(record.id)] = record
            by_key[record.stem] = record
            by_key[record.rel_path] = record
        found, unknown = [], []
        for name in names:
            record = by_key.get(str(name).strip())
            (found.append(record) if record else unknown.append(str(name)))
        if unknown:
            raise ProjectError(f"no such image in this project: {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
        return found

    def has_image_path(self, rel_path: str) -> bool:
        return bool(self._query("SELECT 1 FROM images WHERE rel_path=?", (rel_path,)))

    def image_id_by_hash(self, sha256: str) -> int | None:
        rows = self._query("SELECT id FROM images WHERE sha256=?", (sha256,))
        return int(rows[0][0]) if rows else None

    def add_images(self, entries: Iterable[dict]) -> list[int]:
        """Insert new images in one transaction. Each entry: rel_path, sha256, width, height,
        channels, bit_depth, and optionally tag + tag_source. Stems are made unique here."""
        ids = []
        with self._transaction() as db:
            taken = _StemsInUse(db)
            for entry in entries:
                stem = _unique_stem(entry["rel_path"], taken)
                taken.add(stem)
                tag = entry.get("tag") or "untagged"
                now = utc_now()
                cursor = db.execute(
                    "INSERT INTO images(rel_path, stem, sha256, width, height, channels, bit_depth, added_at, tag, tag_source, tagged_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (entry["rel_path"], stem, entry["sha256"], entry["width"], entry["height"], entry["channels"],
                     entry["bit_depth"], now, tag, entry.get("tag_source") if tag != "untagged" else None,
                     now if tag != "untagged" else None),
                )
                image_id = int(cursor.lastrowid)
                ids.append(image_id)
                if tag != "untagged":
                    db.execute("INSERT INTO tag_events(image_id, tag, source, at) VALUES (?, ?, ?, ?)",
                               (image_id, tag, entry.get("tag_source") or "import", now))
        return ids

    def set_tags(self, image_ids: Iterable[int], tag: str, source: str = "user") -> int:
        """Tag images in one transaction (all or none); returns how many changed."""
        if tag not in TAGS:
            raise ValueError(f"tag must be one of {TAGS}, got {tag!r}")
        if source not in TAG_SOURCES:
            raise ValueError(f"source must be one of {TAG_SOURCES}, got {source!r}")
        changed = 0
        now = utc_now()
        with self._transaction() as db:
            for image_id in image_ids:
                cursor = db.execute(
                    "UPDATE images SET tag=?, tag_source=?, tagged_at=? WHERE id=? AND tag<>?",
                    (tag, source, now, int(image_id), tag),
                )
                if cursor.rowcount:
                    changed += 1
                    db.execute("INSERT INTO tag_events(image_id, tag, source, at) VALUES (?, ?, ?, ?)",
                               (int(image_id), tag, source, now))
        return changed

    # ----------------------------------------------------------------- the mislabel queue's decisions
    _REVIEW_COLUMNS = "id, action, image_id, decision, old_tag, new_tag, at, undone_at"

    def review_tags(self, image_ids: Iterable[int], decision: str) -> list[TagReview]:
        """Confirm the tags of images, or flip them (good <-> defect), as one action in one transaction.
        A flip changes the tag like `set_tags` (with its history); both are remembered, so the mislabel
        queue leaves these images out, and `undo_tag_review` takes the action back."""
        if decision not in ("confirmed", "flipped"):
            raise ValueError(f"decision must be confirmed or flipped, got {decision!r}")
        image_ids = list(dict.fromkeys(int(i) for i in image_ids))
        now = utc_now()
        with self._transaction() as db:
            (last,) = db.execute("SELECT MAX(action) FROM tag_reviews").fetchone()
            action = 1 if last is None else int(last) + 1
            for image_id in image_ids:
                row = db.execute("SELECT stem, tag FROM images WHERE id=?", (image_id,)).fetchone()
                if row is None:
                    raise ProjectError(f"no image with id {image_id} in this project.")
                stem, tag = row
                if tag not in ("good", "defect"):
                    raise ProjectError(f"{stem} is not tagged good or defect: there is no tag to {'confirm' if decision == 'confirmed' else 'flip'}.")
                new_tag = tag if decision == "confirmed" else ("defect" if tag == "good" else "good")
                if new_tag != tag:
                    db.execute("UPDATE images SET tag=?, tag_source='user', tagged_at=? WHERE id=?", (new_tag, now, image_id))
                    db.execute("INSERT INTO tag_events(image_id, tag, source, at) VALUES (?, ?, 'user', ?)",
                               (image_id, new_tag, now))
                db.execute("INSERT INTO tag_reviews(action, image_id, decision, old_tag, new_tag, at) VALUES (?, ?, ?, ?, ?, ?)",
                           (action, image_id, decision, tag, new_tag, now))
        return [r for r in self.tag_reviews() if r.action == action]

    def tag_reviews(self, include_undone: bool = False) -> list[TagReview]:
        """Decisions taken on the mislabel queue, oldest first."""
        where = "" if include_undone else "WHERE undone_at IS NULL"
        return [TagReview(int(i), int(a), int(image), d, old, new, at, undone)
                for i, a, image, d, old, new, at, undone in
                self._query(f"SELECT {self._REVIEW_COLUMNS} FROM tag_reviews {where} ORDER BY id")]

    def settled_tags(self) -> dict[int, str]:
        """{image id: tag} of the images whose current tag the user confirmed or chose on the queue."""
        rows = self._query("SELECT r.image_id, r.new_tag FROM tag_reviews r JOIN images i ON i.id=r.image_id "
                           "WHERE r.undone_at IS NULL AND r.new_tag=i.tag ORDER BY r.id")
        return {int(image_id): tag for image_id, tag in rows}

    def undo_tag_review(self) -> list[TagReview]:
        """Take back the latest action still in effect: a flipped tag goes back to what it was, a
        confirmation is forgotten. Refused, changing nothing, when a flipped image was retagged since."""
        with self._transaction() as db:
            row = db.execute("SELECT MAX(action) FROM tag_reviews WHERE undone_at IS NULL").fetchone()
            if row[0] is None:
                return []
            action = int(row[0])
            rows = db.execute(f"SELECT {self._REVIEW_COLUMNS} FROM tag_reviews WHERE action=? AND undone_at IS NULL",
                              (action,)).fetchall()
            reviews = [TagReview(int(i), int(a), int(image), d, old, new, at, undone) for i, a, image, d, old, new, at, undone in rows]
            now = utc_now()
            for review in reviews:
                stem, tag = db.execute("SELECT stem, tag FROM images WHERE id=?", (review.image_id,)).fetchone()
                if review.decision == "flipped" and tag != review.new_tag:
                    raise ProjectError(f"cannot undo the flip of {stem} to {review.new_tag}: it has been tagged {tag} "
                                       "since. Nothing was undone.")
                if review.decision == "flipped":
                    db.execute("UPDATE images SET tag=?, tag_source='user', tagged_at=? WHERE id=?",
                               (review.old_tag, now, review.image_id))
                    db.execute("INSERT INTO tag_events(image_id, tag, source, at) VALUES (?, ?, 'user', ?)",
                               (review.image_id, review.old_tag, now))
            db.execute("UPDATE tag_reviews SET undone_at=? WHERE action=? AND undone_at IS NULL", (now, action))
        return reviews

    def tag_history(self, image_id: int) -> list[tuple[str, str, str]]:
        """(tag, source, time) oldest first."""
        rows = self._query("SELECT tag, source, at FROM tag_events WHERE image_id=? ORDER BY id", (image_id,))
        return [tuple(row) for row in rows]  # type: ignore[misc]

    def tag_counts(self) -> dict[str, int]:
        counts = {tag: 0 for tag in TAGS}
        for tag, count in self._query("SELECT tag, COUNT(*) FROM images GROUP BY tag"):
            counts[tag] = int(count)
        return counts

    # ----------------------------------------------------------------- rounds
    def _round(self, row: sqlite3.Row) -> RoundRecord:
        return RoundRecord(int(row[0]), row[1], row[2], json.loads(row[3]), json.loads(row[4]))

    def rounds(self) -> list[RoundRecord]:
        return [self._round(r) for r in self._query("SELECT idx, created_at, status, config, metrics FROM rounds ORDER BY idx")]

    def round(self, index: int) -> RoundRecord:
        rows = self._query("SELECT idx, created_at, status, config, metrics FROM rounds WHERE idx=?", (index,))
        if not rows:
            raise ProjectError(f"this project has no round {index}.")
        return self._round(rows[0])

    def create_round(self, config: dict | None = None) -> RoundRecord:
        with self._transaction() as db:
            (last,) = db.execute("SELECT MAX(idx) FROM rounds").fetchone()
            index = 0 if last is None else int(last) + 1
            db.execute("INSERT INTO rounds(idx, created_at, status, config) VALUES (?, ?, 'proposing', ?)",
                       (index, utc_now(), json.dumps(config or {})))
        return self.round(index)

    def set_round_proposal_settings(self, index: int, settings: dict) -> RoundRecord:
        """Merge `settings` into the round's config: what its masks are proposed with now (a round re-proposed
        with another CAM method or thresholds must say so, and finishing an interrupted proposing uses them)."""
        with self._transaction() as db:
            row = db.execute("SELECT config FROM rounds WHERE idx=?", (index,)).fetchone()
            if row is None:
                raise ProjectError(f"this project has no round {index}.")
            merged = {**json.loads(row[0]), **settings}
            db.execute("UPDATE rounds SET config=? WHERE idx=?", (json.dumps(merged, default=float), index))
        return self.round(index)

    def update_round(self, index: int, status: str | None = None, metrics: dict | None = None) -> RoundRecord:
        """Set the status and/or merge `metrics` into the round's metrics."""
        with self._transaction() as db:
            self._update_round_in(db, index, status, metrics)
        return self.round(index)

    @staticmethod
    def _update_round_in(db: sqlite3.Connection, index: int, status: str | None, metrics: dict | None) -> None:
        """update_round's writes, inside the caller's transaction."""
        row = db.execute("SELECT metrics FROM rounds WHERE idx=?", (index,)).fetchone()
        if row is None:
            raise ProjectError(f"this project has no round {index}.")
        merged = {**json.loads(row[0]), **(metrics or {})}
        db.execute("UPDATE rounds SET metrics=? WHERE idx=?", (json.dumps(merged, default=float), index))
        if status is not None:
            db.execute("UPDATE rounds SET status=? WHERE idx=?", (status, index))

    # ----------------------------------------------------------------- masks
    _MASK_COLUMNS = "image_id, round_idx, path, state, source, params, flagged, sha256, updated_at"

    def _mask(self, row: sqlite3.Row) -> MaskRecord:
        image_id, round_idx, path, state, source, params, flagged, sha256, updated_at = row
        return MaskRecord(int(image_id), int(round_idx), self.path, path, state, source, json.loads(params),
                          bool(flagged), sha256, updated_at)

    def mask_record(self, image_id: int, round_index: int) -> MaskRecord | None:
        rows = self._query(f"SELECT {self._MASK_COLUMNS} FROM masks WHERE image_id=? AND round_idx=?", (image_id, round_index))
        return self._mask(rows[0]) if rows else None

    @staticmethod
    def _mask_filter(round_index: int | None = None, state: str | None = None,
                     tag: str | None = None) -> tuple[str, list[Any]]:
        """The WHERE clause (and its parameters) of a query over masks, by round, state and image tag."""
        clauses, parameters = [], []
        for clause, value in (("round_idx=?", round_index), ("state=?", state),
                              ("image_id IN (SELECT id FROM images WHERE tag=?)", tag)):
            if value is not None:
                clauses.append(clause)
                parameters.append(value)
        return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), parameters

    def mask_records(self, round_index: int | None = None, state: str | None = None,
                     tag: str | None = None) -> list[MaskRecord]:
        where, parameters = self._mask_filter(round_index, state, tag)
        rows = self._query(f"SELECT {self._MASK_COLUMNS} FROM masks {where} ORDER BY round_idx, image_id", parameters)
        return [self._mask(row) for row in rows]

    def mask_states(self, round_index: int) -> dict[int, tuple[str, bool]]:
        """{image id: (state, flagged)} of a round's masks: what a listing shows, without the records'
        parameters and paths (a window refresh reads it for every image)."""
        rows = self._query("SELECT image_id, state, flagged FROM masks WHERE round_idx=?", (round_index,))
        return {int(image_id): (state, bool(flagged)) for image_id, state, flagged in rows}

    def locked_mask_before(self, image_id: int, round_index: int) -> MaskRecord | None:
        """The latest accepted or edited mask of this image in an earlier round."""
        rows = self._query(
            f"SELECT {self._MASK_COLUMNS} FROM masks WHERE image_id=? AND round_idx<? AND state IN ('accepted','edited') "
            "ORDER BY round_idx DESC LIMIT 1",
            (image_id, round_index),
        )
        return self._mask(rows[0]) if rows else None

    def mask_paths(self, image: ImageRecord, round_index: int) -> tuple[Path, Path]:
        """(the round's mask, the proposal as made)."""
        folder = self.round_dir(round_index)
        return folder / f"{image.stem}.png", folder / "proposed" / f"{image.stem}.png"

    def load_mask(self, record: MaskRecord) -> np.ndarray:
        image = self.image(record.image_id)
        return read_mask(record.path, (image.height, image.width))

    def load_proposal(self, image_id: int, round_index: int) -> np.ndarray | None:
        image = self.image(image_id)
        _, proposal = self.mask_paths(image, round_index)
        return read_mask(proposal, (image.height, image.width)) if proposal.is_file() else None

    def _check_mask_shape(self, image: ImageRecord, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != (image.height, image.width):
            raise ProjectError(
                f"{image.stem}: the mask is {mask.shape[1] if mask.ndim > 1 else '?'} × {mask.shape[0]} "
                f"but the image is {image.width} × {image.height}."
            )
        return mask > 0

    def _write_mask_row(self, db: sqlite3.Connection, image_id: int, round_index: int, path: Path, state: str,
                        source: str, params: dict, flagged: bool, sha256: str) -> None:
        now = utc_now()
        db.execute(
            f"INSERT INTO masks({self._MASK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(image_id, round_idx) DO UPDATE SET path=excluded.path, state=excluded.state, "
            "source=excluded.source, params=excluded.params, flagged=excluded.flagged, sha256=excluded.sha256, "
            "updated_at=excluded.updated_at",
            (image_id, round_index, str(path.relative_to(self.path)), state, source, json.dumps(params, default=float),
             int(flagged), sha256, now),
        )
        db.execute("INSERT INTO mask_events(image_id, round_idx, state, source, sha256, at) VALUES (?, ?, ?, ?, ?, ?)",
                   (image_id, round_index, state, source, sha256, now))

    def _save_mask_files(self, files: list[tuple[Path, bytes]], write_rows: Callable[[sqlite3.Connection], None]) -> None:
        """Write mask files and their rows as one unit: staged files, then the commit, then the
        promotion (see atomic.stage_bytes). A crash anywhere leaves the old files with the old
        rows, or (after the commit) new rows whose files are promoted on the next open."""
        staged: list[tuple[Path, Path]] = []
        try:
            for target, data in files:
                staged.append((stage_bytes(target, data, _sha256_bytes(data)), target))
            with self._transaction() as db:
                write_rows(db)
        except BaseException:
            for path, _ in staged:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        for path, target in staged:
            promote_staged(path, target)

    def save_mask_proposal(self, image_id: int, round_index: int, mask: np.ndarray, source: str,
                           params: dict | None = None, flagged: bool = False) -> MaskRecord:
        """Store a proposed mask for a round. The user's decisions are final: an image whose mask
        was accepted or edited in an earlier round gets that mask carried forward, and one already
        accepted, edited or rejected in this round keeps it; in both cases `mask` is ignored."""
        with self._mutex:  # the check and the write are one step: a user edit cannot slip between
            self.round(round_index)
            image = self.image(image_id)
            existing = self.mask_record(image_id, round_index)
            if existing is not None and existing.state in DECIDED_STATES:
                return existing
            target, proposal_path = self.mask_paths(image, round_index)
            carried = self.locked_mask_before(image_id, round_index)
            if carried is not None:
                data = encode_mask_png(self.load_mask(carried))
                self._save_mask_files([(target, data)], lambda db: self._write_mask_row(
                    db, image_id, round_index, target, carried.state, carried.source,
                    {**carried.params, "carried_from_round": carried.round_index}, False, _sha256_bytes(data)))
                return self.mask_record(image_id, round_index)  # type: ignore[return-value]
            data = encode_mask_png(self._check_mask_shape(image, mask))
            self._save_mask_files([(proposal_path, data), (target, data)], lambda db: self._write_mask_row(
                db, image_id, round_index, target, "proposed", source, params or {}, flagged, _sha256_bytes(data)))
            return self.mask_record(image_id, round_index)  # type: ignore[return-value]

    def save_edited_mask(self, image_id: int, round_index: int, mask: np.ndarray) -> MaskRecord:
        """The user's edit becomes the round's mask (state 'edited'); the proposal stays for revert."""
        with self._mutex:
            self.round(round_index)
            image = self.image(image_id)
            data = encode_mask_png(self._check_mask_shape(image, mask))
            target, _ = self.mask_paths(image, round_index)
            previous = self.mask_record(image_id, round_index)
            params = dict(previous.params) if previous else {}
            params["edited_from"] = previous.source if previous else None
            self._save_mask_files([(target, data)], lambda db: self._write_mask_row(
                db, image_id, round_index, target, "edited", "human-edit", params, False, _sha256_bytes(data)))
            return self.mask_record(image_id, round_index)  # type: ignore[return-value]

    def revert_to_proposal(self, image_id: int, round_index: int) -> MaskRecord:
        """Undo a human edit: the proposal becomes the round's mask again, state 'proposed'."""
        with self._mutex:
            image = self.image(image_id)
            record = self.mask_record(image_id, round_index)
            proposal = self.load_proposal(image_id, round_index)
            if record is None or proposal is None:
                raise ProjectError(f"{image.stem} has no proposal in round {round_index} to revert to.")
            target, _ = self.mask_paths(image, round_index)
            data = encode_mask_png(proposal)
            source = record.params.get("edited_from") or record.source
            params = {k: v for k, v in record.params.items() if k != "edited_from"}
            self._save_mask_files([(target, data)], lambda db: self._write_mask_row(
                db, image_id, round_index, target, "proposed", source, params, record.flagged, _sha256_bytes(data)))
            return self.mask_record(image_id, round_index)  # type: ignore[return-value]

    def review_mask(self, image_id: int, round_index: int, state: str) -> MaskRecord:
        """Accept, reject, or put back to 'proposed' the round's mask of one image."""
        if state not in ("accepted", "rejected", "proposed"):
            raise ValueError(f"review state must be accepted, rejected or proposed, got {state!r}")
        with self._mutex:
            record = self.mask_record(image_id, round_index)
            if record is None:
                raise ProjectError(f"{self.image(image_id).stem} has no mask in round {round_index} to review.")
            with self._transaction() as db:
                self._write_mask_row(db, image_id, round_index, record.path, state, record.source, record.params,
                                     record.flagged, record.sha256)
            return self.mask_record(image_id, round_index)  # type: ignore[return-value]

    def mask_history(self, image_id: int, round_index: int | None = None) -> list[tuple[int, str, str, str, str]]:
        """(round, state, source, sha256, time) oldest first."""
        sql = "SELECT round_idx, state, source, sha256, at FROM mask_events WHERE image_id=?"
        parameters: list[Any] = [image_id]
        if round_index is not None:
            sql += " AND round_idx=?"
            parameters.append(round_index)
        return [tuple(row) for row in self._query(sql + " ORDER BY id", parameters)]  # type: ignore[misc]

    def mask_state_counts(self, tag: str | None = None) -> dict[int, dict[str, int]]:
        """{round: {state: masks, ..., "flagged": masks}} of every round with masks, in one query;
        `tag` counts only the masks of images with that tag."""
        where, parameters = self._mask_filter(tag=tag)
        counts: dict[int, dict[str, int]] = {}
        rows = self._query(f"SELECT round_idx, state, COUNT(*), SUM(flagged) FROM masks {where} GROUP BY round_idx, state",
                           parameters)
        for round_idx, state, count, flagged in rows:
            round_counts = counts.setdefault(int(round_idx), {**{s: 0 for s in MASK_STATES}, "flagged": 0})
            round_counts[state] = int(count)
            round_counts["flagged"] += int(flagged or 0)
        return counts

    # ----------------------------------------------------------------- training runs
    def _run(self, row: sqlite3.Row) -> TrainingRun:
        run_id, kind, created_at, config, seed, metrics, checkpoint, checkpoint_sha, hashes, round_idx, provenance = row
        return TrainingRun(int(run_id), kind, created_at, json.loads(config), int(seed), json.loads(metrics),
                           self.path / checkpoint, checkpoint_sha, None if round_idx is None else int(round_idx),
                           tuple(json.loads(hashes)), json.loads(provenance))

    _RUN_COLUMNS = ("id, kind, created_at, config, seed, metrics, checkpoint_path, checkpoint_sha256, dataset_hashes, "
                    "round_idx, provenance")

    def record_training_run(self, kind: str, config: dict, seed: int, metrics: dict, checkpoint_path: str | os.PathLike[str],
                            dataset_hashes: Iterable[str], round_index: int | None = None,
                            provenance: dict | None = None, inputs: Iterable[RunInput] | None = None) -> TrainingRun:
        """Record a trained model with its provenance, in one transaction: `inputs` are the images (and
        masks) it trained on, `provenance` the settings and lineage beyond `config`. A classifier recorded
        without `inputs` gets them from `dataset_hashes` (image hashes) and the tags it was trained on.
        A new segmenter becomes the current one (it ends an earlier `choose_segmenter`)."""
        return self._record_run(kind, config, seed, metrics, checkpoint_path, dataset_hashes, round_index,
                                provenance, inputs)

    def record_round_segmenter(self, round_index: int, config: dict, seed: int, metrics: dict,
                               checkpoint_path: str | os.PathLike[str], dataset_hashes: Iterable[str],
                               provenance: dict | None = None, inputs: Iterable[RunInput] | None = None,
                               round_metrics: dict | None = None) -> TrainingRun:
        """Record round `round_index`'s trained segmenter (as record_training_run) and set the round
        "trained" with `round_metrics` merged into its metrics, in one transaction: a kill between the
        two writes used to leave a round at "training" with its model recorded."""
        return self._record_run("segmenter", config, seed, metrics, checkpoint_path, dataset_hashes, round_index,
                                provenance, inputs,
                                also=lambda db: self._update_round_in(db, round_index, "trained", round_metrics))

    def _record_run(self, kind: str, config: dict, seed: int, metrics: dict, checkpoint_path: str | os.PathLike[str],
                    dataset_hashes: Iterable[str], round_index: int | None, provenance: dict | None,
                    inputs: Iterable[RunInput] | None,
                    also: Callable[[sqlite3.Connection], None] | None = None) -> TrainingRun:
        """record_training_run; `also` makes more writes in the same transaction (it commits with them or not at all)."""
        checkpoint_path = Path(checkpoint_path).absolute()
        try:
            relative = checkpoint_path.relative_to(self.path)
        except ValueError as error:
            raise ProjectError(f"{checkpoint_path}: checkpoints must be inside the project folder.") from error
        checkpoint_sha = file_sha256(checkpoint_path)
        dataset_hashes = sorted(dataset_hashes)
        provenance = dict(provenance or {})
        now = utc_now()
        with self._transaction() as db:
            if kind == "classifier" and inputs is None:
                inputs, tags_as_of = self._classifier_inputs(db, dataset_hashes, now, metrics)
                provenance.setdefault("tags_as_of", tags_as_of)
            if kind == "classifier":
                (last_round,) = db.execute("SELECT MAX(idx) FROM rounds").fetchone()
                provenance.setdefault("round", last_round)  # the latest round when it was trained (None: before any)
            cursor = db.execute(
                f"INSERT INTO training_runs({self._RUN_COLUMNS.replace('id, ', '', 1)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, now, json.dumps(config, default=str), int(seed), json.dumps(metrics, default=float),
                 str(relative), checkpoint_sha, json.dumps(dataset_hashes), round_index,
                 json.dumps(provenance, default=str)),
            )
            run_id = int(cursor.lastrowid)
            db.executemany(
                "INSERT INTO run_inputs(run_id, image_id, round_idx, label, image_sha256, mask_sha256) VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, i.image_id, i.round_index, i.label, i.image_sha256, i.mask_sha256) for i in inputs or ()],
            )
            if kind == "segmenter":
                db.execute("DELETE FROM settings WHERE key=?", (CURRENT_SEGMENTER_SETTING,))
            if also is not None:
                also(db)
        return self.training_run(run_id)

    @staticmethod
    def _classifier_inputs(db: sqlite3.Connection, image_hashes: list[str], now: str,
                           metrics: dict) -> tuple[list[RunInput], str]:
        """The images a classifier trained on (by hash) with the tag each had when training started
        (from the tag history: the user may retag while a training runs in the background)."""
        seconds = metrics.get("seconds")
        started = now
        if isinstance(seconds, (int, float)) and seconds == seconds and seconds >= 0:
            started = (datetime.fromisoformat(now) - timedelta(seconds=float(seconds))).isoformat(timespec="milliseconds")
        wanted = set(image_hashes)
        inputs = []
        for image_id, sha256, tag in db.execute("SELECT id, sha256, tag FROM images ORDER BY id"):
            if sha256 not in wanted:
                continue
            event = db.execute("SELECT tag FROM tag_events WHERE image_id=? AND at<=? ORDER BY id DESC LIMIT 1",
                               (image_id, started)).fetchone()
            inputs.append(RunInput(int(image_id), None, event[0] if event else tag, sha256, None))
        return inputs, started

    def run_inputs(self, run_id: int) -> list[RunInput]:
        """What run `run_id` was trained on, by image id ([] for a run recorded before schema 3)."""
        rows = self._query("SELECT image_id, round_idx, label, image_sha256, mask_sha256 FROM run_inputs "
                           "WHERE run_id=? ORDER BY image_id", (run_id,))
        return [RunInput(int(i), None if r is None else int(r), label, image_sha, mask_sha)
                for i, r, label, image_sha, mask_sha in rows]

    def chosen_segmenter(self) -> TrainingRun | None:
        """The segmenter run the user made current (choose_segmenter), or None: the newest is current."""
        run_id = self.get_setting(CURRENT_SEGMENTER_SETTING)
        if run_id is None:
            return None
        rows = self._query(f"SELECT {self._RUN_COLUMNS} FROM training_runs WHERE id=? AND kind='segmenter'", (int(run_id),))
        return self._run(rows[0]) if rows else None

    def current_segmenter(self) -> TrainingRun | None:
        """The segmenter the project uses (export, evaluate, the next round's proposals): the one the
        user chose, else the newest."""
        return self.chosen_segmenter() or self.latest_run("segmenter")

    def choose_segmenter(self, run_id: int | None) -> None:
        """Make segmenter run `run_id` the current one (None: the newest again). Nothing is deleted:
        later rounds, masks and models stay as they are."""
        if run_id is None:
            with self._transaction() as db:
                db.execute("DELETE FROM settings WHERE key=?", (CURRENT_SEGMENTER_SETTING,))
            return
        run = self.training_run(run_id)
        if run.kind != "segmenter":
            raise ProjectError(f"run {run_id} is a {run.kind}, not a segmenter.")
        self.set_setting(CURRENT_SEGMENTER_SETTING, int(run_id))

    def training_run(self, run_id: int) -> TrainingRun:
        rows = self._query(f"SELECT {self._RUN_COLUMNS} FROM training_runs WHERE id=?", (run_id,))
        if not rows:
            raise ProjectError(f"no training run {run_id} in this project.")
        return self._run(rows[0])

    def training_runs(self, kind: str | None = None) -> list[TrainingRun]:
        if kind is None:
            rows = self._query(f"SELECT {self._RUN_COLUMNS} FROM training_runs ORDER BY id")
        else:
            rows = self._query(f"SELECT {self._RUN_COLUMNS} FROM training_runs WHERE kind=? ORDER BY id", (kind,))
        return [self._run(row) for row in rows]

    def latest_run(self, kind: str) -> TrainingRun | None:
        runs = self.training_runs(kind)
        return runs[-1] if runs else None

    # ----------------------------------------------------------------- review order
    def save_review_order(self, round_index: int, entries: Iterable[ReviewOrderEntry]) -> None:
        """Replace round `round_index`'s review order by `entries`, in one transaction."""
        rows = [(round_index, e.image_id, e.rank, float(e.score), e.reason, json.dumps(e.signals, default=float))
                for e in entries]
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM rounds WHERE idx=?", (round_index,)).fetchone() is None:
                raise ProjectError(f"this project has no round {round_index}.")
            db.execute("DELETE FROM review_order WHERE round_idx=?", (round_index,))
            db.executemany("INSERT INTO review_order(round_idx, image_id, rank, score, reason, signals) "
                           "VALUES (?, ?, ?, ?, ?, ?)", rows)

    def review_order(self, round_index: int) -> list[ReviewOrderEntry]:
        """Round `round_index`'s review order, rank 1 first ([] when none was computed)."""
        rows = self._query("SELECT image_id, rank, score, reason, signals FROM review_order WHERE round_idx=? "
                           "ORDER BY rank", (round_index,))
        return [ReviewOrderEntry(int(i), int(rank), float(score), reason, json.loads(signals))
                for i, rank, score, reason, signals in rows]

    # ----------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        return {
            "project": str(self.path),
            "image_root": str(self.image_root),
            "images": sum(self.tag_counts().values()),
            "tags": self.tag_counts(),
            "rounds": {str(k): v for k, v in self.mask_state_counts().items()},
            "training_runs": {kind: len(self.training_runs(kind)) for kind in ("classifier", "segmenter")},
        }


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class _StemsInUse:
    """The stems of the project's images and of those being added, asked one by one through the stems'
    unique index: reading every stem for each batch made a 100 000-image import quadratic."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._added: set[str] = set()

    def __contains__(self, stem: object) -> bool:
        return stem in self._added or self._db.execute("SELECT 1 FROM images WHERE stem=?", (stem,)).fetchone() is not None

    def add(self, stem: str) -> None:
        self._added.add(stem)


def _unique_stem(rel_path: str, taken: _StemsInUse) -> str:
    """The file's stem, or its folder-qualified name when another image already has that stem."""
    path = Path(rel_path)
    stem = path.stem
    if stem not in taken:
        return stem
    qualified = "__".join(path.with_suffix("").parts)
    candidate, counter = qualified, 2
    while candidate in taken:
        candidate = f"{qualified}__{counter}"
        counter += 1
    return candidate
