"""One app instance per project: a lock file naming its holder, held with an OS lock while open.

The OS lock (flock) disappears with the process, so a crash or a kill never leaves the project
locked for good: the next opener finds the file, sees nobody holds it, and takes it over.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from defect_studio.errors import ProjectError, ProjectLockedError

try:
    import fcntl
except ImportError:  # Windows: fall back to checking whether the recorded pid is alive
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "project.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _describe(holder: dict) -> str:
    return (
        f"process {holder.get('pid', '?')} of user {holder.get('user', '?')} on {holder.get('host', '?')}, "
        f"since {holder.get('since', '?')}"
    )


class ProjectLock:
    def __init__(self, project_dir: Path) -> None:
        self.path = Path(project_dir) / LOCK_NAME
        self._fd: int | None = None
        self.took_over_from: str | None = None  # set when a stale lock of a dead process was replaced

    def _read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as error:
            raise ProjectError(f"{self.path.parent}: the project folder is not writable ({error.strerror}).") from error
        except OSError as error:
            raise ProjectError(f"{self.path.parent}: cannot create the lock file ({error.strerror or error}).") from error
        holder = self._read_holder()
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ProjectLockedError(
                    f"{self.path.parent} is open in another defect-studio ({_describe(holder)}). "
                    "Close it there first."
                ) from None
        elif holder.get("pid") and holder.get("pid") != os.getpid() and _pid_alive(int(holder["pid"])):
            os.close(fd)
            raise ProjectLockedError(f"{self.path.parent} is open in another defect-studio ({_describe(holder)}).")
        if holder.get("pid"):
            self.took_over_from = _describe(holder)
        me = {
            "pid": os.getpid(),
            "user": getpass.getuser(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # The file is rewritten in place (not replaced): the flock lives on this inode.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty lock file means "closed cleanly"
        except OSError:
            pass
        finally:
            os.close(fd)  # closing drops the flock
