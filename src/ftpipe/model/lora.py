"""LoRA adapters through PEFT: the configured rank, alpha, dropout and target modules on a frozen base."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model

from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


class LoraTargetError(FtpipeError, ValueError):
    """A configured LoRA target module does not exist in the model."""


def lora_config(cfg: PipelineConfig) -> PeftLoraConfig:
    """The PEFT LoRA configuration from ``cfg.lora`` (bias ``none``, causal-LM task)."""
    lo = cfg.lora
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lo.lora_rank,
        lora_alpha=lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=list(lo.lora_target_modules),
        bias="none",
    )


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise LoraTargetError(
            f"lora_target_modules: {missing} not found in {type(model).__name__}; "
            f"linear modules it has: {linear}"
        )


def apply_lora(model: torch.nn.Module, cfg: PipelineConfig, *, announce: bool = True) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; the base weights are frozen, only the adapters train.

    Every configured target must exist in the model (a typo would otherwise train fewer modules than
    asked, silently).
    """
    _check_targets(model, list(cfg.lora.lora_target_modules))
    # Adapters in the base weights' dtype (PEFT would upcast them to fp32 under bf16 weights): FSDP
    # needs one dtype per sharded unit, and bf16-true means bf16 throughout.
    peft_model = get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=False)
    lo = cfg.lora
    log.log(
        logging.INFO if announce else logging.DEBUG,
        "LoRA: r=%d alpha=%d dropout=%g on %s",
        lo.lora_rank,
        lo.lora_alpha,
        lo.lora_dropout,
        ", ".join(lo.lora_target_modules),
    )
    return peft_model
