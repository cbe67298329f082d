"""SIGTERM during ``ftpipe train`` (2 processes, FSDP2): the current step finishes, the last checkpoint
is saved, the command exits with status 3 ("stopped, resumable"), and ``--resume_from_checkpoint auto``
continues from that checkpoint. The same when the whole process group gets the SIGTERM (``docker stop``,
Kubernetes, SLURM): data loader workers and rank 1 get it too, and no process is left behind.

The two-rank cases are one chain (each start of two ranks costs two imports of the whole stack): a SIGTERM
to rank 0, the resume, and a SIGTERM to the resumed run's whole group."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
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


def _group_args(tmp_path: Path, tiny_llama: Path, data: Path, **changes: object) -> dict[str, object]:
    """A long run on the tiny Llama (stopped by the test), with ``changes``."""
    return {
        "hf_model_id": tiny_llama,
        "dataset": data,
        "data_dir": tmp_path / "data",
        "results_dir": tmp_path / "results",
        "max_samples": 100,
        "max_seq_length": 64,
        "max_steps": 10_000,
        "warmup_steps": 1,
        "val_check_interval": 10_000,
        "micro_batch_size": 1,
        **changes,
    }


def _group_members(pgid: int) -> list[str]:
    """The live (not zombie) processes of process group ``pgid``: ``"pid command"`` each."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(f"{proc.name} {cmdline[:200]}")
    return members


def _stop_group_after_steps(started, metrics: Path, steps: int) -> int:
    """Wait for ``steps`` logged steps, SIGTERM the whole process group (as schedulers do), and return the
    launcher's exit status once it and every process of its group (ranks, data loader workers) are gone."""
    deadline = time.monotonic() + 240
    while len(train_steps(metrics)) < steps and started.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert started.proc.poll() is None and len(train_steps(metrics)) >= steps, started.log()[-4000:]
    pgid = started.proc.pid
    assert len(_group_members(pgid)) > 1, "expected data loader workers or a second rank in the group"
    os.killpg(pgid, signal.SIGTERM)
    try:
        code = started.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within 120 s of the group SIGTERM; log tail:\n{started.log()[-4000:]}")
    deadline = time.monotonic() + 20
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group_members(pgid)
    assert not left, f"processes left behind after exit {code}: {left}"
    return code


def _assert_stopped_with_checkpoint(started, root: Path, metrics: Path, code: int) -> Path:
    log = started.log()
    assert code == 3, f"exit {code}; log tail:\n{log[-4000:]}"
    assert "stopped, resumable" in log and "SIGTERM" in log
    assert "Traceback" not in log and "bug in ftpipe" not in log
    stopped_at = train_steps(metrics)[-1]
    named = re.search(r"stopped, resumable: .* the last checkpoint is (\S+)\. Run the same command", log)
    assert named, log[-4000:]
    last = Path(named.group(1))
    assert last.is_relative_to(root / "checkpoints")
    assert is_complete(last)
    assert read_checkpoint(last).global_step == stopped_at  # the checkpoint of the last finished step
    return last


@pytest.mark.timeout(480)
def test_group_sigterm_with_data_loader_workers_saves_and_resumes(
    tmp_path, tiny_llama, alpaca_demo, start_train
):
    """``kill -TERM -<pgid>`` (docker stop, Kubernetes, SLURM) reaches the data loader workers too: they
    ignore it, the main process stops after its step with a checkpoint, and the run resumes from it."""
    args = _group_args(tmp_path, tiny_llama, alpaca_demo, strategy="single", gpus_per_node=1, num_workers=2)
    root = tmp_path / "results" / model_slug(str(tiny_llama))
    metrics = root / "metrics.jsonl"
    first = start_train(args, tmp_path / "first.log")
    code = _stop_group_after_steps(first, metrics, steps=2)
    last = _assert_stopped_with_checkpoint(first, root, metrics, code)
    stopped_at = train_steps(metrics)[-1]

    resumed = start_train(
        {**args, "max_steps": stopped_at + 1, "resume_from_checkpoint": "auto"}, tmp_path / "r.log"
    )
    code = resumed.wait(timeout=180)
    assert code == 0, f"exit {code}; log tail:\n{resumed.log()[-4000:]}"
    assert f"resuming from {last}" in resumed.log()
    assert train_steps(metrics) == list(range(1, stopped_at + 2))


@pytest.mark.timeout(600)
def test_sigterm_on_two_ranks_saves_exits_3_resumes_and_a_group_sigterm_stops_the_resumed_run(
    tmp_path, tiny_llama, alpaca_demo, start_train
):
    """Two ranks (FSDP2), a data loader worker each. A SIGTERM to rank 0 alone (rank 1 learns it through
    the all-reduce): the checkpoint of the last finished step, exit status 3. The resume continues from
    it with the whole history, every step once. Then the resumed run's whole process group gets the
    SIGTERM (rank 1 is Lightning's child in the same group): every rank stops after the same step, the
    checkpoint is complete, no process is left."""
    args = _group_args(tmp_path, tiny_llama, alpaca_demo, strategy="fsdp2", gpus_per_node=2, num_workers=1)
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
    (last,) = (root / "checkpoints").glob("version_*/*-last.ckpt")
    assert is_complete(last)
    assert read_checkpoint(last).global_step == stopped_at  # the checkpoint of the last finished step

    resumed = start_train({**args, "resume_from_checkpoint": "auto"}, tmp_path / "r.log")
    code = _stop_group_after_steps(resumed, metrics, steps=stopped_at + 2)  # two steps after the resume
    _assert_stopped_with_checkpoint(resumed, root, metrics, code)
    assert f"resuming from {last}" in resumed.log()
    history = train_steps(metrics)
    assert history[-1] >= stopped_at + 2
    assert history == list(range(1, history[-1] + 1))  # the whole history, every step once


@pytest.mark.timeout(30)
def test_fit_leaves_the_signal_handlers_it_found():
    """Lightning installs its SIGTERM handler after the callbacks' ``setup`` and restores its own before
    their ``teardown``: the process leaves ``fit`` with the handlers it came with, not Lightning's (which
    would swallow a SIGTERM during the export or evaluation that follow)."""
    from ftpipe.train.step import OptimizerStep
    from ftpipe.train.stop import GracefulStop

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop = GracefulStop(OptimizerStep(3))
    try:
        stop.setup(None, None, "fit")
        signal.signal(signal.SIGTERM, lambda *_: None)  # Lightning's handler (it only takes note)
        stop.on_train_start(None, None)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode boundary
        assert stop.signal_name == "SIGTERM"
        signal.signal(signal.SIGTERM, before[signal.SIGTERM])  # Lightning's teardown, before the callbacks'
        stop.teardown(None, None, "fit")
        assert {sig: signal.getsignal(sig) for sig in before} == before
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
