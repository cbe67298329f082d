"""The manifest of a prepared data folder (``manifest.json``): what was prepared, from what, how many rows."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a prepared folder; None when it is missing or unreadable."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
