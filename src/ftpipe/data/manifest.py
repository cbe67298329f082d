"""The manifest of a prepared data folder (``manifest.json``): what was prepared, from what, how many rows."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"
#: Written last into a prepared folder: a folder without it is never used (nor read as source data).
READY_MARKER = ".data_ready"
#: The keys a prepared row may hold: ``{"input", "output"}`` or ``{"messages"[, "tools"]}``, with ``id``
#: and ``source``.
PREPARED_KEYS = frozenset({"id", "source", "input", "output", "messages", "tools"})


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a prepared folder; None when it is missing or unreadable."""
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
