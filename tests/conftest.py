"""Shared fixtures: offline hub, the shared data folder, the embedded model and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (override with FTPIPE_SHARED_DATA)."""
    folder = Path(os.environ.get("FTPIPE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not (folder / "alpaca_en_demo.json").is_file():
        pytest.fail(f"shared data not found in {folder}; set FTPIPE_SHARED_DATA")
    return folder


@pytest.fixture(scope="session")
def alpaca_demo(shared_data: Path) -> Path:
    return shared_data / "alpaca_en_demo.json"


@pytest.fixture(scope="session")
def embedded_model_path() -> Path:
    """The embedded SmolLM2 converted to safetensors (converted once per machine, then cached)."""
    from ftpipe.model.embedded import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_path)
