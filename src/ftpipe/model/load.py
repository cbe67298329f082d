"""Stage 4: load any Hugging Face causal LM (by ``AutoModelForCausalLM``) and add LoRA.

The pieces here know nothing of parallelism: the model's configuration (checked before anything is
built), its pretrained weights (4-bit for QLoRA), its architecture on the meta device, and LoRA or
full fine-tuning on top. ``ftpipe.distributed.build.create_model`` puts them together for a strategy;
the precision and the attention kernel come from ``ftpipe.runtime``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from ftpipe.config.schema import PipelineConfig
from ftpipe.config.validate import ConfigError
from ftpipe.model.embedded import resolve_model_path
from ftpipe.model.errors import ModelLoadError, load_hint, short_reason
from ftpipe.model.lora import apply_lora
from ftpipe.model.recompute import recompute_activation_outputs
from ftpipe.model.stats import log_parameter_stats
from ftpipe.runtime import accelerator_name, compute_dtype, precision_and_reason, select_attn_implementation
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


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


def prepared_config(cfg: PipelineConfig, device_type: str, precision: str) -> transformers.PretrainedConfig:
    """The model's configuration for training: no KV cache, the attention kernel chosen for the device."""
    config = load_model_config(cfg)
    config.use_cache = False
    attn = select_attn_implementation(cfg, device_type, precision=precision, model_config=config)
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
        bnb_4bit_compute_dtype=compute_dtype(precision_and_reason(cfg)[0]),
    )


def load_pretrained(cfg: PipelineConfig, config: transformers.PretrainedConfig, dtype: torch.dtype):
    """The pretrained weights in ``dtype`` (4-bit NF4 for QLoRA), on the CPU unless quantized."""
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


def build_empty(cfg: PipelineConfig, config: transformers.PretrainedConfig, dtype: torch.dtype):
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


def prepare_for_finetuning(
    model: torch.nn.Module, cfg: PipelineConfig, announce: bool = True
) -> torch.nn.Module:
    """LoRA or full fine-tuning, then the parameter statistics. ``announce=False`` gives a rank's reference
    copy the same adapters (same names and shapes) without logging twice."""
    lora = cfg.model.finetuning == "lora"
    if cfg.dist.recompute_elementwise:
        recompute_activation_outputs(model)  # used by training under ftpipe.model.recompute.recompute_saved
    if not announce:
        return apply_lora(model, cfg, announce=False) if lora else model
    if lora:
        model = apply_lora(model, cfg)
    else:
        model.requires_grad_(True)
        log.info("full fine-tuning: every weight trains")
    log_parameter_stats(model, label=type(model).__name__)
    return model
