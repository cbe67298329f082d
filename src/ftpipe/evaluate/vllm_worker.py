"""The vLLM worker process: ``python -m ftpipe.evaluate.vllm_worker --request req.json --output out.json``.

``LLM(...)`` starts its engine in a spawned process, which only works from a ``__main__`` guard; this
module is that guard. On the CPU it runs with ``enforce_eager=True`` (and the ``VLLM_CPU_KVCACHE_SPACE``
that ``ftpipe.evaluate.vllm_backend`` sets).

The worker runs in a process group of its own (its engine processes with it), so a signal to ftpipe's
group does not reach it: it ends with its parent instead (``PR_SET_PDEATHSIG``), and a SIGTERM, from the
parent's cleanup or from the kernel, takes its whole group down, so no engine is left holding memory.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftpipe.evaluate.generation_types import GenerationSettings
from ftpipe.utils.logging import get_logger, setup_logging

log = get_logger(__name__)


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
    """Generate in this process with vLLM; call only from a ``__main__`` guard (the worker's). ``request``:
    ``model_path``, ``prompts`` (token ids), ``settings`` and ``device`` (``cuda`` or ``cpu``)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    settings = GenerationSettings(**request["settings"])
    model_path = request["model_path"]
    on_gpu = request["device"] == "cuda"  # decided by the parent from accelerator (ftpipe.evaluate.device)
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


_PR_SET_PDEATHSIG = 1


def _end_with_parent(parent: int) -> None:
    """SIGTERM ends the worker's whole group; the kernel sends it when the parent ``parent`` dies."""
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    name = ctypes.util.find_library("c")
    if name is not None:
        ctypes.CDLL(name, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> None:
    """The vLLM worker: ``--request`` JSON (model_path, prompts, settings) in, ``--output`` JSON out."""
    parser = argparse.ArgumentParser(description="ftpipe vLLM generation worker")
    parser.add_argument("--request", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--parent", type=int, default=None, help="pid of ftpipe: the worker ends with it")
    args = parser.parse_args(argv)
    if args.parent is not None:
        _end_with_parent(args.parent)
    setup_logging()
    result = run_vllm_worker(json.loads(args.request.read_text(encoding="utf-8")))
    tmp = args.output.with_suffix(".partial")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.rename(args.output)


if __name__ == "__main__":
    main()
