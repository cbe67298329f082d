"""SIGTERM during ``ftpipe train`` (2 processes, FSDP2): the current step finishes, the last checkpoint
is saved, the command exits with status 3 ("stopped, resumable"), and ``--resume_from_checkpoint auto``
continues from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ftpipe.config.paths import model_slug
from ftpipe.model.checkpoint import read_checkpoint
from ftpipe.train.resume import is_complete

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def train_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.timeout(420)
def test_sigterm_saves_a_checkpoint_exits_3_and_resumes(tmp_path, tiny_llama, alpaca_demo, start_train):
    args = {
        "hf_model_id": tiny_llama,
        "dataset": alpaca_demo,
        "data_dir": tmp_path / "data",
        "results_dir": tmp_path / "results",
        "max_seq_length": 64,
        "max_steps": 10_000,
        "warmup_steps": 1,
        "val_check_interval": 10_000,
        "micro_batch_size": 1,
        "num_workers": 0,
    }
    root = tmp_path / "results" / model_slug(str(tiny_llama))
    metrics = root / "metrics.jsonl"

    first = start_train(args, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    while len(train_steps(metrics)) < 3 and first.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.proc.poll() is None and len(train_steps(metrics)) >= 3, first.log()[-4000:]
    os.kill(first.proc.pid, signal.SIGTERM)  # rank 0 only: rank 1 learns it through the all-reduce
    code = first.wait(timeout=120)
    assert code == 3, f"exit {code}; log tail:\n{first.log()[-4000:]}"
    assert "stopped, resumable" in first.log() and "SIGTERM" in first.log()

    stopped_at = train_steps(metrics)[-1]
    assert stopped_at < 10_000
    (last,) = (root / "checkpoints").glob("version_*/last.ckpt")
    assert is_complete(last)
    assert read_checkpoint(last).global_step == stopped_at  # the checkpoint of the last finished step

    resumed = start_train(
        {**args, "max_steps": stopped_at + 2, "resume_from_checkpoint": "auto"}, tmp_path / "r.log"
    )
    code = resumed.wait(timeout=240)
    assert code == 0, f"exit {code}; log tail:\n{resumed.log()[-4000:]}"
    assert f"resuming from {last}" in resumed.log()
    assert train_steps(metrics) == list(range(1, stopped_at + 3))  # the whole history, every step once
