"""The project database schema as an ordered list of migrations.

`schema_version` in the `meta` table says how many migrations a database has had. Opening a
project runs the missing ones in order, each in its own transaction, so an old project is
upgraded in place and a crash mid-migration leaves it at the previous version.
"""

from __future__ import annotations

import sqlite3

from defect_studio.atomic import fault_point
from defect_studio.errors import ProjectError

MIGRATIONS: list[str] = [
    # 1: images and their tags
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        rel_path TEXT NOT NULL UNIQUE,
        stem TEXT NOT NULL UNIQUE,
        sha256 TEXT NOT NULL UNIQUE,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        channels INTEGER NOT NULL,
        bit_depth INTEGER NOT NULL,
        added_at TEXT NOT NULL,
        tag TEXT NOT NULL DEFAULT 'untagged' CHECK (tag IN ('good', 'defect', 'untagged')),
        tag_source TEXT,
        tagged_at TEXT
    );
    CREATE TABLE tag_events (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id),
        tag TEXT NOT NULL,
        source TEXT NOT NULL,
        at TEXT NOT NULL
    );
    """,
    # 2: refinement rounds, masks with provenance and review state, training runs
    """
    CREATE TABLE rounds (
        idx INTEGER PRIMARY KEY,
        created_at TEXT NOT NULL,
        status TEXT NOT NULL,
        config TEXT NOT NULL DEFAULT '{}',
        metrics TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE masks (
        image_id INTEGER NOT NULL REFERENCES images(id),
        round_idx INTEGER NOT NULL REFERENCES rounds(idx),
        path TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('proposed', 'accepted', 'rejected', 'edited')),
        source TEXT NOT NULL,
        params TEXT NOT NULL DEFAULT '{}',
        flagged INTEGER NOT NULL DEFAULT 0,
        sha256 TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (image_id, round_idx)
    );
    CREATE TABLE mask_events (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL,
        round_idx INTEGER NOT NULL,
        state TEXT NOT NULL,
        source TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE training_runs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('classifier', 'segmenter')),
        created_at TEXT NOT NULL,
        config TEXT NOT NULL,
        seed INTEGER NOT NULL,
        metrics TEXT NOT NULL,
        checkpoint_path TEXT NOT NULL,
        checkpoint_sha256 TEXT NOT NULL,
        dataset_hashes TEXT NOT NULL,
        round_idx INTEGER
    );
    CREATE INDEX masks_by_round ON masks(round_idx, state);
    CREATE INDEX tag_events_by_image ON tag_events(image_id);
    """,
    # 3: provenance of every trained model: what it was trained on (one row per image: the mask's
    # round, state and hash for a segmenter, the tag for a classifier) and how (settings, warm start)
    """
    ALTER TABLE training_runs ADD COLUMN provenance TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE run_inputs (
        run_id INTEGER NOT NULL REFERENCES training_runs(id),
        image_id INTEGER NOT NULL REFERENCES images(id),
        round_idx INTEGER,
        label TEXT NOT NULL,
        image_sha256 TEXT NOT NULL,
        mask_sha256 TEXT,
        PRIMARY KEY (run_id, image_id)
    );
    """,
    # 4: decisions taken on the mislabel queue: a tag confirmed or flipped (undoable: undone_at)
    """
    CREATE TABLE tag_reviews (
        id INTEGER PRIMARY KEY,
        image_id INTEGER NOT NULL REFERENCES images(id),
        action INTEGER NOT NULL,
        decision TEXT NOT NULL CHECK (decision IN ('confirmed', 'flipped')),
        old_tag TEXT NOT NULL,
        new_tag TEXT NOT NULL,
        at TEXT NOT NULL,
        undone_at TEXT
    );
    CREATE INDEX tag_reviews_by_image ON tag_reviews(image_id);
    """,
    # 5: the "edit these first" order of a round's proposals (ml.review_order): rank, score, reason, signals
    """
    CREATE TABLE review_order (
        round_idx INTEGER NOT NULL REFERENCES rounds(idx),
        image_id INTEGER NOT NULL REFERENCES images(id),
        rank INTEGER NOT NULL,
        score REAL NOT NULL,
        reason TEXT NOT NULL,
        signals TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY (round_idx, image_id)
    );
    """,
]

LATEST_VERSION = len(MIGRATIONS)


def schema_version(connection: sqlite3.Connection) -> int:
    has_meta = connection.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
    if not has_meta:
        return 0
    row = connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(connection: sqlite3.Connection, target: int = LATEST_VERSION) -> int:
    """Bring the database up to `target`; returns the version it had before."""
    before = schema_version(connection)
    if before > LATEST_VERSION:
        raise ProjectError(
            f"this project was written by a newer defect-studio (schema {before}, this version knows "
            f"{LATEST_VERSION}); update defect-studio to open it."
        )
    for version in range(before + 1, target + 1):
        script = MIGRATIONS[version - 1]
        # executescript would commit implicitly statement by statement; one explicit transaction instead.
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, script.split(";")):
                connection.execute(statement)
            connection.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(version),),
            )
            fault_point("commit migration", disk_write=True)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        fault_point("committed migration")
    return before
