"""The `defect-studio` command line.

Each `defect_studio/cli/*_cmds.py` module registers its own subcommands through
`register(subparsers)`; handlers take the parsed arguments and return an exit code.
With no subcommand, the desktop app opens.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import Sequence

from defect_studio import __version__
from defect_studio.errors import DefectStudioError
from defect_studio.jobs import JobCancelled

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="defect-studio",
        description="Turn images tagged good/defect into a pixel-level defect segmenter. "
        "Run without a command to open the desktop app.",
    )
    parser.add_argument("--version", action="version", version=f"defect-studio {__version__}")
    parser.add_argument("--verbose", action="store_true", help="log details to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package = importlib.import_module(__name__)
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if module_info.name.endswith("_cmds"):
            importlib.import_module(f"{__name__}.{module_info.name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `--nproc N` relaunches this very command line
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        from defect_studio.gui.app import run_app

        return run_app(project_path=None, whole_process=True)
    try:
        return int(args.handler(args) or EXIT_OK)
    except JobCancelled:
        print("Cancelled; the previous results are unchanged.", file=sys.stderr)
        return EXIT_CANCELLED
    except DefectStudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_CANCELLED
