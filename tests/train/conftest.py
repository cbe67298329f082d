"""Helpers of the training tests: ``ftpipe train`` as a real subprocess (Lightning's launcher re-runs the
command line for the other ranks), a tiny random Llama for fast numeric checks, metrics readers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "configs" / "benchmark.yaml"  # fixed settings, independent of the demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_group(pgid: int) -> None:
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
    return _run_all(commands, logs, timeout, env, where=log_path.parent)


def _run_all(
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
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        return codes
    except subprocess.TimeoutExpired:
        pytest.fail(f"training did not finish within {timeout:.0f}s; logs: {where}")
    finally:
        for proc in procs:
            _kill_group(proc.pid)
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


@pytest.fixture(scope="session")
def train_runner(tmp_path_factory, alpaca_demo) -> Callable[..., Run]:
    """``train_runner(name, overrides, timeout=..., torchrun_nodes=0)`` runs ``ftpipe train`` and returns a
    Run; with ``torchrun_nodes=N`` it starts N torchrun launchers (one per simulated node).
    ``train_runner.together({name: overrides, ...}, timeout=...)`` starts independent runs at the same time
    (one's start-up overlaps the other's work) and returns their Runs by name."""
    base = tmp_path_factory.mktemp("train_runs")

    def commands_of(name: str, overrides: dict[str, object], torchrun_nodes: int) -> tuple[list, Run]:
        out = base / name
        values = {
            "dataset": str(alpaca_demo),
            "data_dir": str(base / "data"),
            "results_dir": str(out / "results"),
            "num_workers": 0,
            "shard_report_dir": str(out / "shards"),
            **overrides,
        }
        log_path = out / "train"
        if torchrun_nodes:
            port = free_port()
            commands = []
            for node in range(torchrun_nodes):
                launcher = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--nnodes",
                    str(torchrun_nodes),
                    "--nproc-per-node",
                    "1",
                    "--node-rank",
                    str(node),
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    str(port),
                    "-m",
                ]
                commands.append(launcher + ftpipe_cmd(values)[2:])  # drop "python -m"
        else:
            commands = [ftpipe_cmd(values)]
        return commands, Run(out, _model_slug(str(values.get("hf_model_id", "embedded"))), log_path)

    def together(runs: dict[str, dict[str, object]], timeout: float = 300) -> dict[str, Run]:
        planned = {name: commands_of(name, overrides, 0) for name, overrides in runs.items()}
        commands = [cmd for cmds, _ in planned.values() for cmd in cmds]
        logs = [
            run.log_path.with_suffix(f".{i}.log") for cmds, run in planned.values() for i in range(len(cmds))
        ]
        codes = _run_all(commands, logs, timeout, None, where=base)
        for (name, (_, result)), code in zip(planned.items(), codes, strict=True):
            assert code == 0, f"{name}: exit code {code}; log tail:\n{result.log()[-6000:]}"
        return {name: result for name, (_, result) in planned.items()}

    def run(name: str, overrides: dict[str, object], timeout: float = 300, torchrun_nodes: int = 0) -> Run:
        commands, result = commands_of(name, overrides, torchrun_nodes)
        codes = run_processes(commands, result.log_path, timeout)
        assert codes == [0] * len(commands), f"exit codes {codes}; log tail:\n{result.log()[-6000:]}"
        return result

    run.together = together
    return run


def _model_slug(hf_model_id: str) -> Path:
    from ftpipe.config.paths import model_slug

    return model_slug(hf_model_id)


class Started:
    """A started ``ftpipe train`` (or torchrun) process group whose exit the test controls."""

    def __init__(self, proc: subprocess.Popen, log_path: Path):
        self.proc = proc
        self.log_path = log_path

    def wait(self, timeout: float) -> int | None:
        """Exit status of the launcher (None on timeout); every process of its group is gone after."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            deadline = time.monotonic() + 10
            while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)  # the re-run rank ends right after rank 0
            _kill_group(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_train(request) -> Callable[..., Started]:
    """``start_train(args, log_path, launcher=[], env={})``: ``ftpipe train --config benchmark.yaml`` with
    ``args`` (``launcher`` prefixes e.g. a torchrun command line), not waited for; killed at teardown."""
    started: list[Started] = []

    def start(
        args: dict[str, object], log_path: Path, launcher: list[str] | None = None, env: dict | None = None
    ) -> Started:
        cmd = ftpipe_cmd(args)
        if launcher:
            cmd = [*launcher, *cmd[2:]]  # drop "python -m"
        full_env = subprocess_env(env)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append(Started(proc, log_path))
        return started[-1]

    yield start
    for s in started:
        _kill_group(s.proc.pid)
