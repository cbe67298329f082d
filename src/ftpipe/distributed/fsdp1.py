"""FSDP1 (FullyShardedDataParallel) through Lightning: a CPU-capable strategy (``ftpipe.compat``, as it
overrides Lightning internals) and meta-device materialization."""

from __future__ import annotations

import torch

from ftpipe.compat import CPUFSDPStrategy
from ftpipe.utils.logging import get_logger

__all__ = ["CPUFSDPStrategy", "MaterializeMeta"]

log = get_logger(__name__)


class MaterializeMeta:
    """FSDP1 ``param_init_fn``: allocate a meta-device module's own tensors on the compute device.

    Used with ``sync_module_states=True``: ranks other than 0 build the model on the meta device and
    FSDP broadcasts rank 0's weights into the allocated storage, one wrapped unit at a time. A
    parameter shared by several modules (tied input/output embeddings) is allocated once, so the tie
    survives.
    """

    def __init__(self, device_type: str = "cuda"):
        self.device_type = device_type
        self._made: dict[int, tuple[torch.Tensor, torch.nn.Parameter]] = {}

    def _device(self) -> torch.device:
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    def __call__(self, module: torch.nn.Module) -> None:
        device = self._device()
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            key = id(param)
            if key not in self._made:  # keep the meta tensor referenced so its id stays unique
                new = torch.nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=param.requires_grad
                )
                self._made[key] = (param, new)
            setattr(module, name, self._made[key][1])
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                setattr(module, name, torch.empty_like(buf, device=device))
