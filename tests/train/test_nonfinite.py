"""A non-finite loss or gradient norm: the step is skipped (no update), counted in the logs and the step
metrics, and ``max_nonfinite_steps`` of them in a row stop training with exit status 2 on every rank.

The unit tests drive the step's end (``OptimizerStep.complete``, as the module calls it) directly; the distributed ones run
``ftpipe train`` (2 processes, FSDP2, tiny random Llama) with NaN losses injected on rank 0 through
the ``inject_nan_steps`` fault (the ``debug`` section).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ftpipe.config.paths import model_slug
from ftpipe.config.schema import PipelineConfig
from ftpipe.config.validate import ConfigError, validate_config
from ftpipe.errors import FtpipeError
from ftpipe.model.checkpoint import read_checkpoint
from ftpipe.train.faults import Faults
from ftpipe.train.module import SFTModule
from ftpipe.train.step import NonFiniteError, NonFiniteGuard, StepStats

REPO_ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")

# ---------------------------------------------------------------------------------------- units


@pytest.mark.timeout(30)
def test_guard_counts_resets_and_raises_at_the_limit():
    guard = NonFiniteGuard(max_in_a_row=2)
    assert guard.check(1, 2.0, 1.0) is False
    assert guard.check(2, NAN, 1.0) is True
    assert guard.check(3, 2.0, 0.5) is False  # a finite step ends the run
    assert (guard.total, guard.in_a_row) == (1, [])
    assert guard.check(4, 2.0, math.inf) is True
    with pytest.raises(NonFiniteError) as err:
        guard.check(5, -math.inf, NAN)
    assert isinstance(err.value, FtpipeError) and err.value.exit_code == 2
    text = str(err.value)
    assert "step 4: loss 2.0, grad_norm inf" in text and "step 5: loss -inf, grad_norm nan" in text
    assert "max_nonfinite_steps 2" in text and "learning_rate" in text and "step 2:" not in text
    assert guard.total == 3


@pytest.mark.timeout(30)
def test_guard_without_norm_checks_the_loss_only_and_restores_its_state():
    guard = NonFiniteGuard(max_in_a_row=3)
    assert guard.check(1, 1.0, None) is False
    assert guard.check(2, NAN, None) is True
    restored = NonFiniteGuard(max_in_a_row=3)
    restored.load(guard.state())
    assert restored.total == 1 and restored.in_a_row[0][0] == 2 and math.isnan(restored.in_a_row[0][1])
    assert restored.check(3, NAN, None) is True
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        restored.check(4, NAN, None)


@pytest.mark.timeout(30)
def test_nan_steps_are_a_checked_debug_field():
    cfg = PipelineConfig().replace(inject_nan_steps=[3, 4, 5])
    assert Faults.from_config(validate_config(cfg).debug).nan_steps == {3, 4, 5}
    assert Faults.from_config(PipelineConfig().debug) == Faults()
    with pytest.raises(ConfigError, match="inject_nan_steps"):
        validate_config(PipelineConfig().replace(inject_nan_steps=[0]))


def _grad_step(module: SFTModule, optimizer, layer, step: int, loss: float, grad_scale: float) -> StepStats:
    for p in layer.parameters():
        p.grad = torch.full_like(p, grad_scale)
    # one micro-batch of one unit (no rescaling): loss sum, units, tokens, padded, label tokens
    module.steps.add(torch.tensor([loss, 1, 8, 8, 1], dtype=torch.float64))
    stats = module.steps.complete(
        optimizer,
        step=step,
        accumulate=1,
        world_size=1,
        device=torch.device("cpu"),
        root=None,
        max_norm=1.0,
    )
    optimizer.step()
    assert stats is module.steps.last
    return stats


@pytest.mark.timeout(60)
def test_skipped_step_leaves_weights_and_adamw_state_alone_and_clipping_still_applies():
    torch.manual_seed(0)
    module = SFTModule(PipelineConfig().replace(max_nonfinite_steps=2))
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    before = [p.detach().clone() for p in layer.parameters()]

    stats = _grad_step(module, optimizer, layer, 1, NAN, 1.0)
    assert stats.skipped and stats.nonfinite_steps == 1 and math.isfinite(stats.grad_norm)
    assert all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
    assert not optimizer.state  # no AdamW moments or step count either

    stats = _grad_step(module, optimizer, layer, 2, 3.0, 10.0)  # finite: clipped to norm 1 and applied
    n = sum(p.numel() for p in layer.parameters())
    assert not stats.skipped and stats.nonfinite_steps == 1
    assert stats.grad_norm == pytest.approx(10.0 * math.sqrt(n))  # the norm before clipping
    clipped = torch.cat([p.grad.reshape(-1) for p in layer.parameters()])
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-4)
    assert not any(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
    updated = [p.detach().clone() for p in layer.parameters()]

    stats = _grad_step(module, optimizer, layer, 3, 3.0, math.inf)  # an infinite gradient norm
    assert stats.skipped and stats.nonfinite_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(updated, layer.parameters(), strict=True))
    with pytest.raises(NonFiniteError, match=r"step 4: loss nan"):
        _grad_step(module, optimizer, layer, 4, NAN, 1.0)


# ------------------------------------------------------------------------ 2 processes, FSDP2


def _train(
    tmp_path: Path, tiny_llama: Path, alpaca_demo: Path, overrides: dict, nan_steps: str, timeout: float
):
    """Run ``ftpipe train`` (2 ranks) with NaN losses at ``nan_steps``; (exit status, log text, results root).
    Fails when it runs past ``timeout`` or leaves a process of its group behind."""
    args = {
        "hf_model_id": tiny_llama,
        "dataset": alpaca_demo,
        "data_dir": tmp_path / "data",
        "results_dir": tmp_path / "results",
        "max_seq_length": 64,
        "micro_batch_size": 1,
        "warmup_steps": 1,
        "num_workers": 0,
        "inject_nan_steps": f"[{nan_steps}]",
        **overrides,
    }
    cmd = [sys.executable, "-m", "ftpipe", "train", "--config", str(REPO_ROOT / "configs" / "benchmark.yaml")]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    log_path = tmp_path / "train.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        code = proc.wait(timeout=timeout)
        deadline = time.monotonic() + 30  # rank 1 (Lightning's re-run) ends with rank 0
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _group_alive(proc.pid)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"ftpipe train did not end within {timeout:.0f}s (hang?); log tail:\n{log_path.read_text()[-4000:]}"
        )
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    text = log_path.read_text(errors="replace")
    assert not left, (
        f"a process of the run was still alive 30s after rank 0 exited; log tail:\n{text[-4000:]}"
    )
    return code, text, tmp_path / "results" / model_slug(str(tiny_llama))


def _records(metrics: Path) -> tuple[list[dict], dict[int, float]]:
    steps, vals = [], {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            vals[record["step"]] = record["val_loss"]
        else:
            steps.append(record)
    return steps, vals


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_one_nan_step_is_skipped_and_training_goes_on(tmp_path, tiny_llama, alpaca_demo):
    overrides = {"max_steps": 5, "val_check_interval": 1, "limit_val_batches": 1}
    code, text, root = _train(tmp_path, tiny_llama, alpaca_demo, overrides, nan_steps="3", timeout=240)
    assert code == 0, f"exit {code}; log tail:\n{text[-4000:]}"
    assert (
        "step 3: non-finite loss (nan)" in text and "optimizer update skipped (1 in a row, 1 in total" in text
    )

    steps, vals = _records(root / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert [s["skipped"] for s in steps] == [False, False, True, False, False]
    assert [s["nonfinite_steps"] for s in steps] == [0, 0, 1, 1, 1]
    assert math.isnan(steps[2]["loss"]) and math.isnan(steps[2]["grad_norm"])
    assert all(
        math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for i, s in enumerate(steps) if i != 2
    )

    # validation after every step: the skipped step changed no weight, the others did
    assert sorted(vals) == [1, 2, 3, 4, 5] and all(math.isfinite(v) for v in vals.values())
    assert vals[3] == vals[2]
    assert vals[2] != vals[1] and vals[4] != vals[3] and vals[5] != vals[4]

    (last,) = (root / "checkpoints").glob("version_*/*-last.ckpt")
    ckpt = read_checkpoint(last)
    assert ckpt.global_step == 5
    lora = {k: v for k, v in ckpt.weights.items() if "lora_" in k}
    assert lora and all(bool(torch.isfinite(v).all()) for v in lora.values())
    assert ckpt.meta["nonfinite"]["total"] == 1 and ckpt.meta["nonfinite"]["in_a_row"] == []


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_nan_steps_in_a_row_stop_with_exit_2_on_every_rank(tmp_path, tiny_llama, alpaca_demo):
    overrides = {"max_steps": 8, "val_check_interval": 100, "max_nonfinite_steps": 2}
    code, text, root = _train(tmp_path, tiny_llama, alpaca_demo, overrides, nan_steps="2,3,4", timeout=240)
    assert code == 2, f"exit {code}; log tail:\n{text[-4000:]}"
    errors = [line for line in text.splitlines() if " ERROR " in line and "non-finite" in line]
    assert errors, f"no error line; log tail:\n{text[-4000:]}"
    message = errors[0]
    assert "training stopped at step 3: 2 optimizer steps in a row" in message
    assert "step 2: loss nan, grad_norm nan; step 3: loss nan, grad_norm nan" in message
    assert "max_nonfinite_steps 2" in message and "learning_rate" in message
    assert any("rank 1" in line for line in errors), "rank 1 did not stop with the same error"
    assert "Traceback" not in text

    steps, _ = _records(root / "metrics.jsonl")
    assert [s["step"] for s in steps] == [1, 2]  # stopped inside step 3, before step 4
    assert [s["skipped"] for s in steps] == [False, True]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
