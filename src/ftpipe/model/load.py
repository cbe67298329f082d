"""Stage 4: load any Hugging Face causal LM (by ``AutoModelForCausalLM``), add LoRA, prepare it for FSDP.

The precision and the attention kernel follow from the hardware unless configured. Loading is
memory-aware: under FSDP2 every rank builds the model on the meta device, shards it, and receives its
shards of rank 0's weights (one full copy in host memory, on rank 0 only); under FSDP1 on GPUs only
rank 0 reads the weights and FSDP broadcasts them (``sync_module_states``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from ftpipe.config.schema import PipelineConfig
from ftpipe.config.validate import ConfigError
from ftpipe.distributed.checkpointing import apply_activation_checkpointing
from ftpipe.distributed.devices import accelerator_name
from ftpipe.distributed.fsdp2 import shard_model
from ftpipe.distributed.layers import find_decoder_layer_classes
from ftpipe.distributed.precision import compute_dtype, is_16bit, weight_dtype
from ftpipe.model.embedded import resolve_model_path
from ftpipe.model.errors import ModelLoadError, load_hint, short_reason
from ftpipe.model.lora import apply_lora
from ftpipe.model.stats import log_parameter_stats
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# precision and attention


def _precision_and_reason(cfg: PipelineConfig) -> tuple[str, str]:
    configured = cfg.model.precision
    device = accelerator_name(cfg)
    if configured != "auto":
        if device == "cpu" and configured.startswith("16"):
            raise ConfigError(
                [f"precision: {configured!r} needs a CUDA GPU (fp16 autocast); on the CPU use '32-true'"]
            )
        if device == "cuda" and configured.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                [f"precision: {configured!r} but this GPU does not support bf16; use '16-mixed' or '32-true'"]
            )
        if device == "cpu" and configured.startswith("bf16"):
            log.warning("precision %s on the CPU: bf16 is emulated on most CPUs and very slow", configured)
        return configured, "configured"
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-mixed", "auto: the CUDA device supports bf16"
    if device == "cuda":
        return "32-true", "auto: the CUDA device has no bf16 support"
    return "32-true", "auto: no CUDA device (bf16 is emulated and slow on CPUs)"


def select_precision(cfg: PipelineConfig) -> str:
    """Lightning precision string: ``cfg.model.precision`` unless ``auto``.

    ``auto`` gives ``bf16-mixed`` on a CUDA device with bf16 support and ``32-true`` otherwise.
    """
    precision, reason = _precision_and_reason(cfg)
    log.info("precision: %s (%s)", precision, reason)
    return precision


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package imports."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_attn_implementation(cfg: PipelineConfig, device_type: str, *, precision: str | None = None) -> str:
    """Attention kernel: ``flash_attention_2`` when ``flash_attn`` imports and on CUDA, else ``sdpa``.

    A configured value is used as is, except that ``flash_attention_2`` is refused (with what to do)
    where it cannot run: without the package, off CUDA, or in fp32.
    """
    configured = cfg.model.attn_implementation
    precision = precision or _precision_and_reason(cfg)[0]
    half = is_16bit(precision)
    if configured == "flash_attention_2":
        problems = []
        if not flash_attn_available():
            problems.append("the flash_attn package is not installed (pip install 'ftpipe[gpu]')")
        if device_type != "cuda":
            problems.append(f"the device is {device_type!r}, flash-attention runs on CUDA only")
        if not half:
            problems.append(f"precision {precision!r} is fp32, flash-attention needs bf16/fp16")
        if problems:
            raise ConfigError(
                [
                    "attn_implementation: flash_attention_2 cannot be used: "
                    + "; ".join(problems)
                    + " (allowed: auto, sdpa, eager)"
                ]
            )
        choice, reason = configured, "configured"
    elif configured != "auto":
        choice, reason = configured, "configured"
    elif device_type == "cuda" and half and flash_attn_available():
        choice, reason = "flash_attention_2", "auto: flash_attn is installed and the device is CUDA"
    else:
        why = "not CUDA" if device_type != "cuda" else ("fp32" if not half else "flash_attn not installed")
        choice, reason = "sdpa", f"auto: {why}"
    log.info("attention: %s (%s)", choice, reason)
    return choice


# ----------------------------------------------------------------------------------------------
# configuration and weights


def load_model_config(cfg: PipelineConfig) -> transformers.PretrainedConfig:
    """The model's ``AutoConfig`` (``trust_remote_code`` only when configured).

    Raises ModelLoadError naming ``hf_model_id`` when the model is neither a local folder nor
    reachable (offline and not cached, or a typo).
    """
    model_id = cfg.model.hf_model_id
    path = resolve_model_path(model_id, cfg.model.model_cache_dir)
    if cfg.model.trust_remote_code:
        log.warning("trust_remote_code is on: code from the model repository %s will run here", model_id)
    local = Path(path) / "config.json"
    if local.is_file():  # checked as written, before transformers builds anything from it
        try:
            raw = json.loads(local.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"hf_model_id: {local} is not valid JSON ({err}); fix it or choose another hf_model_id"
            ) from err
        _raise_config_problems(model_id, config_problems(raw if isinstance(raw, dict) else {}))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as err:  # a user's config.json: any failure to read it is theirs to fix
        raise ModelLoadError(
            f"hf_model_id: cannot load {model_id!r}: {load_hint(model_id, path, err)} ({short_reason(err)})"
        ) from err
    _raise_config_problems(model_id, config_problems(config))
    return config


def _raise_config_problems(model_id: str, problems: list[str]) -> None:
    if problems:
        raise ModelLoadError(
            f"hf_model_id: the configuration (config.json) of {model_id!r} cannot describe a model: "
            + "; ".join(problems)
            + ". Fix config.json or choose another hf_model_id"
        )


_POSITIVE_SIZES = (
    "hidden_size",
    "num_attention_heads",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
)


def config_problems(config: transformers.PretrainedConfig | dict) -> list[str]:
    """What makes a causal LM's configuration (an object, or config.json as read) unusable before anything
    is built from it: sizes that are not positive whole numbers, attention heads that do not divide the
    hidden size (without an explicit head_dim), key/value heads that do not divide the attention heads."""
    names = (*_POSITIVE_SIZES, "num_key_value_heads", "head_dim")
    if isinstance(config, dict):
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        values = {name: text.get(name) for name in names}
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        values = {name: getattr(text, name, None) for name in names}
    problems = [
        f"{name} is {value!r} (must be a whole number > 0)"
        for name, value in values.items()
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0)
    ]
    if problems:
        return problems
    hidden, heads, kv, head_dim = (
        values[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    if hidden and heads and head_dim is None and hidden % heads:
        problems.append(f"num_attention_heads {heads} does not divide hidden_size {hidden}")
    if heads and kv and heads % kv:
        problems.append(f"num_key_value_heads {kv} does not divide num_attention_heads {heads}")
    return problems


def _prepared_config(cfg: PipelineConfig, device_type: str, precision: str) -> transformers.PretrainedConfig:
    config = load_model_config(cfg)
    config.use_cache = False
    attn = select_attn_implementation(cfg, device_type, precision=precision)
    config._attn_implementation = attn
    return config


#: bitsandbytes releases whose 4-bit layers run on the device (CPU support arrived in 0.49).
BNB_MIN_VERSION = {"cuda": (0, 43), "cpu": (0, 49)}


def check_4bit_support(cfg: PipelineConfig, device_type: str | None = None) -> None:
    """Raise ConfigError, before any weights load, when ``load_in_4bit`` cannot run here: bitsandbytes
    missing, too old for the device, or a device it has no 4-bit layers for."""
    if not cfg.lora.load_in_4bit:
        return
    import importlib.metadata
    import importlib.util

    device_type = device_type or accelerator_name(cfg)
    if device_type not in BNB_MIN_VERSION:
        raise ConfigError([f"load_in_4bit: bitsandbytes has no 4-bit layers for the {device_type} device"])
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            [
                "load_in_4bit: QLoRA needs the bitsandbytes package: pip install 'ftpipe[qlora]' (or set load_in_4bit: false)"
            ]
        )
    version = importlib.metadata.version("bitsandbytes")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    wanted = BNB_MIN_VERSION[device_type]
    if parts < wanted:
        raise ConfigError(
            [
                f"load_in_4bit: bitsandbytes {version} has no 4-bit layers for the {device_type}; "
                f"install bitsandbytes>={wanted[0]}.{wanted[1]}"
            ]
        )


def _quantization(cfg: PipelineConfig, device_type: str):
    """The bitsandbytes NF4 configuration of QLoRA (double quantization, compute in the training dtype)."""
    if not cfg.lora.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    check_4bit_support(cfg, device_type)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(_precision_and_reason(cfg)[0]),
    )


def _from_pretrained(cfg: PipelineConfig, config: transformers.PretrainedConfig, dtype: torch.dtype):
    path = resolve_model_path(cfg.model.hf_model_id, cfg.model.model_cache_dir)
    quantization = _quantization(cfg, accelerator_name(cfg))
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        attn_implementation=config._attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        **({"quantization_config": quantization} if quantization is not None else {}),
    )
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # norms in fp32 and input gradients on; ftpipe applies its own activation checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    what = "4-bit NF4" if quantization is not None else str(dtype)
    log.info("loaded %s weights (%s) in %.1fs", cfg.model.hf_model_id, what, time.monotonic() - start)
    return model


def _empty_model(cfg: PipelineConfig, config: transformers.PretrainedConfig, dtype: torch.dtype):
    """The architecture with parameters on the meta device (buffers real: they are not all in checkpoints)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            attn_implementation=config._attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    model.tie_weights()  # init_empty_weights re-registers parameters, which unties shared ones
    return model


def _finish(model: torch.nn.Module, cfg: PipelineConfig) -> torch.nn.Module:
    """LoRA or full fine-tuning, then the parameter statistics."""
    if cfg.model.finetuning == "lora":
        model = apply_lora(model, cfg)
    else:
        model.requires_grad_(True)
        log.info("full fine-tuning: every weight trains")
    log_parameter_stats(model, label=type(model).__name__)
    return model


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------
# entry


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
    rank, world = _world()
    if kind == "fsdp2" and device_mesh is None:
        if world > 1:
            raise ValueError(
                f"create_model(strategy_kind='fsdp2') on rank {rank} of {world} needs the device mesh "
                "(pass device_mesh=self.device_mesh from LightningModule.configure_model)"
            )
        kind = "single"
    device_type = device_mesh.device_type if device_mesh is not None else accelerator_name(cfg)
    precision = _precision_and_reason(cfg)[0]
    dtype = weight_dtype(precision)  # fp32 master weights for *-mixed and on the CPU's 32-true
    config = _prepared_config(cfg, device_type, precision)

    if kind == "fsdp2":
        return _create_fsdp2(cfg, config, dtype, precision, device_mesh)

    fsdp1_multi = kind == "fsdp1" and world > 1
    rank0_broadcasts = fsdp1_multi and device_type == "cuda" and cfg.dist.sync_module_states
    if rank0_broadcasts and rank != 0:
        # FSDP1 (sync_module_states + the strategy's param_init_fn) broadcasts rank 0's weights.
        log.info("rank %d: building the model on the meta device; rank 0 broadcasts its weights", rank)
        model = _empty_model(cfg, config, dtype)
    else:
        if fsdp1_multi and not rank0_broadcasts:
            why = "on the CPU" if device_type != "cuda" else "sync_module_states is off"
            log.info("FSDP1 %s: every rank reads the weights", why)
        model = _from_pretrained(cfg, config, dtype)
    model = _finish(model, cfg)
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
    rank, _ = _world()
    start = time.monotonic()
    # The meta build must not consume random numbers: rank 0's reference copy below then draws the
    # same adapter initialisation as a plain load under the same seed.
    with torch.random.fork_rng(devices=[]):
        model = _finish(_empty_model(cfg, config, dtype), cfg)
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
            reference = _finish_quietly(_from_pretrained(cfg, config, dtype), cfg)
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
    buffers = [(m, name, buf) for m in model.modules() for name, buf in m._buffers.items() if buf is not None]
    model.to_empty(device=device)
    for module, name, buf in buffers:
        module._buffers[name] = buf
    set_model_state_dict(
        model,
        full_state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=True),
    )
    del full_state, reference
    how = "rank 0's weights broadcast into the shards" if broadcast else "weights loaded into the shards"
    log.info("FSDP2: %s in %.1fs", how, time.monotonic() - start)
    return model.train()


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


def _finish_quietly(model: torch.nn.Module, cfg: PipelineConfig) -> torch.nn.Module:
    """Rank 0's reference copy gets the same adapters (same names and shapes) without logging twice."""
    return apply_lora(model, cfg, announce=False) if cfg.model.finetuning == "lora" else model
