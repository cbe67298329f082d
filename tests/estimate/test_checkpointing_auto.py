"""``activation_checkpointing: auto`` (the default): off when the memory estimate fits without it, on
otherwise, decided from the configuration and the machine only, and logged with both estimates."""

from __future__ import annotations

import logging

import pytest

from ftpipe.cli.main import parse
from ftpipe.config import ConfigError
from ftpipe.estimate import memory
from ftpipe.estimate.memory import GIB, plan, resolve_activation_checkpointing

BENCH = "configs/benchmark.yaml"  # the embedded model, 2 CPU processes, micro-batch 2 x 256


def _cfg(*args: str):
    _, cfg = parse(["train", "--config", BENCH, *args])
    return cfg


@pytest.mark.timeout(60)
def test_auto_is_the_default_and_the_flag_forms(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert _cfg().dist.activation_checkpointing == "auto"
    assert _cfg("--no_activation_checkpointing").dist.activation_checkpointing is False
    assert _cfg("--activation_checkpointing", "true").dist.activation_checkpointing is True
    assert _cfg("--activation_checkpointing", "auto").dist.activation_checkpointing == "auto"
    with pytest.raises(ConfigError, match="activation_checkpointing: 'maybe' is not allowed"):
        _cfg("--activation_checkpointing", "maybe")


@pytest.mark.timeout(120)
def test_auto_follows_the_host_memory_on_the_cpu(repo_root, monkeypatch, caplog):
    monkeypatch.chdir(repo_root)
    caplog.set_level(logging.INFO, logger="ftpipe")
    cfg = _cfg()
    monkeypatch.setattr(memory, "host_memory", lambda: 64 * GIB)
    est = plan(cfg)
    without, with_ = est.total_with(False), est.total_with(True)
    assert est.activation_checkpointing is False and est.total == without > with_
    assert resolve_activation_checkpointing(cfg).dist.activation_checkpointing is False
    line = next(r.getMessage() for r in caplog.records if "(auto)" in r.getMessage())
    assert line.startswith("activation checkpointing off (auto)")
    usable = (64 * GIB // 2 - memory.CPU_RUNTIME_BYTES) * (1 - memory.HEADROOM)
    for figure in (without, with_, usable):
        assert memory.format_gib(int(figure)) in line
    assert "over 2 process(es)" in line
    # 3 GiB over 2 processes, less the runtime: 0.5 GiB each, too little without checkpointing
    monkeypatch.setattr(memory, "host_memory", lambda: 3 * GIB)
    small = plan(cfg)
    assert small.activation_checkpointing is True and small.total == small.total_with(True) == with_
    assert small.auto_reason.startswith("activation checkpointing on (auto)")
    assert resolve_activation_checkpointing(cfg).dist.activation_checkpointing is True
    # one process (strategy single) has the whole host to itself
    monkeypatch.setattr(memory, "host_memory", lambda: 2 * GIB + without * 2)
    assert plan(cfg.replace(strategy="single", gpus_per_node=1)).activation_checkpointing is False
    # a configured value is left alone, and the estimate counts it
    for value in (True, False):
        fixed = cfg.replace(activation_checkpointing=value)
        assert resolve_activation_checkpointing(fixed) is fixed
        assert plan(fixed).activation_checkpointing is value and plan(fixed).auto_reason is None


@pytest.mark.timeout(120)
def test_auto_plans_a_gpu_run_against_the_gpus_memory(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    seq = ("--max_seq_length", "4096", "--micro_batch_size", "8", "--gpu_memory_gib")
    roomy = plan(_cfg(*seq, "80"))
    tight = plan(_cfg(*seq, "4"))
    assert roomy.target.device == tight.target.device == "cuda"
    assert roomy.activation_checkpointing is False and tight.activation_checkpointing is True
    assert "GPU memory" in tight.auto_reason and "usable" in tight.auto_reason
    from ftpipe.estimate import estimate

    estimate(_cfg(*seq, "4"))
    assert "Activation checkpointing on (auto)" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_no_estimate_means_checkpointing_on(monkeypatch, caplog):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, cfg = parse(["train", "--hf_model_id", "ftpipe-test/no-such-model-7"])
    with caplog.at_level(logging.WARNING, logger="ftpipe"):
        assert resolve_activation_checkpointing(cfg).dist.activation_checkpointing is True
    assert "activation checkpointing on (auto): the memory could not be estimated" in caplog.text
