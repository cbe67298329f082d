"""AdamW with a decay and a no-decay group, and a linear warm-up + cosine schedule to a minimum rate."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ftpipe.config.schema import TrainConfig
from ftpipe.config.validate import ConfigError

#: Wrapper prefixes that FSDP1, activation checkpointing and torch.compile add to parameter names.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_param_name(name: str) -> str:
    """A parameter name without the FSDP1 / checkpoint-wrapper / compile prefixes (same name before and
    after wrapping)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_decay_names(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> set[str]:
    """Names (cleaned) of the parameters that get no weight decay: every 1-D parameter (biases, norm
    weights).

    Call it on the unwrapped model: FSDP1 flattens parameters into 1-D shard views.
    """
    return {clean_param_name(n) for n, p in named_params if p.ndim < 2}


def param_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    no_decay: set[str] | None = None,
) -> list[dict]:
    """Two AdamW groups of the trainable parameters: ``decay`` (matrices) and ``no_decay`` (1-D ones).

    ``no_decay`` names the no-decay parameters (from :func:`no_decay_names` before wrapping); by
    default a parameter is no-decay when it is 1-D. Empty groups are left out.
    """
    decay, plain = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        is_plain = clean_param_name(name) in no_decay if no_decay is not None else param.ndim < 2
        (plain if is_plain else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": plain, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError(["finetuning / lora_target_modules: no trainable parameters in the model"])
    return groups


#: Devices with a fused AdamW kernel (one kernel over every parameter instead of a dozen ops per tensor:
#: on the CPU 9 ms instead of 29 ms a step for the 9.8M adapter parameters of the benchmark's LoRA).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(groups: list[dict], train: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over ``groups`` with the configured rate, betas and decay; fused kernels on CUDA and the CPU."""
    return torch.optim.AdamW(
        groups,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        fused=device_type in FUSED_ADAMW_DEVICES,
    )


def lr_factor(step: int, *, max_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then a cosine
    from the peak down to ``min_lr`` at ``max_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    floor = min_lr / peak_lr if peak_lr > 0 else 0.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> LambdaLR:
    """The warm-up + cosine schedule of :func:`lr_factor` as a LambdaLR stepped once per optimizer step."""

    def factor(step: int) -> float:
        return lr_factor(
            step,
            max_steps=train.max_steps,
            warmup_steps=train.warmup_steps,
            peak_lr=train.learning_rate,
            min_lr=train.min_lr,
        )

    return LambdaLR(optimizer, factor)
