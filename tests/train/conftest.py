"""Helpers of the training tests: ``ftpipe train`` as a real subprocess (Lightning's launcher re-runs the
command line for the other ranks), a tiny random Llama for fast numeric checks, metrics readers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from processes import (
    REPO_ROOT,
    Run,
    ftpipe_cmd,
    group_alive,
    kill_group,
    run_all,
    run_processes,
    subprocess_env,
)


@pytest.fixture(scope="session")
def train_runner(tmp_path_factory, alpaca_demo) -> Callable[..., Run]:
    """``train_runner(name, overrides, timeout=...)`` runs ``ftpipe train`` and returns a Run (the launchers of
    the cluster engines: ``test_cluster_engines.py``).
    ``train_runner.together({name: overrides, ...}, timeout=...)`` starts independent runs at the same time
    (one's start-up overlaps the other's work) and returns their Runs by name."""
    base = tmp_path_factory.mktemp("train_runs")

    def commands_of(name: str, overrides: dict[str, object]) -> tuple[list, Run]:
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
        commands = [ftpipe_cmd(values)]
        return commands, Run(out, _model_slug(str(values.get("hf_model_id", "embedded"))), log_path)

    def together(runs: dict[str, dict[str, object]], timeout: float = 300) -> dict[str, Run]:
        planned = {name: commands_of(name, overrides) for name, overrides in runs.items()}
        commands = [cmd for cmds, _ in planned.values() for cmd in cmds]
        logs = [
            run.log_path.with_suffix(f".{i}.log") for cmds, run in planned.values() for i in range(len(cmds))
        ]
        codes = run_all(commands, logs, timeout, None, where=base)
        for (name, (_, result)), code in zip(planned.items(), codes, strict=True):
            assert code == 0, f"{name}: exit code {code}; log tail:\n{result.log()[-6000:]}"
        return {name: result for name, (_, result) in planned.items()}

    def run(name: str, overrides: dict[str, object], timeout: float = 300) -> Run:
        commands, result = commands_of(name, overrides)
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
            while group_alive(self.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)  # the re-run rank ends right after rank 0
            kill_group(self.proc.pid)

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
        kill_group(s.proc.pid)


@pytest.fixture(scope="session")
def reference(train_runner, tiny_llama, tmp_path_factory):
    """The tiny numerics runs' reference: one process, micro-batch 4, no accumulation (profiled: the
    profiler records, it changes nothing)."""
    from tiny_runs import run_tiny

    return run_tiny(
        train_runner,
        tiny_llama,
        "single_micro4",
        strategy="single",
        gpus_per_node=1,
        micro_batch_size=4,
        profile_dir=str(tmp_path_factory.mktemp("profile")),
    )
