"""Fixtures of the export tests: a tiny random Llama folder and configurations pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tiny_llama: Path) -> Path:
    """The shared tiny random Llama folder (tests/conftest.py)."""
    return tiny_llama
