"""LoRA targets that adapt to the model's family, and mixture-of-experts models: adapters on their experts,
PEFT's dropout rule, the merge of expert adapters, and the estimate's total vs active parameters.

Tiny random models built from configurations (no download); the estimate's counts are checked against
hand calculations from the configuration's sizes.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from ftpipe.config import PipelineConfig
from ftpipe.model.dropout import LoraDropout
from ftpipe.model.lora import LoraTargetError, apply_lora, resolve_targets
from ftpipe.model.moe import UnknownMoeLayout, expert_target_parameters, experts_modules

SPECIAL = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, **SPECIAL)
H, E, K, I_EXPERT, LAYERS = 64, 4, 2, 32, 2
MOE = dict(
    **SIZE,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=I_EXPERT,
    num_experts=E,
    num_experts_per_tok=K,
)


def _model(config_class: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs))


def _cfg(**flat) -> PipelineConfig:
    return PipelineConfig.from_flat({"lora_rank": 4, **flat})


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("config_class", "kwargs", "expected", "how"),
    [
        (
            "LlamaConfig",
            SIZE,
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "default",
        ),
        ("Phi3Config", SIZE, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "linear layers"),
        (
            "GPTNeoXConfig",
            SIZE,
            ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
            "linear layers",
        ),
        (
            "FalconConfig",
            SPECIAL | dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
            ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
            "linear layers",
        ),
        (
            "GPT2Config",
            SPECIAL | dict(n_embd=64, n_layer=2, n_head=4),
            ["c_attn", "c_proj", "c_fc"],
            "linear layers",
        ),
        ("Qwen3MoeConfig", MOE, ["q_proj", "k_proj", "v_proj", "o_proj"], "experts are not adapted"),
    ],
)
def test_default_targets_adapt_to_the_family(config_class, kwargs, expected, how, caplog):
    model = _model(config_class, **kwargs)
    targets = resolve_targets(model, _cfg())
    assert sorted(targets.modules) == sorted(expected)
    assert how in targets.how
    with caplog.at_level(logging.INFO, logger="ftpipe.model.lora"):
        peft_model = apply_lora(model, _cfg())
    assert any(", ".join(targets.modules) in r.getMessage() for r in caplog.records)  # the choice is logged
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(expected)


@pytest.mark.timeout(60)
def test_named_targets_must_exist_and_experts_need_experts():
    with pytest.raises(LoraTargetError, match=r"\['wq'\] not found in GPTNeoXForCausalLM.*query_key_value"):
        resolve_targets(_model("GPTNeoXConfig", **SIZE), _cfg(lora_target_modules=["wq", "dense"]))
    with pytest.raises(LoraTargetError, match="lora_target_experts: LlamaForCausalLM has no stacked experts"):
        resolve_targets(_model("LlamaConfig", **SIZE), _cfg(lora_target_experts=True))
    with pytest.raises(LoraTargetError, match="use_dora: PEFT has no DoRA for expert weights"):
        apply_lora(_model("Qwen3MoeConfig", **MOE), _cfg(lora_target_experts=True, use_dora=True))


def _dropouts(peft_model) -> dict[str, object]:
    from peft.tuners.lora.layer import ParamWrapper

    return {
        ("expert" if isinstance(m, ParamWrapper) else "linear") + ":" + n: m.lora_dropout["default"]
        for n, m in peft_model.named_modules()
        if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flat", [{"lora_target_experts": True}, {"lora_target_modules": ["all-linear"]}])
def test_expert_adapters_train_with_dropout_on_the_linear_adapters_only(flat):
    """PEFT refuses dropout on parameter adapters: ftpipe builds them without and keeps lora_dropout 0.1 on
    the linear layers' adapters (``all-linear`` adapts the experts too, and once crashed here)."""
    model = apply_lora(_model("Qwen3MoeConfig", **MOE), _cfg(lora_dropout=0.1, **flat))
    drops = _dropouts(model)
    experts = [d for k, d in drops.items() if k.startswith("expert:")]
    linears = [d for k, d in drops.items() if k.startswith("linear:")]
    # gate_up_proj and down_proj per layer (PEFT's all-linear adapts the router's weight too)
    assert len(experts) == (3 if flat.get("lora_target_modules") else 2) * LAYERS
    assert all(isinstance(d, torch.nn.Identity) for d in experts)
    assert linears and all(isinstance(d, LoraDropout) and d.p == 0.1 for d in linears)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and ".experts." in n]
    assert trained  # the experts' adapters are trainable parameters
    model.train()
    loss = model(input_ids=torch.randint(3, 128, (2, 12)), labels=torch.randint(3, 128, (2, 12))).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    # B starts at 0 (A's gradient is then 0): the experts' B matrices receive gradient
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.timeout(60)
def test_merged_expert_adapters_give_the_adapter_models_logits():
    model = apply_lora(
        _model("Qwen3MoeConfig", **MOE), _cfg(lora_target_experts=True, lora_dropout=0.0)
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        ids = torch.randint(3, 128, (2, 10))
        adapted = model(input_ids=ids).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-2  # the adapters change the output
    assert (merged - adapted).abs().max() < 1e-4
    assert base is not None


@pytest.mark.timeout(60)
def test_experts_found_and_targeted_by_their_path():
    model = _model("MixtralConfig", **SIZE, num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=K)
    found = experts_modules(model)
    assert [e.name for e in found] == [f"model.layers.{i}.mlp.experts" for i in range(LAYERS)]
    assert all(e.num_experts == E for e in found)
    assert expert_target_parameters(model) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _shape(tmp_path, flat: dict, **config):
    from ftpipe.estimate.shape import model_shape

    folder = tmp_path / "model"
    transformers.Qwen3MoeConfig(**config).save_pretrained(folder)
    return model_shape(PipelineConfig.from_flat({"hf_model_id": str(folder), "lora_rank": 4, **flat}))


@pytest.mark.timeout(60)
def test_estimate_counts_total_active_expert_and_router_parameters(tmp_path):
    shape = _shape(tmp_path, {}, **MOE)
    experts_per_layer = E * (2 * I_EXPERT * H + H * I_EXPERT)  # stacked gate_up and down projections
    router_per_layer = E * H
    assert shape.num_experts == E and shape.experts_per_token == K
    assert shape.expert_intermediate_size == I_EXPERT
    assert shape.expert_params == LAYERS * experts_per_layer
    assert shape.router_params == LAYERS * router_per_layer
    assert shape.active_params == shape.total_params - LAYERS * experts_per_layer * (E - K) // E
    real = _model("Qwen3MoeConfig", **MOE)
    assert shape.base_params == sum(p.numel() for p in real.parameters())
    # LoRA r=4 on q, k, v, o only (the default on this family): r x (in + out) each
    q, kv = 4 * 16, 2 * 16
    attention = 4 * ((H + q) + (H + kv) + (H + kv) + (q + H))
    assert shape.trainable_params == LAYERS * attention
    assert not shape.experts_adapted

    adapted = _shape(tmp_path, {"lora_target_experts": True, "lora_dropout": 0.0}, **MOE)
    per_expert = 4 * ((H + 2 * I_EXPERT) + (I_EXPERT + H))  # r x (in + out) for gate_up and down
    assert adapted.trainable_params == LAYERS * (attention + E * per_expert)
    assert adapted.experts_adapted and adapted.layer_expert_elements == experts_per_layer


@pytest.mark.timeout(60)
def test_estimate_moe_activations_follow_the_routed_experts(tmp_path):
    from ftpipe.estimate.activations import activation_bytes

    shape = _shape(tmp_path, {"lora_dropout": 0.0}, **MOE)
    common = dict(
        micro_batch_size=1, seq_len=8, compute_bytes=4, attn="sdpa", device="cpu", loss_chunk_size=0
    )
    base = activation_bytes(shape, **common)
    more = activation_bytes(type(shape)(**{**shape.__dict__, "experts_per_token": K + 1}), **common)
    # one more routed expert: its gate and up outputs (activation recomputed) and the token's copy, per token
    assert more.layer - base.layer == 8 * (2 * I_EXPERT + H) * 4
    adapted = _shape(tmp_path, {"lora_target_experts": True, "lora_dropout": 0.0}, **MOE)
    with_experts = activation_bytes(adapted, **common)
    # the adapted expert weights, materialised and kept per layer (fp32 here), and their gradient in the
    # layer's backward pass
    kept = adapted.layer_expert_elements * 4
    assert with_experts.lora - base.lora == kept
    assert with_experts.layer - base.layer == kept
    assert with_experts.backward_transient - base.backward_transient == kept


@pytest.mark.timeout(60)
def test_experts_as_a_module_list_are_refused_by_the_estimate():
    from ftpipe.estimate.shape import _experts

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList(Block() for _ in range(2))
    with pytest.raises(
        UnknownMoeLayout, match=r"keeps its experts as a list of modules.*activation_checkpointing"
    ):
        _experts(model, transformers.LlamaConfig(), model.layers[0], 2, 2)
