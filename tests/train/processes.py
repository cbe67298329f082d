"""Real processes for the training tests: ``ftpipe train`` command lines, running them (each in its own
process group, every process of it waited for or killed), their logs and metrics, and the outputs of a
run. Imported by ``conftest.py`` and by test modules that start their own launchers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "benchmark.yaml"  # fixed settings, independent of the demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, offline, without pytest's per-test variable, plus ``extra``."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(extra or {}),
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_processes(
    commands: list[list[str]], log_path: Path, timeout: float, env: dict[str, str] | None = None
) -> list[int]:
    """Run ``commands`` at once, each in its own process group, and wait for every process of every
    group (Lightning's re-run ranks included); kill them all on timeout. Returns the exit codes."""
    logs = [log_path.with_suffix(f".{i}.log") for i in range(len(commands))]
    return run_all(commands, logs, timeout, env, where=log_path.parent)


def run_all(
    commands: list[list[str]], log_paths: list[Path], timeout: float, env: dict[str, str] | None, where: Path
) -> list[int]:
    """``run_processes`` with a log file of its own for each command."""
    full_env = subprocess_env(env)
    deadline = time.monotonic() + timeout
    procs, logs = [], []
    try:
        for cmd, log_path in zip(commands, log_paths, strict=True):
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO_ROOT,
                    env=full_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        codes = []
        for proc in procs:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        for proc in procs:  # the re-run ranks finish on their own right after rank 0
            while group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        return codes
    except subprocess.TimeoutExpired:
        pytest.fail(f"training did not finish within {timeout:.0f}s; logs: {where}")
    finally:
        for proc in procs:
            kill_group(proc.pid)
        for log in logs:
            log.close()


def read_log(log_path: Path) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in sorted(log_path.parent.glob(log_path.stem + ".*.log"))
    )


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records, validation records) of a ``metrics.jsonl``."""
    steps, vals = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        (vals if "val_loss" in record else steps).append(record)
    return steps, vals


#: Settings of every run here unless a test gives its own: a configured MFU peak spares each rank the
#: 2048 x 2048 matmul benchmark at start (seconds per run on a busy 2-core machine).
RUN_DEFAULTS = {"peak_tflops_per_device": 1.0}


def ftpipe_cmd(overrides: dict[str, object]) -> list[str]:
    """``python -m ftpipe train --config configs/benchmark.yaml --key value ...`` (RUN_DEFAULTS first)."""
    cmd = [sys.executable, "-m", "ftpipe", "train", "--config", str(DEMO_CONFIG)]
    for key, value in {**RUN_DEFAULTS, **overrides}.items():
        cmd += [f"--{key}", "null" if value is None else str(value)]
    return cmd


class Run:
    """The outputs of one training run."""

    def __init__(self, out: Path, model_slug: Path, log_path: Path):
        self.out = out
        self.root = out / "results" / model_slug
        self.log_path = log_path

    @property
    def metrics(self) -> tuple[list[dict], list[dict]]:
        return read_metrics(self.root / "metrics.jsonl")

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.metrics[0]]

    def checkpoint(self, name: str = "last.ckpt") -> Path:
        """The newest run's checkpoint ``name`` (checkpoint names start with the run id)."""
        found = sorted((self.root / "checkpoints").glob(f"version_*/*-{name}"))
        assert found, f"no <run id>-{name} under {self.root / 'checkpoints'}"
        return found[-1]

    def manifest(self) -> dict:
        """The newest run's manifest (``run-<id>.json``)."""
        found = sorted((self.root / "checkpoints").glob("version_*/run-*.json"))
        assert found, f"no run manifest under {self.root / 'checkpoints'}"
        return json.loads(found[-1].read_text())

    def shard_reports(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.out / "shards").glob("shards_rank*.json"))]

    def log(self) -> str:
        return read_log(self.log_path)
