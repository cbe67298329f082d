"""Decoder layers found from the model itself (four families, PEFT-wrapped), and FSDP2 wrapping them."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from ftpipe.config import PipelineConfig
from ftpipe.distributed import (
    DecoderLayerNotFoundError,
    apply_activation_checkpointing,
    discover_decoder_layer_classes,
    find_decoder_layer_classes,
    shard_model,
)
from ftpipe.model.lora import apply_lora

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
#: config class -> (decoder layer class name, LoRA targets that exist in the family)
FAMILIES = {
    "Qwen3Config": ("Qwen3DecoderLayer", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "LlamaConfig": ("LlamaDecoderLayer", ["q_proj", "v_proj", "down_proj"]),
    "MistralConfig": ("MistralDecoderLayer", ["q_proj", "v_proj", "down_proj"]),
    "Phi3Config": ("Phi3DecoderLayer", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
}


def tiny_lora_model(config_name: str) -> torch.nn.Module:
    """A 2-layer randomly initialised model of one family (no download), PEFT-LoRA wrapped."""
    config = getattr(transformers, config_name)(**TINY)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    cfg = PipelineConfig.from_flat({"lora_rank": 4, "lora_target_modules": FAMILIES[config_name][1]})
    return apply_lora(model, cfg)


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    """A real 1-process gloo group (world size 1) and its 1-D data-parallel mesh."""
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config_name", sorted(FAMILIES))
def test_decoder_layer_found_through_peft(config_name):
    model = tiny_lora_model(config_name)
    assert type(model).__name__ == "PeftModelForCausalLM"
    classes = find_decoder_layer_classes(model)
    assert [c.__name__ for c in classes] == [FAMILIES[config_name][0]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config_name", sorted(FAMILIES))
def test_fsdp2_wraps_exactly_decoder_layers_and_root(config_name, one_process_group):
    model = tiny_lora_model(config_name)
    classes = find_decoder_layer_classes(model)
    apply_activation_checkpointing(model, classes)
    sharded = shard_model(model, one_process_group, classes)
    fsdp_modules = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    layer_prefix = "base_model.model.model.layers"
    assert fsdp_modules == [
        "",
        f"{layer_prefix}.0._checkpoint_wrapped_module",
        f"{layer_prefix}.1._checkpoint_wrapped_module",
    ]
    assert len(sharded) == 3 and sharded[-1] is model
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    # the wrapped model still runs forward and backward
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.timeout(30)
def test_override_by_class_name():
    model = tiny_lora_model("LlamaConfig")
    assert [c.__name__ for c in find_decoder_layer_classes(model, override="LlamaMLP")] == ["LlamaMLP"]
    with pytest.raises(
        DecoderLayerNotFoundError, match=r"decoder_layer_cls: 'NoSuchLayer' is not a module class"
    ):
        find_decoder_layer_classes(model, override="NoSuchLayer")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)


class _Custom(torch.nn.Module):
    """A model whose _no_split_modules names nothing present, but with repeated blocks."""

    _no_split_modules = ("GoneLayer",)

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.blocks = torch.nn.ModuleList([_Block() for _ in range(3)])


@pytest.mark.timeout(30)
def test_fallback_to_most_repeated_block():
    assert find_decoder_layer_classes(_Custom()) == {_Block}


@pytest.mark.timeout(30)
def test_nothing_matched_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(DecoderLayerNotFoundError) as err:
        find_decoder_layer_classes(model)
    message = str(err.value)
    assert "cannot find the decoder layer class of Sequential" in message
    assert "_no_split_modules" in message and "ModuleList" in message
    assert "Set decoder_layer_cls" in message and "Linear" in message


@pytest.mark.timeout(60)
def test_discover_embedded_on_meta(embedded_model_path):
    cfg = PipelineConfig.from_flat({"hf_model_id": "embedded"})
    classes = discover_decoder_layer_classes(cfg)
    assert [c.__name__ for c in classes] == ["LlamaDecoderLayer"]
    assert classes == {transformers.models.llama.modeling_llama.LlamaDecoderLayer}
