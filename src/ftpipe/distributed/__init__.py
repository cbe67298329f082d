"""Stage 5: parallelism, kept apart from the model: FSDP2/FSDP1/DDP strategies, wrapping, checkpointing.

The names below are imported on first use, so that building a model (``create_model``, which uses the
wrapping helpers) does not import Lightning. The run-time choices (accelerator, precision, attention)
are ``ftpipe.runtime``'s.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CPUFSDPStrategy": "ftpipe.distributed.fsdp1",
    "MaterializeMeta": "ftpipe.distributed.fsdp1",
    "DecoderLayerNotFoundError": "ftpipe.distributed.layers",
    "discover_decoder_layer_classes": "ftpipe.distributed.layers",
    "find_decoder_layer_classes": "ftpipe.distributed.layers",
    "leave_process_group": "ftpipe.distributed.devices",
    "apply_activation_checkpointing": "ftpipe.distributed.checkpointing",
    "build_strategy": "ftpipe.distributed.strategy",
    "cluster_environment": "ftpipe.distributed.strategy",
    "create_model": "ftpipe.distributed.build",
    "shard_model": "ftpipe.distributed.fsdp2",
}

__all__ = [
    "CPUFSDPStrategy",
    "DecoderLayerNotFoundError",
    "MaterializeMeta",
    "apply_activation_checkpointing",
    "build_strategy",
    "cluster_environment",
    "create_model",
    "discover_decoder_layer_classes",
    "find_decoder_layer_classes",
    "leave_process_group",
    "shard_model",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from ftpipe.distributed.build import create_model
    from ftpipe.distributed.checkpointing import apply_activation_checkpointing
    from ftpipe.distributed.devices import leave_process_group
    from ftpipe.distributed.fsdp1 import CPUFSDPStrategy, MaterializeMeta
    from ftpipe.distributed.fsdp2 import shard_model
    from ftpipe.distributed.layers import (
        DecoderLayerNotFoundError,
        discover_decoder_layer_classes,
        find_decoder_layer_classes,
    )
    from ftpipe.distributed.strategy import build_strategy, cluster_environment


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
