"""LoRA adapters through PEFT: the configured rank, alpha, dropout and target modules on a frozen base."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model

from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.model.dropout import use_lora_dropout
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


class LoraTargetError(FtpipeError, ValueError):
    """A configured LoRA target module does not exist in the model."""


#: ``lora_target_modules: [all-linear]``: PEFT's every-linear-layer-but-the-output choice.
ALL_LINEAR = "all-linear"


def lora_config(cfg: PipelineConfig) -> PeftLoraConfig:
    """The PEFT LoRA configuration from ``cfg.lora`` (bias ``none``, causal-LM task)."""
    lo = cfg.lora
    targets = list(lo.lora_target_modules)
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lo.lora_rank,
        lora_alpha=lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        bias="none",
        use_dora=lo.use_dora,
        use_rslora=lo.use_rslora,
        init_lora_weights=True if lo.init_lora_weights == "default" else lo.init_lora_weights,
        modules_to_save=list(lo.modules_to_save) if lo.modules_to_save else None,
    )


def _check_targets(model: torch.nn.Module, targets: list[str], field: str = "lora_target_modules") -> None:
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names and t != ALL_LINEAR]
    if missing:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise LoraTargetError(
            f"{field}: {missing} not found in {type(model).__name__}; linear modules it has: {linear}"
        )


def apply_lora(model: torch.nn.Module, cfg: PipelineConfig, *, announce: bool = True) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; the base weights are frozen, only the adapters train.

    Every configured target must exist in the model (a typo would otherwise train fewer modules than
    asked, silently).
    """
    _check_targets(model, list(cfg.lora.lora_target_modules))
    _check_targets(model, list(cfg.lora.modules_to_save or []), "modules_to_save")
    # Adapters in the base weights' dtype (PEFT would upcast them to fp32 under bf16 weights): FSDP
    # needs one dtype per sharded unit, and bf16-true means bf16 throughout.
    peft_model = get_peft_model(model, lora_config(cfg), autocast_adapter_dtype=False)
    use_lora_dropout(peft_model)  # PEFT's nn.Dropout -> the faster, leaner LoraDropout (same p)
    lo = cfg.lora
    log.log(
        logging.INFO if announce else logging.DEBUG,
        "LoRA: r=%d alpha=%d dropout=%g on %s%s",
        lo.lora_rank,
        lo.lora_alpha,
        lo.lora_dropout,
        ", ".join(lo.lora_target_modules),
        "".join(
            f"; {text}"
            for text, on in (
                ("DoRA", lo.use_dora),
                ("rank-stabilised", lo.use_rslora),
                (f"init {lo.init_lora_weights}", lo.init_lora_weights != "default"),
                (f"whole modules trained: {', '.join(lo.modules_to_save or [])}", bool(lo.modules_to_save)),
            )
            if on
        ),
    )
    return peft_model
