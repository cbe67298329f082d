"""FSDP2: ``fully_shard`` per decoder layer and then the root, with mixed precision and CPU offload."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


def shard_model(
    model: torch.nn.Module,
    mesh: DeviceMesh,
    layer_classes: Iterable[type],
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> list[torch.nn.Module]:
    """Shard each decoder layer, then the root (embeddings, final norm, output head) over ``mesh``.

    Each layer is its own all-gather unit, so only one layer's full weights live at a time. The
    layers are found by class (inside checkpoint wrappers too). ``param_dtype``/``reduce_dtype``
    set the MixedPrecisionPolicy (None: the weights' dtype); the forward inputs are cast to it.
    Returns the sharded modules, root last.
    """
    classes = tuple(layer_classes)
    policy = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=True
        ),
    }
    if cpu_offload:
        policy["offload_policy"] = CPUOffloadPolicy()
    layers = [m for m in model.modules() if isinstance(m, classes)]
    if not layers:
        raise ValueError(f"no module of {[c.__name__ for c in classes]} in {type(model).__name__} to shard")
    for layer in layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    log.info(
        "FSDP2: fully_shard on %d %s + root over %d ranks (param dtype %s, reduce dtype %s, cpu offload %s)",
        len(layers),
        "/".join(c.__name__ for c in classes),
        mesh.size(),
        param_dtype or "as stored",
        reduce_dtype or "as stored",
        cpu_offload,
    )
    return [*layers, model]
