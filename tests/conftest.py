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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, embedded_model_path: Path) -> Path:
    """A tiny randomly initialised Llama (2 layers, hidden 64, tied embeddings) with the embedded model's
    tokenizer and chat template, saved as a local Hugging Face folder: numeric checks run in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
