"""Parameter statistics of a model: base, trainable and total counts and the trainable share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

#: Module-name prefixes of PEFT LoRA adapter parameters.
ADAPTER_PREFIXES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclass(frozen=True)
class ParamStats:
    """Parameter counts of a model (shared parameters counted once; sharded parameters by full size).

    Attributes:
        total: every parameter.
        trainable: parameters with ``requires_grad``.
        base: parameters of the base model (everything but the LoRA adapters).
    """

    total: int
    trainable: int
    base: int

    @property
    def adapter(self) -> int:
        """Parameters of the LoRA adapters."""
        return self.total - self.base

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        """``trainable params: N || all params: M || trainable%: x`` (the PEFT wording)."""
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )


def _is_adapter(name: str) -> bool:
    return any(part.startswith(ADAPTER_PREFIXES) for part in name.split("."))


def parameter_stats(model: torch.nn.Module) -> ParamStats:
    """Count the parameters of ``model`` (each shared parameter once).

    Call it before FSDP1 wrapping: FSDP1 flattens parameters into local shards.
    """
    total = trainable = base = 0
    for name, param in model.named_parameters():  # each shared parameter once
        n = param.numel()  # a DTensor (FSDP2 shard) reports its full size
        total += n
        trainable += n if param.requires_grad else 0
        base += 0 if _is_adapter(name) else n
    return ParamStats(total=total, trainable=trainable, base=base)


def log_parameter_stats(model: torch.nn.Module, label: str = "model") -> ParamStats:
    """Compute the statistics and log them on rank 0."""
    stats = parameter_stats(model)
    log.info("%s: %s", label, stats)
    return stats
