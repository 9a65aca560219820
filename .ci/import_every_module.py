"""Import every module of defect_studio, as the source folder given lists them, from the installed
package (run it outside the checkout): a module the install lacks, or an import of a package the
install did not bring (an undeclared dependency), fails. GUI modules too, offscreen."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def module_names(source: Path) -> list[str]:
    names = []
    for path in sorted(source.rglob("*.py")):
        parts = path.relative_to(source.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue  # importing it runs the command line
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def main() -> int:
    source = Path(sys.argv[1]).resolve()
    import defect_studio

    installed = Path(defect_studio.__file__).resolve().parent
    if installed == source:
        print(f"defect_studio was imported from the checkout ({installed}), not from the install", file=sys.stderr)
        return 1
    names = module_names(source) + ["defect_studio.resources"]
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # report every failing module, not just the first
            failed.append(name)
            traceback.print_exc()
    print(f"{len(names) - len(failed)} of {len(names)} modules imported from {installed}")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
