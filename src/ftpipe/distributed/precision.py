"""Dtypes that follow from a Lightning precision string."""

from __future__ import annotations

import torch

_COMPUTE = {
    "32-true": torch.float32,
    "32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the forward pass computes in."""
    try:
        return _COMPUTE[precision]
    except KeyError:
        raise ValueError(f"precision: unknown value {precision!r} (allowed: {sorted(_COMPUTE)})") from None


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the stored (master) weights: the compute dtype for ``*-true``, fp32 for ``*-mixed``."""
    return compute_dtype(precision) if precision.endswith("-true") else torch.float32


def is_16bit(precision: str) -> bool:
    return compute_dtype(precision) in (torch.bfloat16, torch.float16)
