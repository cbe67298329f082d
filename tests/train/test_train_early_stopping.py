"""Early stopping on val_loss and the best/last checkpoints (one process, tiny random Llama for speed)."""

from __future__ import annotations

import re

import pytest

from ftpipe.model.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_stops_when_val_loss_stops_improving(train_runner, tiny_llama):
    """At a learning rate of 1e-9 val_loss never improves by min_delta: with patience 2 and a validation
    every step the run stops at step 3 (step 1 sets the best, steps 2 and 3 do not improve), long before
    max_steps; the best checkpoint is the validation with the lowest val_loss, last is step 3."""
    run = train_runner(
        "early_stop",
        {
            "hf_model_id": str(tiny_llama),
            "strategy": "single",
            "gpus_per_node": 1,
            "max_samples": 16,
            "train_ratio": 0.5,
            "val_ratio": 0.25,
            "test_ratio": 0.25,
            "max_seq_length": 64,
            "micro_batch_size": 2,
            "max_steps": 10,
            "warmup_steps": 0,
            "learning_rate": 1e-9,
            "min_lr": 1e-10,
            "val_check_interval": 1,
            "limit_val_batches": 2,
            "early_stopping_patience": 2,
            "early_stopping_min_delta": 0.001,
            "lora_dropout": 0.0,
        },
        timeout=240,
    )
    steps, vals = run.metrics
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [v["step"] for v in vals] == [1, 2, 3]
    losses = [v["val_loss"] for v in vals]
    assert max(losses) - min(losses) < 0.001  # nothing improved by min_delta
    best_step = vals[losses.index(min(losses))]["step"]  # the first of equal values stays the best
    best = run.checkpoint("step=*")
    manifest = run.manifest()
    assert best.name.startswith(manifest["run_id"] + "-")  # the run's own names
    assert int(re.search(r"-step=(\d+)-", best.name).group(1)) == best_step
    assert best.name.endswith(f"val_loss={min(losses):.4f}.ckpt")
    last = run.checkpoint("last.ckpt")
    assert read_checkpoint(last).global_step == 3
    # the manifest says which is the best and the last, with their metric, and how the run ended
    assert (manifest["best"], manifest["last"], manifest["status"]) == (best.name, last.name, "completed")
    assert manifest["checkpoints"][best.name]["step"] == best_step
    assert manifest["best_val_loss"] == pytest.approx(min(losses), abs=1e-4)
    assert manifest["global_step"] == 3 and manifest["data"]["prepared_dir"]
    assert "stopped early" in run.log()
