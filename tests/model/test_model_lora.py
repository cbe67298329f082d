"""LoRA through PEFT on the embedded SmolLM2, full fine-tuning, and the parameter statistics."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig

from ftpipe.config import PipelineConfig
from ftpipe.distributed.build import create_model
from ftpipe.model.lora import LoraTargetError, apply_lora
from ftpipe.model.stats import ParamStats, parameter_stats

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cfg(**flat) -> PipelineConfig:
    base = {
        "hf_model_id": "embedded",
        "strategy": "single",
        "gpus_per_node": 1,
        "activation_checkpointing": False,
        "precision": "32-true",
    }
    return PipelineConfig.from_flat({**base, **flat})


def _lora_params_by_hand(config, rank: int) -> int:
    """LoRA adds r x (in + out) per adapted linear layer: A is r x in, B is out x r."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    shapes = {  # (in, out) of each projection
        "q_proj": (h, q_out),
        "k_proj": (h, kv_out),
        "v_proj": (h, kv_out),
        "o_proj": (q_out, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    per_layer = sum(rank * (i + o) for i, o in shapes.values())
    return per_layer * config.num_hidden_layers


def _base_params_by_hand(config) -> int:
    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attn = h * q + 2 * h * kv + q * h
    mlp = 3 * h * inter
    norms = 2 * h
    embeddings = v * h * (1 if config.tie_word_embeddings else 2)
    return config.num_hidden_layers * (attn + mlp + norms) + embeddings + h  # + final norm


@pytest.fixture(scope="module")
def lora_model(embedded_model_path):
    return create_model(_cfg(lora_rank=32, lora_alpha=32, lora_dropout=0.1, lora_target_modules=SEVEN))


@pytest.mark.timeout(60)
def test_lora_r32_on_seven_targets_exact_trainable_count(lora_model, embedded_model_path):
    config = AutoConfig.from_pretrained(embedded_model_path)
    expected_lora = _lora_params_by_hand(config, rank=32)
    expected_base = _base_params_by_hand(config)
    assert (expected_lora, expected_base) == (9_768_960, 134_515_008)  # the figures by hand, checked once
    stats = parameter_stats(lora_model)
    assert stats.trainable == expected_lora
    assert stats.base == expected_base
    assert stats.total == expected_base + expected_lora
    assert stats.adapter == expected_lora


@pytest.mark.timeout(60)
def test_lora_freezes_the_base_and_trains_only_adapters(lora_model):
    trainable = {n for n, p in lora_model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in lora_model.named_parameters() if not p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lora_" in n for n in frozen)
    assert len(trainable) == 30 * 7 * 2  # A and B on 7 projections in 30 layers
    # every adapted module is one of the targets, and every target is adapted in every layer
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(SEVEN)
    # bias "none": no bias became trainable (SmolLM2 has no biases at all)
    assert not any(n.endswith(".bias") for n in trainable)


@pytest.mark.timeout(60)
def test_lora_uses_configured_rank_alpha_dropout_targets(embedded_model_path):
    model = create_model(
        _cfg(lora_rank=8, lora_alpha=16, lora_dropout=0.05, lora_target_modules=["q_proj", "v_proj"])
    )
    peft_cfg = model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout, peft_cfg.bias) == (8, 16, 0.05, "none")
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert tuple(q.lora_A["default"].weight.shape) == (8, 576)
    assert tuple(q.lora_B["default"].weight.shape) == (576, 8)
    assert q.scaling["default"] == 2.0  # alpha / r
    assert q.lora_dropout["default"].p == 0.05
    assert torch.count_nonzero(q.lora_B["default"].weight) == 0  # B starts at zero: no change at step 0
    k = model.get_base_model().model.layers[0].self_attn.k_proj
    assert isinstance(k, torch.nn.Linear) and not hasattr(k, "lora_A")
    config = AutoConfig.from_pretrained(embedded_model_path)
    kv = config.num_key_value_heads * config.head_dim
    assert parameter_stats(model).trainable == config.num_hidden_layers * 8 * ((576 + 576) + (576 + kv))


@pytest.mark.timeout(60)
def test_full_finetuning_trains_everything(embedded_model_path, caplog):
    caplog.set_level(logging.INFO, logger="ftpipe")
    model = create_model(_cfg(finetuning="full"))
    assert all(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_parameters())
    stats = parameter_stats(model)
    assert stats.trainable == stats.total == stats.base == 134_515_008
    assert "trainable params: 134,515,008 || all params: 134,515,008 || trainable%: 100.0000" in caplog.text


@pytest.mark.timeout(30)
def test_unknown_lora_target_is_a_clear_error():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(4, 4))
    cfg = PipelineConfig.from_flat({"lora_target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(LoraTargetError, match=r"lora_target_modules: \['qkv_proj'\] not found in Sequential"):
        apply_lora(model, cfg)


def test_parameter_stats_exact_numbers_and_shared_weights_once():
    emb = torch.nn.Embedding(10, 4)  # 40
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: counted once
    frozen = torch.nn.Linear(4, 3)  # 15
    frozen.requires_grad_(False)
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "frozen": frozen})
    stats = parameter_stats(model)
    assert stats == ParamStats(total=55, trainable=40, base=55)
    assert stats.frozen == 15
    assert str(stats) == "trainable params: 40 || all params: 55 || trainable%: 72.7273"


def test_parameter_stats_base_excludes_adapters():
    model = torch.nn.Module()
    model.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 2, bias=False)})  # 8 adapter params
    model.base = torch.nn.Linear(4, 4, bias=False)  # 16
    model.base.requires_grad_(False)
    stats = parameter_stats(model)
    assert (stats.total, stats.trainable, stats.base, stats.adapter) == (24, 8, 16, 8)
