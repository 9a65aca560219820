"""One way to print and save a benchmark table: markdown on stdout, plus JSON and .md files."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from defect_studio.atomic import atomic_write_json, atomic_write_text
from defect_studio.markdown import markdown_table


def machine_summary() -> dict[str, Any]:
    import os

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(
    out_dir: str | Path,
    name: str,
    title: str,
    tables: Sequence[tuple[str, Sequence[dict[str, Any]], Sequence[str]]],
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> str:
    """Write `<name>.json` and `<name>.md` into out_dir; return the markdown (the caller prints it).

    `tables` is a list of (heading, rows, columns).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_summary()
    parts = [f"# {title}", "", f"Machine: {machine['platform']}, {machine['cpu_count']} CPU cores, "
             f"torch {machine['torch']}, CUDA: {machine['cuda'] or 'none'}; run {machine['date']}.", ""]
    for heading, rows, columns in tables:
        parts += [f"## {heading}", "", markdown_table(rows, columns), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    markdown = "\n".join(parts)
    atomic_write_text(out / f"{name}.md", markdown)
    atomic_write_json(
        out / f"{name}.json",
        {"title": title, "machine": machine, "tables": {h: list(r) for h, r, _ in tables}, "notes": list(notes), **(extra or {})},
    )
    return markdown
