"""What generation takes and gives, shared by the backends: settings, result, error."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ftpipe.config.schema import EvalConfig
from ftpipe.errors import FtpipeError

if TYPE_CHECKING:
    from ftpipe.config.schema import PipelineConfig

Backend = Literal["auto", "vllm", "transformers"]


class GenerationError(FtpipeError, RuntimeError):
    """Generation could not run; the message says which setting or install to change."""


#: The defaults of the evaluation section: the one source of the settings' defaults below.
_EVAL = EvalConfig()


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """Sampling and engine settings shared by both backends (see ``EvalConfig`` for each field; its defaults
    are these defaults; ``accelerator`` is the run's, see ``ftpipe.evaluate.device``)."""

    temperature: float = _EVAL.temperature
    top_p: float = _EVAL.top_p
    max_new_tokens: int = _EVAL.max_new_tokens
    seed: int = _EVAL.eval_seed
    batch_size: int = _EVAL.eval_batch_size
    max_model_len: int = _EVAL.max_model_len
    gpu_memory_utilization: float = _EVAL.gpu_memory_utilization
    tensor_parallel_size: int | None = _EVAL.tensor_parallel_size
    vllm_cpu_kvcache_gib: int = _EVAL.vllm_cpu_kvcache_gib
    trust_remote_code: bool = False
    accelerator: Literal["auto", "cuda", "cpu"] = "auto"

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> GenerationSettings:
        """The settings of ``cfg.eval`` (and ``trust_remote_code`` of ``cfg.model``, ``accelerator`` of
        ``cfg.dist``)."""
        ev = cfg.eval
        return cls(
            temperature=ev.temperature,
            top_p=ev.top_p,
            max_new_tokens=ev.max_new_tokens,
            seed=ev.eval_seed,
            batch_size=ev.eval_batch_size,
            max_model_len=ev.max_model_len,
            gpu_memory_utilization=ev.gpu_memory_utilization,
            tensor_parallel_size=ev.tensor_parallel_size,
            vllm_cpu_kvcache_gib=ev.vllm_cpu_kvcache_gib,
            trust_remote_code=cfg.model.trust_remote_code,
            accelerator=cfg.dist.accelerator,
        )


@dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """Generated answers (in prompt order) and how long they took.

    ``load_seconds`` is the model load (vLLM: the engine start), ``generate_seconds`` the generation
    itself, ``total_seconds`` everything the caller waited (vLLM: including the worker's imports).
    ``generated_tokens`` counts answer tokens, the EOS token included when the answer ended with one.
    """

    texts: list[str]
    backend: Literal["vllm", "transformers"]
    token_counts: list[int]
    generated_tokens: int
    load_seconds: float
    generate_seconds: float
    total_seconds: float
    tokens_per_second: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rate(tokens: int, seconds: float) -> float:
    """Tokens per second (0 for no time)."""
    return tokens / seconds if seconds > 0 else 0.0
