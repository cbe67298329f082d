"""SIGTERM during ``ftpipe train`` (2 processes, FSDP2): the current step finishes, the last checkpoint
is saved, the command exits with status 3 ("stopped, resumable"), and ``--resume_from_checkpoint auto``
continues from that checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.config.paths import model_slug
from ftpipe.export.checkpoint import read_checkpoint
from ftpipe.train.resume import is_complete

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _start(args: dict[str, object], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ftpipe", "train", "--config", str(REPO_ROOT / "configs" / "demo.yaml")]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def _finish(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        time.sleep(2)  # the re-run rank ends right after rank 0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(420)
def test_sigterm_saves_a_checkpoint_exits_3_and_resumes(tmp_path, tiny_llama, alpaca_demo):
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
    }
    root = tmp_path / "results" / model_slug(str(tiny_llama))
    metrics = root / "metrics.jsonl"

    log1 = tmp_path / "first.log"
    proc = _start(args, log1)
    deadline = time.monotonic() + 240
    while len(_steps(metrics)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None and len(_steps(metrics)) >= 3, log1.read_text()[-4000:]
    os.kill(proc.pid, signal.SIGTERM)  # rank 0 only: rank 1 learns it through the all-reduce
    code = _finish(proc, timeout=120)
    text = log1.read_text()
    assert code == 3, f"exit {code}; log tail:\n{text[-4000:]}"
    assert "stopped, resumable" in text and "SIGTERM" in text

    stopped_at = _steps(metrics)[-1]
    assert stopped_at < 10_000
    (last,) = (root / "checkpoints").glob("version_*/last.ckpt")
    assert is_complete(last)
    assert read_checkpoint(last).global_step == stopped_at  # the checkpoint of the last finished step

    log2 = tmp_path / "resumed.log"
    proc = _start({**args, "max_steps": stopped_at + 2, "resume_from_checkpoint": "auto"}, log2)
    code = _finish(proc, timeout=240)
    text = log2.read_text()
    assert code == 0, f"exit {code}; log tail:\n{text[-4000:]}"
    assert f"resuming from {last}" in text
    assert _steps(metrics)[-2:] == [stopped_at + 1, stopped_at + 2]
