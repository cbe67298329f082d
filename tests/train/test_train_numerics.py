"""Numeric equivalences of the training loop, on REAL processes (``ftpipe train`` subprocesses, gloo).

For speed these runs use a TINY randomly initialised Llama (2 layers, hidden 64; the ``tiny_llama``
fixture saves it as a local Hugging Face folder) in fp32 with LoRA dropout 0. The training split holds
exactly 4 samples and every run's global batch is 4, so every optimizer step sees the whole split
whatever the sampler's order: the single-process, accumulated, FSDP2, FSDP1 and torchrun runs all
compute the same steps, and their losses, gradient norms and LoRA weights must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import TINY
from tiny_runs import assert_same_steps as _assert_same_steps
from tiny_runs import assert_same_weights as _assert_same_weights
from tiny_runs import run_tiny as _run

from ftpipe.model.checkpoint import read_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def fsdp2_run(train_runner, tiny_llama):
    """FSDP2, 2 processes x micro-batch 2."""
    return _run(train_runner, tiny_llama, "fsdp2_2x2", strategy="fsdp2", gpus_per_node=2, micro_batch_size=2)


@pytest.fixture(scope="module")
def fsdp1_run(train_runner, tiny_llama):
    """FSDP1 (sharded state dicts, the CPU strategy subclass), 2 processes x micro-batch 2."""
    return _run(train_runner, tiny_llama, "fsdp1_2x2", strategy="fsdp1", gpus_per_node=2, micro_batch_size=2)


def _split_label_tokens(run) -> int:
    """The label tokens of the run's whole training split, counted from its prepared rows."""
    from ftpipe.config import load_config, prepared_data_dir
    from ftpipe.data.build import SPLIT_FILES
    from ftpipe.data.prepare import read_jsonl
    from ftpipe.data.tokenize import IGNORE_INDEX, encode_example
    from ftpipe.model.tokenizer import load_tokenizer

    cfg = load_config(run.root / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    rows = read_jsonl(prepared_data_dir(cfg.data) / SPLIT_FILES["train"])
    assert len(rows) == 4
    encoded = [encode_example(tokenizer, row, cfg.data) for row in rows]
    return sum(sum(label != IGNORE_INDEX for label in e.labels) for e in encoded)


@pytest.mark.timeout(600)
def test_profile_and_the_checkpointing_choice_of_the_reference_run(reference):
    """``profile_dir``: the operators of two profiled batches by self time, and a trace; ``auto``
    checkpointing (the default) is off for a model this small, with both estimates in the log; the command
    started over with ftpipe's malloc tunables (glibc)."""
    import re

    from ftpipe.utils.allocator import uses_glibc

    log = reference.log()
    folder = Path(re.search(r"profile_dir: (\S+)", (reference.root / "config.yaml").read_text()).group(1))
    table = (folder / "profile-rank0.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table
    assert json.loads((folder / "trace-rank0.json").read_text())["traceEvents"]
    line = next(x for x in log.splitlines() if "(auto)" in x)
    assert "activation checkpointing off (auto): the estimate is" in line and "with it" in line
    assert re.search(r"activation_checkpointing: false", (reference.root / "config.yaml").read_text())
    if uses_glibc():
        assert "glibc malloc without tcache and fast bins" in log


@pytest.mark.timeout(600)
def test_step_losses_are_token_means_over_the_whole_step(reference):
    """The logged loss is the mean over the step's label tokens; the clip threshold is below the norm."""
    steps, vals = reference.metrics
    expected = _split_label_tokens(reference)
    assert expected > 40  # 4 answers with their EOS
    assert [s["label_tokens"] for s in steps] == [expected] * 3  # the 4 samples' label tokens, every step
    assert steps[0]["grad_norm"] > TINY["gradient_clip_val"]
    assert steps[2]["loss"] < steps[0]["loss"]  # the same batch three times: it learns
    assert [v["step"] for v in vals] == [2]


@pytest.mark.timeout(600)
def test_accumulation_equivalence(train_runner, tiny_llama, reference):
    """micro-batch 1 x accumulation 4 == micro-batch 4 x accumulation 1 (losses, norms, weights)."""
    accumulated = _run(
        train_runner,
        tiny_llama,
        "single_micro1_acc4",
        strategy="single",
        gpus_per_node=1,
        micro_batch_size=1,
        accumulate_grad_batches=4,
    )
    _assert_same_steps(accumulated, reference, rel=1e-5)
    # 1% of one learning-rate step, the bound of the other comparisons: padding and summation order
    # differ between the two runs (the chunked loss sums per micro-batch chunk), and AdamW's near-sign
    # first steps amplify that fp32 noise to 4.4e-6 here; weighting the tokens differently moves
    # weights by whole steps (1e-3)
    _assert_same_weights(accumulated, reference, atol=1e-5)


@pytest.mark.timeout(600)
def test_fsdp2_two_ranks_match_one_process(fsdp2_run, reference):
    """2 ranks x micro-batch 2 (FSDP2) == 1 process x micro-batch 4, clipping included; each rank holds
    half of the parameters."""
    _assert_same_steps(fsdp2_run, reference)
    _assert_same_weights(fsdp2_run, reference)
    reports = fsdp2_run.shard_reports()
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        start = r["start"]
        assert start["trainable_local"] == start["trainable_global"] // 2
        assert abs(start["frozen_local"] - start["frozen_global"] / 2) <= 0.01 * start["frozen_global"]


@pytest.mark.timeout(600)
def test_fsdp1_two_ranks_match_one_process(fsdp1_run, reference):
    """FSDP1 gives the same losses and global gradient norms (FSDP's own clip_grad_norm_) as one
    process; each rank holds half of the (flattened) parameters."""
    _assert_same_steps(fsdp1_run, reference)
    _assert_same_weights(fsdp1_run, reference)
    reports = fsdp1_run.shard_reports()
    total = reports[0]["total_params"]
    assert total == sum(r["start"]["trainable_local"] + r["start"]["frozen_local"] for r in reports)
    for r in reports:
        local = r["start"]["trainable_local"] + r["start"]["frozen_local"]
        assert abs(local - total / 2) <= 0.01 * total


@pytest.mark.timeout(600)
def test_ddp_two_ranks_match_one_process(train_runner, tiny_llama, reference):
    """DDP (gradients averaged over ranks, then rescaled to the token mean) matches one process."""
    run = _run(train_runner, tiny_llama, "ddp_2x2", strategy="ddp", gpus_per_node=2, micro_batch_size=2)
    _assert_same_steps(run, reference)
    _assert_same_weights(run, reference)
    assert run.checkpoint("last.ckpt").is_file()  # DDP saves one ordinary checkpoint file


@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_sharded_checkpoint_holds_adapters_only_and_resumes(request, train_runner, tiny_llama, strategy):
    """The distributed checkpoint holds the LoRA weights and their AdamW state, not the frozen base;
    resuming from the step-2 checkpoint reproduces step 3 of the uninterrupted run."""
    full = request.getfixturevalue(f"{strategy}_run")
    best = full.checkpoint("step=2-*")
    assert best.is_dir() and len(list(best.glob("*.distcp"))) == 2  # one file per rank
    ckpt = read_checkpoint(best)
    n_adapter = sum(v.numel() for v in ckpt.weights.values())
    assert n_adapter == 65_536 and all(".lora_" in k for k in ckpt.weights)
    assert ckpt.meta["trainable_only"] is True and ckpt.global_step == 2
    size = sum(p.stat().st_size for p in best.iterdir())
    assert size < 4 * 3 * n_adapter + 500_000  # weights + 2 Adam moments in fp32 + metadata; base is 13 MB
    resumed = _run(
        train_runner,
        tiny_llama,
        f"{strategy}_resumed",
        strategy=strategy,
        gpus_per_node=2,
        micro_batch_size=2,
        resume_from_checkpoint=str(best),
    )
    steps = resumed.metrics[0]
    assert [s["step"] for s in steps] == [3]
    assert steps[0]["loss"] == pytest.approx(full.metrics[0][2]["loss"], rel=1e-6)
    assert steps[0]["lr"] == pytest.approx(full.metrics[0][2]["lr"])
    _assert_same_weights(resumed, full, atol=1e-7)
    assert "Did not find param" not in resumed.log()  # FSDP1: the frozen keys are absent on purpose


@pytest.mark.timeout(600)
def test_packed_training_on_two_fsdp2_ranks(train_runner, tiny_llama):
    """Packing through the whole stack: FSDP2 on 2 processes, the chunked loss, the isolation check."""
    run = _run(
        train_runner,
        tiny_llama,
        "fsdp2_packed",
        strategy="fsdp2",
        gpus_per_node=2,
        micro_batch_size=2,
        max_samples=60,
        train_ratio=0.6,
        val_ratio=0.2,
        test_ratio=0.2,
        max_seq_length=128,
        packing=True,
    )
    log = run.log()
    assert "loss: chunked; packing: samples isolated" in log
    assert "packed into" in log
    steps, _ = run.metrics
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        # 36 samples fill their packs less well than the whole demo file (under 5%, tests/data/test_packing.py)
        assert s["tokens"] > 0.85 * s["padded_tokens"]
        assert s["padded_tokens"] <= 2 * 2 * 128  # 2 ranks x 2 packed rows of at most 128 tokens
    assert all(0 < s["loss"] < 20 for s in steps)
