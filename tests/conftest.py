"""Shared fixtures: offline hub, the project's example data, the embedded model and its tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Convert the embedded model (once per machine: 90 s on the 2 shared cores under load) before the tests
    start, when a selected test needs it: inside the first such test it would count against that test's
    time bound (60 s for the first of a full run)."""
    if session.config.option.collectonly:
        return
    if any("embedded_model_path" in getattr(item, "fixturenames", ()) for item in session.items):
        from ftpipe.model.embedded import embedded_model_dir

        embedded_model_dir()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def examples() -> Path:
    """The project's own example data (written by the seeded scripts beside each data set)."""
    return REPO_ROOT / "examples"


@pytest.fixture(scope="session")
def alpaca_demo(examples: Path) -> Path:
    """999 alpaca-style rows (examples/alpaca/make_data.py)."""
    return examples / "alpaca" / "instructions.json"


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


@pytest.fixture(scope="session")
def run_ftpipe():
    """Run ``python -m ftpipe <command> ...`` in its own process group (Lightning re-runs the command line
    for the other ranks), log to a file, kill whatever is left, and assert exit status 0."""
    import contextlib
    import signal
    import subprocess
    import sys
    import time

    def run(command: str, args: list[str], log_path: Path, timeout: float, settle_s: float = 0.0) -> None:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        env.pop("PYTEST_CURRENT_TEST", None)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ftpipe", command, *args],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=timeout)
                time.sleep(settle_s)  # a re-run rank may finish just after rank 0
            except subprocess.TimeoutExpired:
                code = None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # any re-run rank still around
        assert code == 0, f"ftpipe {command} exited with {code}; log tail:\n{log_path.read_text()[-6000:]}"

    return run
