"""Markdown tables: what `defect-studio evaluate` prints and what the benchmark reports write.

A neutral module (no torch, no Qt) so the CLI and the benchmarks share it without importing each other.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)
