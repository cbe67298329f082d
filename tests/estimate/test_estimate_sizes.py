"""The estimate never assumes a model's size: a config.json that leaves one out is one message naming the
file and the key (under the name its model type uses), not a 4096-wide default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftpipe.config import PipelineConfig
from ftpipe.estimate.shape import ModelSizeUnknown, model_shape


def _folder(tmp_path: Path, config: dict, drop: tuple[str, ...] = ()) -> Path:
    folder = tmp_path / "m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))
    return folder


def _llama(tiny_llama: Path) -> dict:
    return json.loads((tiny_llama / "config.json").read_text())


def _gpt2() -> dict:
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0
    ).to_dict()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "key", ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"]
)
def test_a_llama_config_without_a_size_names_the_file_and_the_key(tmp_path, tiny_llama, key):
    folder = _folder(tmp_path, _llama(tiny_llama), drop=(key,))
    with pytest.raises(ModelSizeUnknown) as err:
        model_shape(PipelineConfig().replace(hf_model_id=str(folder)))
    message = str(err.value)
    assert message.startswith(f"hf_model_id: {folder / 'config.json'} does not give {key} (model type llama)")
    assert "add the key(s) to config.json" in message


@pytest.mark.timeout(120)
def test_a_config_with_every_size_is_counted_exactly(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    shape = model_shape(PipelineConfig().replace(hf_model_id=str(tiny_llama), finetuning="full"))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert shape.total_params == sum(p.numel() for p in model.parameters())
    assert shape.hidden_size == 64


@pytest.mark.timeout(120)
def test_the_model_types_own_names_count(tmp_path):
    """GPT-2 names the width ``n_embd`` (its configuration class's attribute_map)."""
    gpt2 = _gpt2()
    cfg = PipelineConfig().replace(lora_target_modules=["c_attn"])
    shape = model_shape(cfg.replace(hf_model_id=str(_folder(tmp_path / "a", gpt2))))
    assert (shape.hidden_size, shape.num_layers, shape.num_heads) == (32, 2, 2)
    with pytest.raises(ModelSizeUnknown, match=r"does not give hidden_size / n_embd \(model type gpt2\)"):
        model_shape(cfg.replace(hf_model_id=str(_folder(tmp_path / "b", gpt2, drop=("n_embd",)))))
