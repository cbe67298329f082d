"""Exact resume and surviving faults, on real 2-process runs of ``ftpipe train`` (gloo, tiny Llama, fp32).

- 6 uninterrupted steps vs 3 steps, a stop, a resume and 3 more: the same per-step losses (1e-6) and
  the same final LoRA weights, with LoRA dropout on (random states restored per rank) and the stop in
  the middle of an epoch (the stateful loader continues at the same sample); FSDP2 and FSDP1.
- A process killed in the middle of a checkpoint save: the next start resumes from the previous
  complete checkpoint and finishes; that start has 1 rank: a checkpoint of 2 ranks resumes on 1
  (distributed checkpoints reshard).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from ftpipe.config.paths import model_slug
from ftpipe.model.checkpoint import read_checkpoint
from ftpipe.train.resume import is_complete

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
HALF = 3


def _args(tmp_path: Path, tiny_llama: Path, alpaca_demo: Path, name: str, **overrides) -> dict:
    return {
        "hf_model_id": tiny_llama,
        "dataset": alpaca_demo,
        "data_dir": tmp_path / "data",
        "results_dir": tmp_path / name,
        "max_samples": 20,
        "train_ratio": 0.8,  # 16 training samples: 4 steps per epoch of 2 ranks x micro-batch 2
        "val_ratio": 0.1,
        "test_ratio": 0.1,
        "max_seq_length": 64,
        "micro_batch_size": 2,
        "gpus_per_node": 2,
        "max_steps": STEPS,
        "warmup_steps": 1,
        "learning_rate": 1e-3,
        "min_lr": 1e-4,
        "val_check_interval": HALF,
        "limit_val_batches": 1,
        "lora_dropout": 0.1,  # random: the resumed run must continue the same random streams
        "precision": "32-true",
        "early_stopping_patience": 5,
        "num_workers": 0,
        **overrides,
    }


def _root(tmp_path: Path, name: str, tiny_llama: Path) -> Path:
    return tmp_path / name / model_slug(str(tiny_llama))


def _steps(root: Path) -> list[dict]:
    lines = (root / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _last_weights(root: Path) -> dict[str, torch.Tensor]:
    found = sorted((root / "checkpoints").glob("version_*/*-last.ckpt"), key=lambda p: p.stat().st_mtime)
    return read_checkpoint(found[-1]).weights


def _assert_ok(started, timeout: float = 240) -> str:
    code = started.wait(timeout=timeout)
    log = started.log()
    assert code == 0, f"exit {code}; log tail:\n{log[-5000:]}"
    return log


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_stop_and_resume_equals_an_uninterrupted_run(
    tmp_path, tiny_llama, alpaca_demo, start_train, strategy
):
    """3 steps, a stop and a resume give the losses, learning rates, samples and final LoRA weights of 6
    uninterrupted steps; the resumed run's metrics keep the steps before the stop, every step once. The
    uninterrupted and the stopped run are independent: they run at the same time, each with its own
    folders (one's start-up overlaps the other's training)."""
    full_args = _args(tmp_path, tiny_llama, alpaca_demo, "full", strategy=strategy, data_dir=tmp_path / "d1")
    args = _args(tmp_path, tiny_llama, alpaca_demo, "split", strategy=strategy, data_dir=tmp_path / "d2")
    full_job = start_train(full_args, tmp_path / "full.log")
    stopped = start_train({**args, "stop_at_step": HALF}, tmp_path / "stopped.log")
    deadline = time.monotonic() + 300  # both at once; each took at most 240 s alone
    assert stopped.wait(timeout=300) == 3, stopped.log()[-5000:]
    assert "stopped, resumable" in stopped.log()
    _assert_ok(full_job, timeout=max(1.0, deadline - time.monotonic()))
    full = _steps(_root(tmp_path, "full", tiny_llama))
    assert [s["step"] for s in full] == list(range(1, STEPS + 1))
    root = _root(tmp_path, "split", tiny_llama)
    first = _steps(root)
    assert [s["step"] for s in first] == list(range(1, HALF + 1))

    log = _assert_ok(start_train({**args, "resume_from_checkpoint": "auto"}, tmp_path / "resumed.log"))
    assert "resuming from" in log
    history = _steps(root)  # the resumed run keeps the steps before its checkpoint: every step once
    assert [s["step"] for s in history] == list(range(1, STEPS + 1))
    assert history[:HALF] == first
    for a, b in zip(history, full, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["label_tokens"] == b["label_tokens"]  # the same samples at the same steps

    resumed_w, full_w = _last_weights(root), _last_weights(_root(tmp_path, "full", tiny_llama))
    assert resumed_w.keys() == full_w.keys() and resumed_w
    for key in full_w:
        torch.testing.assert_close(resumed_w[key], full_w[key], atol=1e-7, rtol=0, msg=key)


@pytest.mark.timeout(480)
def test_kill_during_checkpoint_save_resumes_from_the_previous_one_on_one_rank(
    tmp_path, tiny_llama, alpaca_demo, start_train
):
    """2 ranks killed in the middle of the save of step 4: the checkpoint of step 2 stays complete (a shard
    per rank) and the interrupted save is never published. The next start, on 1 rank (a distributed
    checkpoint of 2 ranks reshards; their random states cannot both continue: a warning), resumes from
    step 2, keeps the history up to it, finishes, and its saves remove the leftovers."""
    args = _args(tmp_path, tiny_llama, alpaca_demo, "crash", strategy="fsdp2", val_check_interval=2)
    crashed = start_train({**args, "kill_at_checkpoint_step": 4}, tmp_path / "crash.log")
    code = crashed.wait(timeout=240)
    assert code not in (0, None), crashed.log()[-5000:]
    folder = next((_root(tmp_path, "crash", tiny_llama) / "checkpoints").glob("version_*"))
    names = sorted(p.name for p in folder.iterdir())
    complete = [p for p in folder.glob("*.ckpt") if is_complete(p)]
    assert complete and all(read_checkpoint(p).global_step == 2 for p in complete), names
    assert all(len(list(p.glob("*.distcp"))) == 2 for p in complete), names  # one shard per rank
    assert any(n.endswith(".tmp") for n in names), names  # the interrupted save, never published

    one = {**args, "gpus_per_node": 1, "micro_batch_size": 4}  # the same global batch on 1 rank
    log = _assert_ok(start_train({**one, "resume_from_checkpoint": "auto"}, tmp_path / "again.log"))
    assert "resuming from" in log
    assert "random states of 2 rank(s), this run has 1" in log
    steps = _steps(_root(tmp_path, "crash", tiny_llama))
    # the history up to the checkpoint of step 2 is kept, the crashed run's steps 3-4 are replaced
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert not list(folder.glob("*.tmp")) and not list(folder.glob("*.old"))  # cleaned by later saves


def _worker_pids(parent: int) -> dict[int, int]:
    """``{local rank: pid}`` of the ftpipe workers among ``parent``'s children (Linux /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid != parent:
            continue
        for item in environ:
            if item.startswith(b"LOCAL_RANK="):
                found[int(item.split(b"=", 1)[1])] = int(proc.name)
    return found


@pytest.mark.timeout(480)
def test_killed_rank_under_torchrun_restarts_and_finishes(tmp_path, tiny_llama, alpaca_demo, start_train):
    args = _args(
        tmp_path, tiny_llama, alpaca_demo, "elastic", strategy="fsdp2", max_steps=8, val_check_interval=2
    )
    args["resume_from_checkpoint"] = "auto"
    root = _root(tmp_path, "elastic", tiny_llama)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    launcher += ["--max-restarts", "1", "--standalone", "-m"]
    # A fresh rendezvous store per restart: the shared agent store keeps the dead round's addresses.
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    job = start_train(args, tmp_path / "elastic.log", launcher=launcher, env=env)

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.proc.poll() is None:
        folder = root / "checkpoints"
        if any(is_complete(p) for p in folder.glob("version_*/*.ckpt")) and len(_steps(root)) >= 3:
            break
        time.sleep(0.5)
    workers = _worker_pids(job.proc.pid)
    assert 1 in workers, f"no worker of local rank 1 under torchrun: {workers}\n{job.log()[-3000:]}"
    os.kill(workers[1], signal.SIGKILL)

    log = _assert_ok(job, timeout=300)
    assert "resuming from" in log
    assert _steps(root)[-1]["step"] == 8
    final = sorted((root / "checkpoints").glob("version_*/*-last.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert read_checkpoint(final).global_step == 8


#: The hung-rank test's process_group_timeout_s. The same timeout bounds the group's rendezvous, which waits
#: for the re-run rank 1 to import the whole stack: up to 23 s on the 2 shared cores under load (15 s failed
#: there); 90 s leaves room for a machine twice as slow.
HANG_TIMEOUT_S = 90


@pytest.mark.timeout(600)
def test_a_hung_rank_fails_the_job_with_a_message_naming_it(tmp_path, tiny_llama, alpaca_demo, start_train):
    args = _args(
        tmp_path, tiny_llama, alpaca_demo, "hang", strategy="fsdp2", process_group_timeout_s=HANG_TIMEOUT_S
    )
    job = start_train({**args, "hang_rank": 1, "hang_at_step": 3}, tmp_path / "hang.log")
    # exit status 2 within the wait: the group's timeout ended the job (a wait that runs out gives None)
    code = job.wait(timeout=HANG_TIMEOUT_S + 420)
    log = job.log()
    assert code == 2, f"exit {code}; log tail:\n{log[-5000:]}"
    assert f"timed out after process_group_timeout_s={HANG_TIMEOUT_S} s: rank(s) 1 stopped responding" in log
    assert "rank 1: step 3" in log and "rank 0: step 3" in log


@pytest.mark.timeout(300)
def test_a_dead_rank_is_named_by_the_survivor(tmp_path, tiny_llama, alpaca_demo, start_train):
    """Rank 1 killed in the middle of training (SIGKILL, as the out-of-memory killer does): rank 0's next
    collective fails on a closed connection, and rank 0 says which rank went away, on which node and host,
    and where its log is; not "a bug in ftpipe" with gloo's traceback."""
    shards = tmp_path / "shards"
    args = _args(
        tmp_path, tiny_llama, alpaca_demo, "dead", strategy="fsdp2", max_steps=400, val_check_interval=200
    )
    job = start_train({**args, "shard_report_dir": shards}, tmp_path / "dead.log")
    deadline = time.monotonic() + 180
    while len(list(shards.glob("shards_rank*.json"))) < 2 and time.monotonic() < deadline:
        assert job.proc.poll() is None, job.log()[-5000:]
        time.sleep(0.1)
    time.sleep(1.0)  # a few steps in
    workers = _worker_pids(job.proc.pid)
    assert 1 in workers, f"no rank 1 child: {workers}\n{job.log()[-3000:]}"
    os.kill(workers[1], signal.SIGKILL)
    code = job.wait(timeout=120)
    log = job.log()
    assert code == 2, f"exit {code}; log tail:\n{log[-5000:]}"
    assert "This is a bug in ftpipe" not in log
    assert (
        f"rank 0: rank 1 (node 0, host {socket.gethostname()}, pid {workers[1]}) stopped during step" in log
    )
    assert "rank 1's log: /" in log and "--resume_from_checkpoint auto" in log
