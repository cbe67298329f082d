"""Precision and attention selection, model configuration loading, and create_model on the CPU."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest
import torch

from ftpipe.config import PipelineConfig
from ftpipe.distributed import build
from ftpipe.distributed.build import create_model
from ftpipe.model.load import ModelLoadError, load_model_config
from ftpipe.runtime import select_attn_implementation, select_precision


def _cfg(**flat) -> PipelineConfig:
    return PipelineConfig.from_flat(flat)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend a CUDA device is visible; the test sets bf16 support with the returned setter."""

    def set_gpu(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return set_gpu


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---------------------------------------------------------------------------- precision


@pytest.mark.timeout(10)
def test_auto_precision_bf16_mixed_on_gpu_with_bf16(fake_cuda, caplog):
    fake_cuda(bf16=True)
    caplog.set_level(logging.INFO, logger="ftpipe")
    assert select_precision(_cfg(precision="auto")) == "bf16-mixed"
    assert "precision: bf16-mixed (auto: the CUDA device supports bf16)" in caplog.text


@pytest.mark.timeout(10)
def test_auto_precision_fp32_on_gpu_without_bf16(fake_cuda):
    fake_cuda(bf16=False)
    assert select_precision(_cfg(precision="auto")) == "32-true"


@pytest.mark.timeout(10)
def test_auto_precision_fp32_on_cpu(no_cuda, caplog):
    caplog.set_level(logging.INFO, logger="ftpipe")
    assert select_precision(_cfg(precision="auto")) == "32-true"
    assert "auto: no CUDA device" in caplog.text


@pytest.mark.timeout(10)
def test_auto_precision_fp32_when_cpu_forced_despite_gpu(fake_cuda):
    fake_cuda(bf16=True)
    assert select_precision(_cfg(precision="auto", accelerator="cpu")) == "32-true"


@pytest.mark.timeout(10)
def test_configured_precision_kept_and_impossible_ones_refused(fake_cuda, caplog):
    caplog.set_level(logging.INFO, logger="ftpipe")
    fake_cuda(bf16=True)
    assert select_precision(_cfg(precision="bf16-true")) == "bf16-true"
    assert "precision: bf16-true (configured)" in caplog.text
    fake_cuda(bf16=False)
    with pytest.raises(ValueError, match=r"precision: 'bf16-mixed' but this GPU does not support bf16"):
        select_precision(_cfg(precision="bf16-mixed"))
    assert select_precision(_cfg(precision="16-mixed", strategy="fsdp1")) == "16-mixed"


@pytest.mark.timeout(10)
def test_fp16_refused_and_bf16_warned_on_cpu(no_cuda, caplog):
    with pytest.raises(ValueError, match=r"precision: '16-mixed' needs a CUDA GPU"):
        select_precision(_cfg(precision="16-mixed", strategy="fsdp1"))
    assert select_precision(_cfg(precision="bf16-true")) == "bf16-true"
    assert "bf16 is emulated" in caplog.text  # a warning: visible without raising the log level


# ---------------------------------------------------------------------------- attention


@pytest.fixture
def flash_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))


@pytest.fixture
def flash_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` raise ImportError


@pytest.mark.timeout(10)
def test_auto_attention_flash_on_cuda_when_installed(flash_installed, caplog):
    caplog.set_level(logging.INFO, logger="ftpipe")
    cfg = _cfg(attn_implementation="auto")
    assert select_attn_implementation(cfg, "cuda", precision="bf16-mixed") == "flash_attention_2"
    assert "attention: flash_attention_2" in caplog.text
    # the same machine without a GPU, or in fp32, falls back to sdpa
    assert select_attn_implementation(cfg, "cpu", precision="32-true") == "sdpa"
    assert select_attn_implementation(cfg, "cuda", precision="32-true") == "sdpa"


@pytest.mark.timeout(10)
def test_auto_attention_sdpa_without_flash_attn(flash_missing):
    assert select_attn_implementation(_cfg(), "cuda", precision="bf16-mixed") == "sdpa"


@pytest.mark.timeout(10)
def test_configured_flash_attention_refused_where_impossible(flash_missing, monkeypatch):
    cfg = _cfg(attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation: flash_attention_2 cannot be used") as err:
        select_attn_implementation(cfg, "cpu", precision="32-true")
    message = str(err.value)
    assert "flash_attn package is not installed" in message
    assert "CUDA only" in message and "fp32" in message
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert select_attn_implementation(cfg, "cuda", precision="bf16-true") == "flash_attention_2"


@pytest.mark.timeout(10)
def test_configured_attention_used_as_is():
    assert (
        select_attn_implementation(_cfg(attn_implementation="eager"), "cpu", precision="32-true") == "eager"
    )


# ---------------------------------------------------------------------------- configuration


def test_trust_remote_code_is_off_by_default():
    assert PipelineConfig().model.trust_remote_code is False


def _custom_code_model(folder):
    """A local model folder whose configuration class lives in the repository's own code."""
    folder.mkdir()
    (folder / "configuration_ftpipe_custom.py").write_text(
        "from transformers import PretrainedConfig\n\n\n"
        "class CustomConfig(PretrainedConfig):\n"
        "    model_type = 'ftpipe_custom'\n",
        encoding="utf-8",
    )
    config = {
        "model_type": "ftpipe_custom",
        "auto_map": {"AutoConfig": "configuration_ftpipe_custom.CustomConfig"},
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.timeout(30)
def test_remote_code_runs_only_when_trusted(tmp_path, caplog):
    folder = _custom_code_model(tmp_path / "custom")
    with pytest.raises(ModelLoadError, match="set trust_remote_code: true"):
        load_model_config(_cfg(hf_model_id=str(folder)))
    config = load_model_config(_cfg(hf_model_id=str(folder), trust_remote_code=True))
    assert type(config).__name__ == "CustomConfig"
    assert "trust_remote_code is on" in caplog.text  # a warning


@pytest.mark.timeout(30)
def test_offline_unknown_model_id_is_a_clear_error():
    with pytest.raises(ModelLoadError) as err:
        load_model_config(_cfg(hf_model_id="no-such-org/no-such-model-ftpipe"))
    message = str(err.value)
    assert message.startswith("hf_model_id: cannot load 'no-such-org/no-such-model-ftpipe'")
    assert "hub is offline (HF_HUB_OFFLINE=1)" in message
    assert "'embedded'" in message


@pytest.mark.timeout(30)
def test_embedded_config_resolves(embedded_model_path):
    config = load_model_config(_cfg(hf_model_id="embedded"))
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)


# ---------------------------------------------------------------------------- create_model


@pytest.mark.timeout(60)
def test_create_model_on_cpu_fp32_sdpa_no_cache(embedded_model_path, no_cuda):
    cfg = _cfg(hf_model_id="embedded", strategy="single", gpus_per_node=1, activation_checkpointing=True)
    model = create_model(cfg)
    inner = model.get_base_model()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert inner.config._attn_implementation == "sdpa"
    assert inner.config.use_cache is False
    # activation checkpointing wraps each of the 30 decoder layers
    wrapped = [m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == 30
    assert {type(m._checkpoint_wrapped_module).__name__ for m in wrapped} == {"LlamaDecoderLayer"}


@pytest.mark.timeout(60)
def test_create_model_bf16_true_keeps_everything_bf16(embedded_model_path, no_cuda):
    cfg = _cfg(hf_model_id="embedded", strategy="single", gpus_per_node=1, precision="bf16-true")
    model = create_model(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # adapters too: one dtype for FSDP
    assert model.training  # from_pretrained gives eval mode; LoRA dropout must be active in training


@pytest.mark.timeout(20)
def test_fsdp2_without_mesh_in_a_process_group_is_an_error(monkeypatch, embedded_model_path):
    monkeypatch.setattr(build.ranks, "world", lambda: (1, 2))
    with pytest.raises(ValueError, match=r"on rank 1 of 2 needs the device mesh"):
        create_model(_cfg(hf_model_id="embedded"), strategy_kind="fsdp2")
