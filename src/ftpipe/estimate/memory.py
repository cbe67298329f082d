"""The expected per-GPU memory of a training run, before the run (printed by ``ftpipe estimate``).

Weights, LoRA weights, gradients and AdamW state follow from exact parameter counts (the model built on the
meta device, with ftpipe's LoRA) and the precision ftpipe would select; FSDP divides them by the ranks one
copy is sharded over and adds its unsharded all-gather buffers (the current and the prefetched decoder
layer, and the root unit: embeddings, final norm, output head); ``cpu_offload`` moves the sharded weights,
gradients and optimizer state to host memory. Activations (``ftpipe.estimate.activations``) are given with
and without activation checkpointing; the configured one counts in the total. A fixed allowance for the
CUDA context and NCCL's buffers is added on GPUs. ``activation_checkpointing: auto`` counts the activations
without checkpointing when that total fits in the memory it plans against (the GPU's, or on the CPU the
host's memory shared by the node's processes, less an allowance for the Python runtime), else with it, and
says so in ``auto_reason``. The verdict compares the total with ``gpu_memory_gib``
(unset: the local CUDA device's memory), keeping 10% free for the caching allocator's fragmentation and the
estimate's error, and says what would make it fit when it does not.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.estimate.activations import Activations, activation_bytes
from ftpipe.estimate.hardware import GPUS
from ftpipe.estimate.shape import ModelConfigUnavailable, ModelShape, model_shape
from ftpipe.model.moe import UnknownMoeLayout
from ftpipe.runtime import compute_dtype, is_16bit, weight_dtype
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

GIB = 1024**3
#: CUDA context (about 0.5 GiB with lazy module loading) and NCCL's communicator buffers, per GPU.
CUDA_OVERHEAD_BYTES = 1 * GIB
#: Share of the device memory kept free for allocator fragmentation and the estimate's error.
HEADROOM = 0.10
#: On the CPU, what a training process holds beside the terms the estimate counts (the Python interpreter,
#: torch, transformers, Lightning and the data loader): about 0.9-1.1 GiB measured on the embedded model.
CPU_RUNTIME_BYTES = 1 * GIB
#: The most nodes (of up to 8 GPUs) the "more GPUs" advice considers.
MAX_NODES = 128


class EstimateError(FtpipeError):
    """The configuration cannot be estimated (e.g. a precision or attention kernel the target cannot run)."""


@dataclass(frozen=True)
class Target:
    """Where the run would happen and how it would compute.

    Attributes:
        device: ``cuda`` or ``cpu``.
        precision: Lightning precision string ftpipe would use.
        attn_implementation: attention kernel ftpipe would use.
        note: how the device and precision were chosen.
    """

    device: str
    precision: str
    attn_implementation: str
    note: str


@dataclass(frozen=True)
class Layout:
    """How the model state is spread over the ranks.

    Attributes:
        world_size: training processes.
        shard_size: ranks one copy of the weights, gradients and optimizer state is sharded over.
        description: e.g. ``FSDP1 FULL_SHARD over 8 ranks``.
        unsharded: what FSDP all-gathers at a time: ``layers`` (current + prefetched layer and the root
            unit), ``all`` (SHARD_GRAD_OP keeps every unit unsharded between forward and backward) or
            ``none``.
        offload: sharded weights, gradients and optimizer state live in host memory.
        gather_dtype: dtype of the unsharded parameters (the compute dtype with ``fsdp_mixed_precision``
            and a 16-bit precision, else the weights' dtype).
    """

    world_size: int
    shard_size: int
    description: str
    unsharded: str
    offload: bool
    gather_dtype: torch.dtype


@dataclass(frozen=True)
class MemoryEstimate:
    """Expected peak memory per GPU (per process on the CPU), in bytes.

    Attributes:
        model: ``hf_model_id``.
        shape: parameter counts and layer structure.
        target: device, precision and attention kernel.
        layout: sharding over the ranks.
        micro_batch_size: samples per micro-batch (a preference pair is two sequences).
        seq_len: tokens per sequence (``max_seq_length``).
        weights: frozen base weights (all base weights for full fine-tuning).
        reference_weights: a frozen copy of the model for a preference objective's reference
            (``reference: copy``; the adapter-disabled and cached references need none).
        lora_weights: LoRA adapter weights.
        gradients: gradients of the trainable parameters.
        optimizer_state: AdamW's two moments.
        fsdp_buffers: FSDP's unsharded parameters and gradients (DDP: none, its gradients are bucket views).
        activations: activation memory with and without checkpointing.
        activation_checkpointing: whether the run checkpoints (the figure counted): the configured value,
            or what ``auto`` chose.
        overhead: fixed framework allowance (CUDA context, NCCL); 0 on the CPU.
        host_offloaded: bytes moved to host memory per process by ``cpu_offload``.
        total: the sum counted against the device memory.
        device_memory: memory of one GPU (None: unknown, no verdict).
        fits: the total fits in the device memory minus the headroom (None: no verdict).
        advice: when it does not fit, changes and the total each gives.
        auto_reason: with ``activation_checkpointing: auto``, why it chose what it did (both totals and
            the memory planned against); None when the value was configured.
    """

    model: str
    shape: ModelShape
    target: Target
    layout: Layout
    micro_batch_size: int
    seq_len: int
    weights: int
    lora_weights: int
    reference_weights: int
    gradients: int
    optimizer_state: int
    fsdp_buffers: int
    activations: Activations
    activation_checkpointing: bool
    overhead: int
    host_offloaded: int
    total: int
    device_memory: int | None
    fits: bool | None
    advice: tuple[str, ...] = field(default=())
    auto_reason: str | None = None

    def total_with(self, checkpointing: bool) -> int:
        """The total with activation checkpointing on or off (the rest unchanged)."""
        return (
            self.total
            - self.activations.counted(self.activation_checkpointing)
            + self.activations.counted(checkpointing)
        )

    @property
    def usable_memory(self) -> int | None:
        """Device memory minus the headroom."""
        return None if self.device_memory is None else int(self.device_memory * (1 - HEADROOM))


# ----------------------------------------------------------------------------------------------
# where and how the run computes


def _local_device(cfg: PipelineConfig) -> str:
    return "cuda" if cfg.dist.accelerator != "cpu" and torch.cuda.is_available() else "cpu"


def _model_config(cfg: PipelineConfig):
    """The model's configuration, or None when it cannot be read (the shape reports that, with what to do)."""
    from ftpipe.model.load import load_model_config

    try:
        return load_model_config(cfg)
    except Exception:  # reported where the estimate reads the model's shape
        return None


def _target(cfg: PipelineConfig) -> Target:
    """The precision and attention kernel ftpipe would select; a GPU run planned from a machine without one
    (``accelerator: cuda`` or ``gpu_memory_gib`` set) assumes a GPU with bf16 support."""
    from ftpipe.runtime import select_attn_implementation, select_precision, supports_sdpa

    local = _local_device(cfg)
    model_config = _model_config(cfg)
    planned_gpu = (
        cfg.dist.accelerator == "cuda" or cfg.dist.gpu_memory_gib is not None or bool(cfg.dist.plan_gpu)
    )
    device = "cpu" if cfg.dist.accelerator == "cpu" else ("cuda" if local == "cuda" or planned_gpu else "cpu")
    try:
        if device == local:
            precision = select_precision(cfg)
            attn = select_attn_implementation(cfg, device, precision=precision, model_config=model_config)
            note = (
                "this machine's CUDA device"
                if device == "cuda"
                else "this machine's CPU (set gpu_memory_gib or accelerator: cuda to plan a GPU run)"
            )
        else:
            precision = cfg.model.precision if cfg.model.precision != "auto" else "bf16-mixed"
            configured = cfg.model.attn_implementation
            attn = (
                configured if configured != "auto" else ("sdpa" if supports_sdpa(model_config) else "eager")
            )
            note = "a GPU with bf16 support (none on this machine)"
    except ValueError as err:
        raise EstimateError(str(err)) from err
    return Target(device=device, precision=precision, attn_implementation=attn, note=note)


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _layout(cfg: PipelineConfig, target: Target) -> Layout:
    t, ds = cfg.train, cfg.dist
    world = 1 if ds.strategy == "single" else t.num_nodes * t.gpus_per_node
    offload = ds.cpu_offload and ds.strategy in ("fsdp1", "fsdp2") and target.device == "cuda"
    mixed = ds.fsdp_mixed_precision and is_16bit(target.precision)
    gather = compute_dtype(target.precision) if mixed else weight_dtype(target.precision)
    if ds.strategy == "fsdp2":
        return Layout(world, world, f"FSDP2 (fully_shard) over {_ranks(world)}", "layers", offload, gather)
    if ds.strategy == "fsdp1":
        mode = ds.sharding_strategy
        if mode == "NO_SHARD":
            return Layout(
                world, 1, f"FSDP1 NO_SHARD (replicated on {_ranks(world)})", "none", offload, gather
            )
        if mode == "HYBRID_SHARD":
            where = f"sharded over the {t.gpus_per_node} ranks of a node, replicated over {t.num_nodes} nodes"
            return Layout(world, t.gpus_per_node, f"FSDP1 HYBRID_SHARD ({where})", "layers", offload, gather)
        unsharded = "all" if mode == "SHARD_GRAD_OP" else "layers"
        return Layout(world, world, f"FSDP1 {mode} over {_ranks(world)}", unsharded, offload, gather)
    stored = weight_dtype(target.precision)
    if ds.strategy == "ddp":
        return Layout(world, 1, f"DDP (replicated on {_ranks(world)})", "none", False, stored)
    return Layout(1, 1, "single device", "none", False, stored)


def host_memory() -> int:
    """This machine's physical memory in bytes (the same figure on every process of a node)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _auto_memory(cfg: PipelineConfig, device: str, device_memory: int | None) -> tuple[int | None, str]:
    """The memory per process ``activation_checkpointing: auto`` plans against, and where it comes from. It
    depends only on the configuration and the machine, so that every rank of a node decides alike."""
    if device == "cuda":
        where = "GPU memory" if device_memory is not None else "no known GPU memory"
        return device_memory, where
    processes = 1 if cfg.dist.strategy == "single" else max(1, cfg.train.gpus_per_node)
    host = host_memory()
    return host // processes - CPU_RUNTIME_BYTES, (
        f"host memory: {host / GIB:.1f} GiB over {processes} process(es) of this node, less "
        f"{CPU_RUNTIME_BYTES / GIB:.0f} GiB each for the Python runtime"
    )


def _device_memory(cfg: PipelineConfig, device: str) -> int | None:
    if cfg.dist.gpu_memory_gib is not None:
        return int(cfg.dist.gpu_memory_gib * GIB)
    if cfg.dist.plan_gpu is not None:
        return int(GPUS[cfg.dist.plan_gpu].memory_gib * GIB)
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


# ----------------------------------------------------------------------------------------------
# the estimate


def _fsdp_buffers(shape: ModelShape, layout: Layout, cfg: PipelineConfig, precision: str) -> int:
    w_bytes = weight_dtype(precision).itemsize
    p_bytes = layout.gather_dtype.itemsize
    if cfg.dist.strategy == "ddp":
        return 0  # the gradients are views into DDP's all-reduce buckets (gradient_as_bucket_view)
    if layout.unsharded == "layers":  # current + prefetched layer, the root unit kept through backward
        params = 2 * shape.layer_params + shape.root_params
        grads = shape.layer_trainable_params + shape.root_trainable_params  # before the reduce-scatter
        return (params + grads) * p_bytes
    if layout.unsharded == "all":
        return (shape.total_params + shape.layer_trainable_params) * p_bytes
    if cfg.dist.strategy == "fsdp1" and p_bytes != w_bytes:  # NO_SHARD with a 16-bit parameter copy
        return shape.total_params * p_bytes
    return 0


#: NF4 with double quantization: 4 bits per weight, an 8-bit scale per block of 64 weights and an fp32
#: scale per 256 such scales.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def _compute(
    cfg: PipelineConfig, shape: ModelShape, target: Target, device_memory: int | None
) -> MemoryEstimate:
    layout = _layout(cfg, target)
    w_bytes = weight_dtype(target.precision).itemsize
    a_bytes = compute_dtype(target.precision).itemsize
    shard = layout.shard_size
    weights = shape.base_params * w_bytes // shard
    if cfg.lora.load_in_4bit:  # QLoRA: the decoder layers' linear weights in NF4, the rest as loaded
        quantized = shape.num_layers * (
            shape.layer_params - shape.layer_trainable_params - sum(shape.norm_elements)
        )
        weights = (int((shape.base_params - quantized) * w_bytes + quantized * NF4_BYTES_PER_PARAM)) // shard
    lora_weights = shape.adapter_params * w_bytes // shard
    gradients = shape.trainable_params * w_bytes // shard
    optimizer_state = 2 * shape.trainable_params * w_bytes // shard  # AdamW: exp_avg, exp_avg_sq
    host = 0
    if layout.offload:
        host = weights + lora_weights + gradients + optimizer_state
        weights = lora_weights = gradients = optimizer_state = 0
    from ftpipe.objectives import get_objective

    objective = get_objective(cfg)
    # a pair's two sequences go through one forward; the reference forward keeps no activations
    sequences = cfg.train.micro_batch_size * objective.sequences_per_sample
    seq_len = cfg.data.max_seq_length
    if objective.sequences_per_sample == 2 and cfg.objective.share_prompt is True:
        # one row per pair of up to twice the length ("auto" shares only rows that fit max_seq_length)
        sequences, seq_len = cfg.train.micro_batch_size, 2 * seq_len
    reference_weights = shape.base_params * w_bytes // shard if objective.reference == "copy" else 0
    acts = activation_bytes(
        shape,
        micro_batch_size=sequences,
        seq_len=seq_len,
        compute_bytes=a_bytes,
        attn=target.attn_implementation,
        device=target.device,
        loss_chunk_size=cfg.train.loss_chunk_size,
        recompute_elementwise=cfg.dist.recompute_elementwise,
    )
    buffers = _fsdp_buffers(shape, layout, cfg, target.precision)
    overhead = CUDA_OVERHEAD_BYTES if target.device == "cuda" else 0
    rest = weights + reference_weights + lora_weights + gradients + optimizer_state + buffers + overhead
    checkpointing, auto_reason = cfg.dist.activation_checkpointing, None
    if checkpointing == "auto":
        limit, where = _auto_memory(cfg, target.device, device_memory)
        usable = None if limit is None else int(limit * (1 - HEADROOM))
        without, with_ = rest + acts.without_checkpointing, rest + acts.with_checkpointing
        checkpointing = usable is None or without > usable
        auto_reason = (
            f"activation checkpointing {'on' if checkpointing else 'off'} (auto): the estimate is "
            f"{format_gib(without)} per process without it and {format_gib(with_)} with it, against "
            + ("an unknown memory" if usable is None else f"{format_gib(usable)} usable")
            + f" ({where}, {HEADROOM:.0%} headroom)"
        )
    total = rest + acts.counted(checkpointing)
    fits = None if device_memory is None else total <= device_memory * (1 - HEADROOM)
    return MemoryEstimate(
        model=cfg.model.hf_model_id,
        shape=shape,
        target=target,
        layout=layout,
        micro_batch_size=cfg.train.micro_batch_size,
        seq_len=cfg.data.max_seq_length,
        weights=weights,
        lora_weights=lora_weights,
        reference_weights=reference_weights,
        gradients=gradients,
        optimizer_state=optimizer_state,
        fsdp_buffers=buffers,
        activations=acts,
        activation_checkpointing=checkpointing,
        overhead=overhead,
        host_offloaded=host,
        total=int(total),
        device_memory=device_memory,
        fits=fits,
        auto_reason=auto_reason,
    )


# ----------------------------------------------------------------------------------------------
# what would make it fit


def format_gib(n: int) -> str:
    """GiB with two decimals; MiB below 1 GiB (the table and the advice alike)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _more_gpus(cfg: PipelineConfig, shape: ModelShape, target: Target, memory: int) -> tuple[str, int] | None:
    """The fewest GPUs (more per node up to 8, then more nodes) that fit, fully sharded by FSDP."""
    ds, t = cfg.dist, cfg.train
    sharded = ds.strategy == "fsdp2" or (ds.strategy == "fsdp1" and ds.sharding_strategy == "FULL_SHARD")
    base = cfg if sharded else cfg.replace(strategy="fsdp2")
    prefix = "" if sharded else "strategy: fsdp2, "
    per_node = max(8, t.gpus_per_node)
    start = t.gpus_per_node + 1 if sharded else t.gpus_per_node
    options = [(t.num_nodes, g) for g in range(start, per_node + 1)]
    options += [(n, per_node) for n in range(t.num_nodes + 1, MAX_NODES + 1)]
    for nodes, gpus in options:
        total = _compute(base.replace(num_nodes=nodes, gpus_per_node=gpus), shape, target, memory).total
        if total <= memory * (1 - HEADROOM):
            where = (
                f"gpus_per_node: {gpus}"
                if nodes == t.num_nodes
                else f"num_nodes: {nodes}, gpus_per_node: {gpus}"
            )
            return f"{prefix}{where} ({nodes * gpus} GPUs)", total
    return None


def _advice(cfg: PipelineConfig, shape: ModelShape, target: Target, memory: int) -> tuple[str, ...]:
    """Single changes to the configuration, each with the total it gives and whether that fits."""
    usable = memory * (1 - HEADROOM)
    ds, t, d = cfg.dist, cfg.train, cfg.data

    def total(target: Target = target, **changes) -> int:
        return _compute(cfg.replace(**changes), shape, target, memory).total

    options: list[tuple[str, int]] = []
    if ds.activation_checkpointing is False:
        options.append(("activation_checkpointing: true", total(activation_checkpointing=True)))
    for mb in range(t.micro_batch_size - 1, 0, -1):
        if total(micro_batch_size=mb) <= usable or mb == 1:
            note = " (raise accumulate_grad_batches to keep the batch size)"
            options.append((f"micro_batch_size: {mb}{note}", total(micro_batch_size=mb)))
            break
    seq = d.max_seq_length // 2
    while seq >= 128:
        if total(max_seq_length=seq) <= usable or seq // 2 < 128:
            options.append((f"max_seq_length: {seq}", total(max_seq_length=seq)))
            break
        seq //= 2
    more = _more_gpus(cfg, shape, target, memory)
    if more:
        options.append(more)
    if ds.strategy in ("fsdp1", "fsdp2") and not ds.cpu_offload and target.device == "cuda":
        options.append(
            ("cpu_offload: true (slower: the optimizer steps on the CPU)", total(cpu_offload=True))
        )
    if target.precision == "bf16-mixed" and cfg.model.finetuning == "lora":
        bf16 = dataclasses.replace(target, precision="bf16-true")
        options.append(("precision: bf16-true (bf16 frozen weights)", total(bf16, precision="bf16-true")))
    return tuple(
        f"{text} -> {format_gib(value)} ({'fits' if value <= usable else 'not enough alone'})"
        for text, value in options
    )


def plan(cfg: PipelineConfig, shape: ModelShape | None = None) -> MemoryEstimate:
    """The per-GPU memory of training ``cfg`` (``ftpipe.estimate.estimate`` prints it).

    Reads only the model's configuration (a local folder holding config.json works offline); no weights
    are loaded. ``shape``: the model's, when already read (a plan of several layouts reads it once).

    Raises:
        ModelConfigUnavailable: the model's configuration cannot be read.
        EstimateError: the configured precision or attention kernel cannot run on the target device.
    """
    target = _target(cfg)
    shape = shape if shape is not None else model_shape(cfg)
    memory = _device_memory(cfg, target.device)
    result = _compute(cfg, shape, target, memory)
    if result.fits is False and memory is not None:
        result = _with_advice(result, _advice(cfg, shape, target, memory))
    return result


def resolve_activation_checkpointing(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with ``activation_checkpointing: auto`` replaced by what the estimate chooses (logged with both
    totals); on, with a warning, when the model's configuration cannot be estimated. Other values pass."""
    if cfg.dist.activation_checkpointing != "auto":
        return cfg
    try:
        result = plan(cfg)
    except (ModelConfigUnavailable, EstimateError, UnknownMoeLayout) as err:
        log.warning("activation checkpointing on (auto): the memory could not be estimated (%s)", err)
        return cfg.replace(activation_checkpointing=True)
    log.info("%s", result.auto_reason)
    return cfg.replace(activation_checkpointing=result.activation_checkpointing)


def _with_advice(result: MemoryEstimate, advice: tuple[str, ...]) -> MemoryEstimate:
    return dataclasses.replace(result, advice=advice)
