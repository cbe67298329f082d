"""QLoRA (``load_in_4bit``): the frozen base in 4-bit NF4 through bitsandbytes, which runs on this CPU
(bitsandbytes >= 0.49); a clear error before any weights load where it cannot; the memory estimate counts
4-bit weights."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ftpipe.config import ConfigError, PipelineConfig, validate_config

pytestmark = pytest.mark.timeout(240)


def test_qlora_trains_on_the_cpu(tmp_path, tiny_llama, alpaca_demo, run_ftpipe):
    args = {
        "hf_model_id": tiny_llama,
        "dataset": alpaca_demo,
        "data_dir": tmp_path / "data",
        "results_dir": tmp_path / "r",
        "max_samples": 24,
        "max_seq_length": 64,
        "max_steps": 3,
        "warmup_steps": 1,
        "val_check_interval": 3,
        "limit_val_batches": 1,
        "gpus_per_node": 1,
        "strategy": "single",
        "precision": "32-true",
        "micro_batch_size": 2,
        "accumulate_grad_batches": 1,
        "num_workers": 0,
        "load_in_4bit": "true",
        "learning_rate": 1e-2,
        "min_lr": 1e-3,
    }
    flat = [item for key, value in args.items() for item in (f"--{key}", str(value))]
    run_ftpipe("train", flat, tmp_path / "train.log", timeout=200)
    log = (tmp_path / "train.log").read_text()
    assert "4-bit NF4" in log
    metrics = [
        json.loads(line) for line in next((tmp_path / "r").rglob("metrics.jsonl")).read_text().splitlines()
    ]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the adapters learn on the 4-bit base


def test_missing_bitsandbytes_is_one_error_before_any_weights_load(monkeypatch):
    from ftpipe.model.load import check_4bit_support

    cfg = validate_config(PipelineConfig.from_flat({"load_in_4bit": True, "strategy": "ddp"}))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"load_in_4bit: QLoRA needs the bitsandbytes package"):
        check_4bit_support(cfg, "cpu")
    with pytest.raises(ConfigError, match=r"no 4-bit layers for the mps device"):
        check_4bit_support(cfg, "mps")


def test_qlora_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigError) as err:
        validate_config(
            PipelineConfig.from_flat({"load_in_4bit": True, "finetuning": "full", "strategy": "fsdp2"})
        )
    assert "load_in_4bit: QLoRA trains adapters on a 4-bit base" in str(err.value)
    assert "4-bit base weights are not sharded by fsdp2" in str(err.value)


def test_the_estimate_counts_4_bit_weights(embedded_model_path):
    from ftpipe.estimate import estimate

    flat = {
        "hf_model_id": str(embedded_model_path),
        "strategy": "single",
        "gpus_per_node": 1,
        "precision": "bf16-true",
    }
    full = estimate(PipelineConfig.from_flat(flat))
    four = estimate(PipelineConfig.from_flat({**flat, "load_in_4bit": True}))
    assert four.weights < 0.6 * full.weights  # the layers' linear weights at ~4 bits instead of 16
    assert four.weights > 0.25 * full.weights  # the embeddings stay as loaded
    assert four.lora_weights == full.lora_weights and four.optimizer_state == full.optimizer_state
