"""`KEY=VALUE` command-line settings (`defect-studio cam --set`, `bench full --segmenter-set`) -> a dict."""

from __future__ import annotations

import json
from typing import Any

from defect_studio.errors import DataError


def parse_key_values(pairs: list[str] | None, option: str, as_json: bool = False) -> dict[str, Any]:
    """['q=0.8', 'stages=2,3'] -> {'q': '0.8', 'stages': '2,3'}: values stay text for the settings' own
    coercion, or with `as_json` become JSON values where they parse (numbers, lists, true/false)."""
    settings: dict[str, Any] = {}
    for pair in pairs or []:
        name, separator, value = pair.partition("=")
        if not separator or not name.strip():
            raise DataError(f"{option} expects key=value, got {pair!r}.")
        value = value.strip()
        if as_json:
            try:
                value = json.loads(value)
            except ValueError:
                pass  # plain text, e.g. an architecture name
        settings[name.strip()] = value
    return settings
