"""FSDP1 (FullyShardedDataParallel) through Lightning: a CPU-capable strategy and meta-device materialization."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing

from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy that also runs on the CPU (over gloo).

    Lightning's accelerator connector refuses ``FSDPStrategy`` with ``accelerator="cpu"`` by an exact
    type check, which a subclass passes; and FSDP1 itself needs ``device_id=torch.device("cpu")`` when
    the module lives on the CPU ("FSDP needs a non-CPU accelerator device" otherwise), while Lightning
    passes the device index (None on the CPU). On a CUDA root device this is the unmodified strategy.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        already = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
        if self.root_device.type != "cpu" or already:
            return super()._setup_model(model)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


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
            module._parameters[name] = self._made[key][1]
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=device)
