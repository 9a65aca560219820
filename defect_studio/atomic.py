"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Everything the tool writes goes through here: write a temporary file in the same folder, flush
and fsync it, then `os.replace` it over the target (atomic on POSIX and Windows), then fsync the
folder so that the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from defect_studio.errors import DefectStudioError

TEMP_SUFFIX = ".partial"


class WriteError(DefectStudioError, OSError):
    """A file could not be written (disk full, read-only folder...); the old file is unchanged.

    Both an OSError (for code that handles those) and a DefectStudioError (the CLI prints the
    message, the GUI shows a dialog, no traceback)."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}. The previous version is unchanged."


# ----------------------------------------------------------------- fault injection (tests only)
# The crash-safety tests make the N-th write or commit of a process fail, to prove that no kill
# and no full disk loses saved work. Unset (always, outside tests) this costs one `is None` test.
FAULT_ENV = "DEFECT_STUDIO_FAULT_INJECTION"  # "count:FILE" | "kill:N" | "enospc:N"  (N counts from 1)


class _FaultPlan:
    def __init__(self, spec: str) -> None:
        mode, _, argument = spec.partition(":")
        if mode not in ("count", "kill", "enospc") or not argument:
            raise ValueError(f"{FAULT_ENV}={spec!r}: expected count:FILE, kill:N or enospc:N")
        self.mode = mode
        self.log_path = argument if mode == "count" else None
        self.target = int(argument) if mode != "count" else 0
        self.calls = 0


_fault_plan: _FaultPlan | None = _FaultPlan(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None


def configure_faults(spec: str | None) -> None:
    """Set (or clear, with None) the fault plan of this process; the env var sets it at import."""
    global _fault_plan
    _fault_plan = _FaultPlan(spec) if spec else None


def fault_point(name: str, disk_write: bool = False) -> None:
    """A place where a crash or a full disk can strike: before/after a file replace or a commit.

    `count:FILE` appends each point's name to FILE (to learn how many points a run passes);
    `kill:N` SIGKILLs this process at the N-th point; `enospc:N` raises "No space left on device"
    at the N-th point that writes to disk (`disk_write`), and only there.
    """
    plan = _fault_plan
    if plan is None:
        return
    if plan.mode == "enospc" and not disk_write:
        return
    plan.calls += 1
    if plan.mode == "count":
        with open(plan.log_path, "a", encoding="utf-8") as log:  # type: ignore[arg-type]
            log.write(name + "\n")
    elif plan.calls == plan.target:
        if plan.mode == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" (injected at {name})")


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once at import, before worker threads exist
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a power cut."""
    if os.name != "posix":  # Windows cannot open a directory for fsync
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on clean exit it replaces `path` atomically.

    If the block raises, the temporary file is removed and `path` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes only, got mode {mode!r}")
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; the user's files get the usual umask permissions
            os.fchmod(fd, 0o666 & ~_UMASK)
    except OSError as error:
        raise WriteError(error.errno, error.strerror or str(error), str(target)) from error
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        fault_point(f"write-temp {target.name}", disk_write=True)
        os.replace(temp_name, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        if isinstance(error, OSError) and not isinstance(error, WriteError) and error.errno is not None:
            raise WriteError(error.errno, error.strerror or str(error), str(target)) from error
        raise
    fsync_directory(target.parent)
    fault_point(f"replaced {target.name}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete temporaries left by a writer that was killed mid-write; returns how many."""
    removed = 0
    root = Path(directory)
    if not root.is_dir():
        return 0
    for temp in sorted(root.rglob(f".*{TEMP_SUFFIX}")):
        with contextlib.suppress(OSError):
            if temp.is_dir() and not temp.is_symlink():  # a staging folder (an export's)
                shutil.rmtree(temp)
            else:
                temp.unlink()
            removed += 1
    return removed


# ----------------------------------------------------------------- staged replacement
# A file that a database row describes (a mask and its sha256) must change together with the row.
# Replacing the file first and committing second loses the old, saved content if a crash falls
# between the two. So: write the new content to a staged file named after its hash, commit the
# row, then promote the staged file. On open, the project store finishes a promotion whose commit
# happened and discards one whose commit did not (`Project._recover_staged_files`).
STAGED_SUFFIX = ".staged"


def staged_path(target: str | os.PathLike[str], sha256: str) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.{sha256[:16]}{STAGED_SUFFIX}"


def stage_bytes(target: str | os.PathLike[str], data: bytes, sha256: str) -> Path:
    """Write `data` durably beside `target` without touching it; returns the staged file."""
    staged = staged_path(target, sha256)
    atomic_write_bytes(staged, data)
    return staged


def promote_staged(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    target = Path(target)
    fault_point(f"promote {target.name}")
    os.replace(staged, target)
    fsync_directory(target.parent)
    fault_point(f"promoted {target.name}")


def parse_staged_name(staged: Path) -> tuple[Path, str] | None:
    """(target, sha256 prefix) of a staged file, or None if the name is not one of ours."""
    name = staged.name
    if not (name.startswith(".") and name.endswith(STAGED_SUFFIX)):
        return None
    target_name, _, sha_prefix = name[1 : -len(STAGED_SUFFIX)].rpartition(".")
    if not target_name or len(sha_prefix) != 16:
        return None
    return staged.parent / target_name, sha_prefix
