"""Non-reentrant activation checkpointing of the decoder layers (recompute activations in backward)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing as _apply,
)

from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


def apply_activation_checkpointing(model: torch.nn.Module, layer_classes: Iterable[type]) -> int:
    """Wrap every module of ``layer_classes`` in a non-reentrant checkpoint wrapper; returns the count.

    Non-reentrant checkpointing works with frozen inputs (LoRA), FSDP1 and FSDP2. A model already
    wrapped is left as it is.
    """
    classes = tuple(layer_classes)
    if any(isinstance(m, CheckpointWrapper) for m in model.modules()):
        log.info("activation checkpointing: already applied")
        return sum(isinstance(m, CheckpointWrapper) for m in model.modules())
    _apply(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, classes),
    )
    count = sum(isinstance(m, CheckpointWrapper) for m in model.modules())
    log.info(
        "activation checkpointing (non-reentrant) on %d %s", count, "/".join(c.__name__ for c in classes)
    )
    return count
