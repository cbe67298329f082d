"""Run-time choices, in one home: the accelerator, the precision and the attention kernel.

Model loading (``ftpipe.model``), the strategies (``ftpipe.distributed``), the data module (flattened
packed rows for flash-attention), training and the memory estimate all ask here, so each choice is
made by one rule. The choices follow from the hardware unless the configuration fixes them.
"""

from __future__ import annotations

import torch

from ftpipe.config.schema import PipelineConfig
from ftpipe.config.validate import ConfigError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

# ----------------------------------------------------------------------------------------------
# accelerator


def accelerator_name(cfg: PipelineConfig) -> str:
    """``cuda`` when a CUDA device is visible and ``accelerator`` is not ``cpu``, else ``cpu``."""
    return resolve_accelerator(cfg.dist.accelerator)


def resolve_accelerator(wanted: str) -> str:
    """``cuda`` or ``cpu`` for an ``accelerator`` value (training's rule; evaluation follows it too).

    Raises:
        ConfigError: ``cuda`` where no CUDA device is visible.
    """
    if wanted == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if wanted == "cuda":
        raise ConfigError(
            ["accelerator: 'cuda' but no CUDA device is visible (set accelerator: auto or cpu)"]
        )
    return "cpu"


def process_group_backend(cfg: PipelineConfig) -> str:
    """``nccl`` on CUDA, ``gloo`` on the CPU."""
    return "nccl" if accelerator_name(cfg) == "cuda" else "gloo"


# ----------------------------------------------------------------------------------------------
# dtypes of a Lightning precision string

_COMPUTE = {
    "32-true": torch.float32,
    "32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the forward pass computes in."""
    try:
        return _COMPUTE[precision]
    except KeyError:
        raise ValueError(f"precision: unknown value {precision!r} (allowed: {sorted(_COMPUTE)})") from None


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of the stored (master) weights: the compute dtype for ``*-true``, fp32 for ``*-mixed``."""
    return compute_dtype(precision) if precision.endswith("-true") else torch.float32


def is_16bit(precision: str) -> bool:
    """Whether ``precision`` computes in bf16 or fp16."""
    return compute_dtype(precision) in (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# precision and attention


def precision_and_reason(cfg: PipelineConfig) -> tuple[str, str]:
    """The Lightning precision string of ``cfg`` and why it was chosen (not logged; see select_precision)."""
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
    precision, reason = precision_and_reason(cfg)
    log.info("precision: %s (%s)", precision, reason)
    return precision


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package imports."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def supports_sdpa(model_config) -> bool:
    """True unless ``model_config``'s causal-LM class declares it has no sdpa attention (GPT-OSS: its
    attention sinks); True for a configuration transformers does not map (a remote-code model decides)."""
    if model_config is None:
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:
        return True
    return bool(getattr(model_class, "_supports_sdpa", True))


def select_attn_implementation(
    cfg: PipelineConfig, device_type: str, *, precision: str | None = None, model_config=None
) -> str:
    """Attention kernel: ``flash_attention_2`` when ``flash_attn`` imports and on CUDA, else ``sdpa`` (``eager``
    for a model class without sdpa attention, when its ``model_config`` is given).

    A configured value is used as is, except that ``flash_attention_2`` is refused (with what to do)
    where it cannot run: without the package, off CUDA, or in fp32.
    """
    configured = cfg.model.attn_implementation
    precision = precision or precision_and_reason(cfg)[0]
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
        if not supports_sdpa(model_config):
            choice, reason = "eager", f"auto: {why}, and {type(model_config).__name__} has no sdpa attention"
    log.info("attention: %s (%s)", choice, reason)
    return choice
