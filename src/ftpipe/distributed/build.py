"""The model of a run, built for its strategy: memory-aware loading, sharding, activation checkpointing.

Under FSDP2 every rank builds the model on the meta device, shards it, and receives its shards of rank
0's weights (one full copy in host memory, on rank 0 only); under FSDP1 on GPUs only rank 0 reads the
weights and FSDP broadcasts them (``sync_module_states``); DDP and a single device load it plainly.
The loading itself is ``ftpipe.model.load``'s, which knows nothing of parallelism.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ftpipe.config.schema import PipelineConfig
from ftpipe.distributed.checkpointing import apply_activation_checkpointing
from ftpipe.distributed.fsdp2 import shard_model
from ftpipe.distributed.layers import find_decoder_layer_classes
from ftpipe.model.load import build_empty, load_pretrained, prepare_for_finetuning, prepared_config
from ftpipe.runtime import accelerator_name, compute_dtype, is_16bit, precision_and_reason, weight_dtype
from ftpipe.utils import world as ranks
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


def create_model(
    cfg: PipelineConfig,
    *,
    device_mesh=None,
    strategy_kind: str | None = None,
) -> torch.nn.Module:
    """The causal LM of ``cfg``, with LoRA (or fully trainable), ready for the strategy.

    Args:
        cfg: the pipeline configuration.
        device_mesh: Lightning's ``ModelParallelStrategy.device_mesh`` (FSDP2); its
            ``data_parallel`` dimension shards the model.
        strategy_kind: ``fsdp2`` (shard here: activation checkpointing and ``fully_shard`` per decoder
            layer and the root), ``fsdp1`` (the strategy wraps later; on GPUs only rank 0 reads the
            weights), ``ddp``/``single`` (plain load), or None for ``cfg.dist.strategy``.

    The model is returned in training mode. Without a device mesh and outside a multi-process
    group, ``fsdp2`` loads a plain model (for evaluation or export); inside one it is an error (the
    model would silently not be sharded).
    """
    kind = strategy_kind or cfg.dist.strategy
    rank, world = ranks.world()
    if kind == "fsdp2" and device_mesh is None:
        if world > 1:
            raise ValueError(
                f"create_model(strategy_kind='fsdp2') on rank {rank} of {world} needs the device mesh "
                "(pass device_mesh=self.device_mesh from LightningModule.configure_model)"
            )
        kind = "single"
    device_type = device_mesh.device_type if device_mesh is not None else accelerator_name(cfg)
    precision = precision_and_reason(cfg)[0]
    dtype = weight_dtype(precision)  # fp32 master weights for *-mixed and on the CPU's 32-true
    config = prepared_config(cfg, device_type, precision)

    if kind == "fsdp2":
        return _create_fsdp2(cfg, config, dtype, precision, device_mesh)

    fsdp1_multi = kind == "fsdp1" and world > 1
    rank0_broadcasts = fsdp1_multi and device_type == "cuda" and cfg.dist.sync_module_states
    if rank0_broadcasts and rank != 0:
        # FSDP1 (sync_module_states + the strategy's param_init_fn) broadcasts rank 0's weights.
        log.info("rank %d: building the model on the meta device; rank 0 broadcasts its weights", rank)
        model = build_empty(cfg, config, dtype)
    else:
        if fsdp1_multi and not rank0_broadcasts:
            why = "on the CPU" if device_type != "cuda" else "sync_module_states is off"
            log.info("FSDP1 %s: every rank reads the weights", why)
        model = load_pretrained(cfg, config, dtype)
    model = prepare_for_finetuning(model, cfg)
    if not (rank0_broadcasts and rank != 0):
        continue_adapter(model, cfg)
    if fsdp1_multi and not rank0_broadcasts and cfg.model.finetuning == "lora":
        _broadcast_trainable_from_rank0(model)
    if kind in ("ddp", "single") and cfg.dist.activation_checkpointing:
        apply_activation_checkpointing(model, find_decoder_layer_classes(model, cfg.model.decoder_layer_cls))
    return model.train()  # from_pretrained returns eval mode, which would switch LoRA dropout off


def _create_fsdp2(
    cfg: PipelineConfig, config, dtype: torch.dtype, precision: str, device_mesh
) -> torch.nn.Module:
    """Meta-device build on every rank, FSDP2 sharding, then rank 0's weights broadcast into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    rank = ranks.rank()
    start = time.monotonic()
    # The meta build must not consume random numbers: rank 0's reference copy below then draws the
    # same adapter initialisation as a plain load under the same seed.
    with torch.random.fork_rng(devices=[]):
        model = prepare_for_finetuning(build_empty(cfg, config, dtype), cfg)
    layer_classes = find_decoder_layer_classes(model, cfg.model.decoder_layer_cls)

    # CPU offload keeps the shards in host memory, which NCCL cannot broadcast into: then every rank
    # reads the weights itself (one full copy per rank in host memory) and rank 0's adapters are sent.
    offload = cfg.dist.cpu_offload and mesh.device_type == "cuda"
    if cfg.dist.cpu_offload and not offload:
        log.info("cpu_offload: ignored, the model is already in host memory")
    broadcast = not offload
    full_state: dict[str, torch.Tensor] = {}
    reference = None
    if rank == 0 or not broadcast:
        with torch.device("cpu"):
            reference = prepare_for_finetuning(load_pretrained(cfg, config, dtype), cfg, announce=False)
            continue_adapter(reference, cfg)
        if not broadcast and mesh.size() > 1 and cfg.model.finetuning == "lora":
            _broadcast_trainable_from_rank0(reference)
        full_state = reference.state_dict()

    if cfg.dist.activation_checkpointing:
        apply_activation_checkpointing(model, layer_classes)
    mp_dtype = compute_dtype(precision) if cfg.dist.fsdp_mixed_precision and is_16bit(precision) else None
    shard_model(
        model,
        mesh,
        layer_classes,
        param_dtype=mp_dtype,
        reduce_dtype=mp_dtype,
        cpu_offload=offload,
    )
    on_gpu = mesh.device_type == "cuda" and not offload
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    # to_empty wipes buffers too; the rotary frequencies are not in checkpoints: keep the real ones.
    buffers = [(m, name, buf) for m in model.modules() for name, buf in m.named_buffers(recurse=False)]
    model.to_empty(device=device)
    for module, name, buf in buffers:
        setattr(module, name, buf)
    set_model_state_dict(
        model,
        full_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=True),
    )
    del full_state, reference
    how = "rank 0's weights broadcast into the shards" if broadcast else "weights loaded into the shards"
    log.info("FSDP2: %s in %.1fs", how, time.monotonic() - start)
    return model.train()


def continue_adapter(model: torch.nn.Module, cfg: PipelineConfig) -> None:
    """``init_adapter``: the LoRA adapter of an earlier run (an SFT checkpoint or adapter folder) replaces
    the fresh one, so that training continues it."""
    path = cfg.objective.init_adapter
    if not path or cfg.model.finetuning != "lora":
        return
    from ftpipe.model.adapter import apply_adapter_weights, read_adapter

    count = apply_adapter_weights(model, read_adapter(path), f"init_adapter {path}")
    if ranks.rank() == 0:
        log.info("init_adapter: continuing the LoRA adapter of %s (%d tensors)", path, count)


def _broadcast_trainable_from_rank0(model: torch.nn.Module) -> None:
    """Give every rank rank 0's adapter initialisation (each rank loaded the base weights itself).

    FSDP1 keeps each rank's own slice of the flattened parameters, so ranks that drew different
    random adapters would silently train a mixture of initialisations.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                buf = param.data.to(device) if device is not None else param.data
                dist.broadcast(buf, src=0)
                if buf is not param.data:
                    param.data.copy_(buf)
