"""FSDP2 and FSDP1 train the embedded SmolLM2-135M-Instruct with LoRA on the alpaca demo data, in two
REAL processes over gloo (``ftpipe train`` re-run by Lightning's launcher).

The training split is 2 samples (one per rank per step) seen 5 times at a high learning rate, so the
loss must fall steeply; only the adapters change, each rank holds half of the parameters, and the
checkpoints hold the adapters and their optimizer state but not the 134.5 M frozen base weights.
The FSDP2 and FSDP1 runs are started together (one's start-up overlaps the other's training).
"""

from __future__ import annotations

import pytest

from ftpipe.model.checkpoint import read_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EMBEDDED = {
    "hf_model_id": "embedded",
    "max_samples": 4,
    "train_ratio": 0.5,  # 2 training samples: one per rank and step
    "val_ratio": 0.25,
    "test_ratio": 0.25,
    "max_seq_length": 64,
    "max_steps": 5,
    "warmup_steps": 1,
    "learning_rate": 3e-3,
    "min_lr": 3e-4,
    "val_check_interval": 5,
    "limit_val_batches": 1,
    "lora_dropout": 0.0,
    "micro_batch_size": 1,
    "gpus_per_node": 2,
    "precision": "32-true",
}
BASE_PARAMS = 134_515_008  # SmolLM2-135M (tied embeddings counted once)


STRATEGIES = ("fsdp2", "fsdp1")


@pytest.fixture(scope="module")
def sharded_runs(train_runner):
    """The FSDP2 and the FSDP1 run, trained at the same time (independent folders), by strategy."""
    runs = {f"embedded_{s}": {**EMBEDDED, "strategy": s} for s in STRATEGIES}
    done = train_runner.together(runs, timeout=600)  # both together: each took at most 360 s alone
    return {s: done[f"embedded_{s}"] for s in STRATEGIES}


@pytest.mark.timeout(720)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lora_trains_sharded_on_two_processes(sharded_runs, strategy):
    """The loss falls steeply, each rank holds half of the parameters, only the adapters move, and the
    checkpoint holds the adapters and their AdamW state only."""
    run = sharded_runs[strategy]

    steps, vals = run.metrics
    losses = [s["loss"] for s in steps]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert losses[-1] < 0.5 * losses[0], losses  # the same 2 samples, 5 steps at lr 3e-3
    assert all(s["label_tokens"] == steps[0]["label_tokens"] for s in steps)  # the whole split every step
    assert all(s["tokens_per_s"] > 0 and s["peak_mem_gib"] > 0.1 for s in steps)
    assert [v["step"] for v in vals] == [5]

    reports = run.shard_reports()
    assert [r["rank"] for r in reports] == [0, 1]
    total = reports[0]["total_params"]
    trainable = reports[0]["trainable_params"]
    assert total - trainable == BASE_PARAMS
    for r in reports:
        start, end = r["start"], r["end"]
        local = start["trainable_local"] + start["frozen_local"]
        assert abs(local - total / 2) < 0.01 * total, f"rank {r['rank']} holds {local} of {total}"
        assert end["frozen_abs_sum"] == start["frozen_abs_sum"]  # the base weights did not move
        assert end["trainable_abs_sum"] != pytest.approx(start["trainable_abs_sum"], rel=1e-3)  # adapters did

    last = run.checkpoint("last.ckpt")
    assert last.is_dir()  # a distributed checkpoint folder (one file per rank)
    ckpt = read_checkpoint(last)
    assert all(".lora_A." in k or ".lora_B." in k for k in ckpt.weights)
    assert sum(v.numel() for v in ckpt.weights.values()) == trainable
    assert ckpt.global_step == 5 and ckpt.meta["trainable_only"] is True
    size = sum(p.stat().st_size for p in last.iterdir())
    # adapters + two AdamW moments in fp32 (+ a few MB of DCP metadata), far below the 538 MB of base weights
    assert 12 * trainable < size < 1.1 * 12 * trainable
    assert size < 0.3 * 4 * BASE_PARAMS
