"""Every recipe in configs/ parses through the CLI and validates; the Qwen3-8B recipe keeps the original design."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from ftpipe.cli.main import build_parser, parse
from ftpipe.model.lora import apply_lora

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))

#: recipe -> the configuration class of its model family (for a tiny stand-in of the architecture)
FAMILY = {
    "qwen3-8b-lora-fsdp.yaml": "Qwen3Config",
    "llama-3.1-8b-lora.yaml": "LlamaConfig",
    "mistral-7b-lora.yaml": "MistralConfig",
    "phi-3-mini-lora.yaml": "Phi3Config",
}


@pytest.fixture(scope="module")
def cli_parser():
    """The ``ftpipe`` parser, built once for this module's parsing tests."""
    return build_parser()


def test_the_recipes_are_there():
    assert set(FAMILY) <= {p.name for p in RECIPES}
    assert "demo.yaml" in {p.name for p in RECIPES}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_validates(path, cli_parser):
    command, cfg = parse(["prepare", "--config", str(path)], parser=cli_parser)
    assert command == "prepare"
    assert cfg.model.hf_model_id  # validated (parse raises ConfigError otherwise)


@pytest.mark.timeout(60)
def test_qwen3_recipe_keeps_the_original_design(cli_parser):
    _, cfg = parse(["prepare", "--config", str(CONFIGS / "qwen3-8b-lora-fsdp.yaml")], parser=cli_parser)
    m, lo, d, t, ds = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.dist
    assert (m.hf_model_id, m.finetuning, m.precision, m.trust_remote_code) == (
        "Qwen/Qwen3-8B",
        "lora",
        "bf16-mixed",
        False,
    )
    assert (lo.lora_rank, lo.lora_alpha, lo.lora_dropout) == (32, 32, 0.1)
    assert lo.lora_target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert (d.dataset, d.dataset_subset, d.max_seq_length) == (
        "cognitivecomputations/dolphin",
        "flan1m-alpaca-uncensored",
        2048,
    )
    assert (d.train_ratio, d.val_ratio, d.test_ratio) == (0.90, 0.05, 0.05)
    assert (t.num_nodes, t.gpus_per_node, t.micro_batch_size, t.accumulate_grad_batches) == (1, 8, 2, 4)
    assert (t.max_steps, t.learning_rate, t.warmup_steps, t.min_lr) == (10000, 1e-5, 100, 1e-7)
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.gradient_clip_val) == (0.9, 0.95, 0.01, 1.0)
    assert (t.val_check_interval, t.early_stopping_patience, t.early_stopping_min_delta, t.seed) == (
        100,
        3,
        0.001,
        42,
    )
    assert (ds.strategy, ds.sharding_strategy) == ("fsdp1", "FULL_SHARD")
    assert (ds.activation_checkpointing, ds.fsdp_mixed_precision, ds.cpu_offload) == (True, True, False)
    assert (ds.limit_all_gathers, ds.sync_module_states, ds.use_orig_params) == (True, True, True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recipe", sorted(FAMILY))
def test_recipe_lora_targets_exist_in_its_architecture(recipe, cli_parser):
    """A tiny random model of the recipe's family (no download) takes the recipe's LoRA targets."""
    _, cfg = parse(["prepare", "--config", str(CONFIGS / recipe)], parser=cli_parser)
    config = getattr(transformers, FAMILY[recipe])(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    peft_model = apply_lora(model, cfg)  # raises LoraTargetError for a target the family lacks
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A." in n
    }
    assert adapted == set(cfg.lora.lora_target_modules)
