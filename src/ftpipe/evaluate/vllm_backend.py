"""The vLLM generation backend: a worker process (``ftpipe.evaluate.vllm_worker``) started, watched and
ended from here, so that vLLM's engine starts under a ``__main__`` guard whatever the caller is, and
every engine resource goes when the worker exits."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftpipe.evaluate.device import Device, evaluation_device
from ftpipe.evaluate.generation_types import GenerationError, GenerationResult, GenerationSettings, rate
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

#: How many trailing lines of the vLLM worker's output an error message quotes.
TAIL_LINES = 40


def worker_env(settings: GenerationSettings, device: Device) -> dict[str, str]:
    """The worker's environment: on the CPU (``device``) its KV cache gets ``vllm_cpu_kvcache_gib`` (unless
    ``VLLM_CPU_KVCACHE_SPACE`` is set already), and the machine's GPUs, if any, are hidden from it."""
    import torch

    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_cpu_kvcache_gib))
        if torch.cuda.is_available():  # accelerator cpu on a GPU machine: nothing lands on a GPU
            env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def worker_command(request: Path, output: Path) -> list[str]:
    """The worker's command line: ``ftpipe.evaluate.vllm_worker`` in a fresh interpreter."""
    return [
        sys.executable,
        "-m",
        "ftpipe.evaluate.vllm_worker",
        "--request",
        str(request),
        "--output",
        str(output),
        "--parent",
        str(os.getpid()),
    ]


def _kill_group(proc: subprocess.Popen) -> None:
    """End the worker and the engine processes it spawned (they share its process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def generate_vllm(
    model_path: str, prompts: list[list[int]], settings: GenerationSettings
) -> GenerationResult:
    start = time.perf_counter()
    device = evaluation_device(settings.accelerator)
    with tempfile.TemporaryDirectory(prefix="ftpipe-vllm-") as tmp:
        request, output = Path(tmp) / "request.json", Path(tmp) / "output.json"
        request.write_text(
            json.dumps(
                {
                    "model_path": model_path,
                    "prompts": prompts,
                    "settings": dataclasses.asdict(settings),
                    "device": device,
                }
            ),
            encoding="utf-8",
        )
        cmd = worker_command(request, output)
        log.info(
            "vllm: starting a worker process for %s (the engine takes about a minute to start on a CPU)",
            model_path,
        )
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=worker_env(settings, device),
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
        tokens_per_second=rate(total, data["generate_seconds"]),
    )
