"""The tiny numerics runs shared by the training tests: settings, the single-process reference, and the
comparisons of two runs (step losses, norms, LoRA weights)."""

from __future__ import annotations

import pytest
import torch

from ftpipe.model.checkpoint import read_checkpoint

TINY = {
    "max_samples": 8,
    "train_ratio": 0.5,  # 4 training samples
    "val_ratio": 0.375,  # 3 validation samples: 2 ranks pad one, which must not count
    "test_ratio": 0.125,
    "max_seq_length": 64,
    "max_steps": 3,
    "warmup_steps": 1,
    "learning_rate": 1e-3,
    "min_lr": 1e-4,
    "val_check_interval": 2,
    "limit_val_batches": None,
    "lora_dropout": 0.0,
    "precision": "32-true",
    "gradient_clip_val": 0.05,  # below the gradient norms: clipping is active
    "early_stopping_patience": 0,
}


def run_tiny(train_runner, tiny_llama, name, **overrides):
    return train_runner(name, {**TINY, "hf_model_id": str(tiny_llama), **overrides}, timeout=240)


def weights(run, name="last.ckpt") -> dict[str, torch.Tensor]:
    return read_checkpoint(run.checkpoint(name)).weights


def assert_same_steps(run, reference, rel=1e-4, *, stopped: bool = False):
    """The same step losses, norms and label counts, and the same val_loss over the whole split (each
    sample once, however many ranks share it); ``stopped``: the run also validated where a signal stopped
    it."""
    (steps, vals), (ref_steps, ref_vals) = run.metrics, reference.metrics
    by_step = {v["step"]: v["val_loss"] for v in vals}
    if stopped:
        vals = [{"val_loss": by_step.get(v["step"])} for v in ref_vals]
    assert [v["val_loss"] for v in vals] == pytest.approx([v["val_loss"] for v in ref_vals], rel=rel)
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["label_tokens"] for s in steps] == [s["label_tokens"] for s in ref_steps]
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in ref_steps], rel=rel)
    assert [s["grad_norm"] for s in steps] == pytest.approx([s["grad_norm"] for s in ref_steps], rel=rel)


def assert_same_weights(run, reference, atol=1e-5):
    """Same LoRA weights up to ``atol`` (1% of one learning-rate step: AdamW's near-sign updates amplify
    fp32 summation-order noise of tiny gradients, but a different weighting of the tokens moves
    weights by whole steps)."""
    mine, ref = weights(run), weights(reference)
    assert sorted(mine) == sorted(ref)
    assert all(".lora_" in k for k in ref)  # trainable-only checkpoint
    worst = max(float((mine[k] - ref[k]).abs().max()) for k in ref)
    assert worst < atol, f"LoRA weights differ by up to {worst}"
