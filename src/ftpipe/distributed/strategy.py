"""The Lightning strategy for ``cfg.dist.strategy``: FSDP2, FSDP1, DDP or a single device."""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch.plugins.environments import (
    ClusterEnvironment,
    KubeflowEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)

from ftpipe.config.schema import PipelineConfig
from ftpipe.distributed.fsdp1 import CPUFSDPStrategy, MaterializeMeta
from ftpipe.runtime import accelerator_name, compute_dtype, is_16bit, process_group_backend, select_precision
from ftpipe.utils.launch import current as current_launch
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


def _fsdp1(cfg: PipelineConfig, layer_classes: set[type], common: dict) -> FSDPStrategy:
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision

    ds = cfg.dist
    on_cpu = accelerator_name(cfg) == "cpu"
    precision = select_precision(cfg)
    mixed = None  # 32-bit: Lightning's FSDPPrecision policy (fp32 throughout)
    if is_16bit(precision) and ds.fsdp_mixed_precision:
        dtype = compute_dtype(precision)
        mixed = MixedPrecision(
            param_dtype=dtype, reduce_dtype=dtype, buffer_dtype=dtype, cast_forward_inputs=True
        )
    elif is_16bit(precision):
        mixed = MixedPrecision()  # no FSDP casting (else Lightning's plugin would impose 16-bit params)
    sync = ds.sync_module_states
    if on_cpu and sync:
        # torch refuses sync_module_states with CPU tensors; every rank loads the weights instead.
        log.info("FSDP1 on the CPU: sync_module_states off (torch needs GPU tensors to broadcast them)")
        sync = False
    cpu_offload = CPUOffload(offload_params=True) if ds.cpu_offload and not on_cpu else None
    kwargs = dict(
        sharding_strategy=ds.sharding_strategy,
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE,
        limit_all_gathers=ds.limit_all_gathers,
        use_orig_params=ds.use_orig_params,
        sync_module_states=sync,
        cpu_offload=cpu_offload,
        auto_wrap_policy=set(layer_classes),
        activation_checkpointing_policy=set(layer_classes) if ds.activation_checkpointing else None,
        mixed_precision=mixed,
        state_dict_type="sharded",
        **common,
    )
    if sync:
        kwargs["param_init_fn"] = MaterializeMeta("cuda")
    cls = CPUFSDPStrategy if on_cpu else FSDPStrategy
    return cls(**kwargs)


def cluster_environment() -> ClusterEnvironment | None:
    """Lightning's cluster environment for this process's launcher (:mod:`ftpipe.utils.launch`), given to
    the Trainer so that Lightning and ftpipe never disagree on who a process is: SLURM without Lightning's
    own requeue (ftpipe stops on the signal and saves; the batch script requeues), torchrun (also under
    srun, where Lightning's order would take SLURM's task numbers), the Kubernetes operator's one process per
    pod (which Lightning cannot detect); None for ftpipe's own launch (Lightning's default)."""
    launcher = current_launch().launcher
    if launcher == "slurm":
        return SLURMEnvironment(auto_requeue=False)
    if launcher == "torchrun":
        return TorchElasticEnvironment()
    if launcher == "kubeflow":
        return KubeflowEnvironment()
    return None


def build_strategy(cfg: PipelineConfig, layer_classes: set[type]) -> Strategy | str:
    """The Lightning strategy of ``cfg.dist.strategy``.

    - ``fsdp2``: ``ModelParallelStrategy`` (data parallel over every process, no tensor parallel,
      distributed checkpoints); the sharding itself happens in ``create_model`` (configure_model).
    - ``fsdp1``: ``FSDPStrategy`` wrapping ``layer_classes`` (``CPUFSDPStrategy`` on the CPU).
    - ``ddp``: ``DDPStrategy`` without unused-parameter search, gradients as views of its buckets.
    - ``single``: ``SingleDeviceStrategy``.
    """
    ds, t = cfg.dist, cfg.train
    world = t.num_nodes * t.gpus_per_node
    common = {
        "timeout": timedelta(seconds=ds.process_group_timeout_s),
        "process_group_backend": process_group_backend(cfg),
    }
    if ds.strategy == "fsdp2":
        strategy: Strategy | str = ModelParallelStrategy(
            data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=True, **common
        )
    elif ds.strategy == "fsdp1":
        if not layer_classes:
            raise ValueError(
                "build_strategy(fsdp1) needs the decoder layer classes (discover_decoder_layer_classes)"
            )
        strategy = _fsdp1(cfg, layer_classes, common)
    elif ds.strategy == "ddp":
        # gradients as views into the all-reduce buckets: no second copy of them, no copy per step
        strategy = DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True, **common)
    elif ds.strategy == "single":
        device = torch.device("cuda", 0) if accelerator_name(cfg) == "cuda" else torch.device("cpu")
        strategy = SingleDeviceStrategy(device=device)
    else:  # pragma: no cover - the config's Literal type and validation exclude it
        raise ValueError(f"strategy: unknown value {ds.strategy!r} (allowed: fsdp2, fsdp1, ddp, single)")
    log.info("strategy: %s (%s, %d process(es))", ds.strategy, type(strategy).__name__, world)
    return strategy
