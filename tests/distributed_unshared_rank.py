"""A torchrun worker for tests/test_distributed.py: `distributed_unshared_rank.py PROJECT ARGS...` runs
`defect-studio ARGS...`, except that on every rank but 0 the folder PROJECT does not exist, as on a
machine without the shared file system (its directory test and file reads fail under that folder)."""

from __future__ import annotations

import os
import pathlib
import sys

hidden = pathlib.Path(sys.argv[1]).absolute()


def _under_hidden(path: pathlib.Path) -> bool:
    return path.absolute() == hidden or hidden in path.absolute().parents


if os.environ.get("RANK", "0") != "0":
    is_dir, read_text = pathlib.Path.is_dir, pathlib.Path.read_text

    def hidden_is_dir(self: pathlib.Path, *args, **kwargs) -> bool:  # type: ignore[no-untyped-def]
        return False if _under_hidden(self) else is_dir(self, *args, **kwargs)

    def hidden_read_text(self: pathlib.Path, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
        if _under_hidden(self):
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return read_text(self, *args, **kwargs)

    pathlib.Path.is_dir = hidden_is_dir  # type: ignore[method-assign]
    pathlib.Path.read_text = hidden_read_text  # type: ignore[method-assign]

from defect_studio.cli import main  # noqa: E402 - after the patch, as the worker's own imports would be

raise SystemExit(main(sys.argv[2:]))
