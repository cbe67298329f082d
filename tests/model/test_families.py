"""The model-family table: tiny random models of 14 families (3 of them mixture-of-experts), each trained 2
steps with FSDP2 on 2 real processes (gloo), exported merged, reloaded with plain transformers and estimated.

The default LoRA targets are used everywhere (they adapt to each family); two MoE entries also adapt their
experts (``lora_target_experts``, with ``lora_dropout`` at its default: PEFT allows none on the experts, so
ftpipe keeps it on the linear adapters only). All families train in the same two torchrun processes, one
after the other (``families_main.py``), on one shared data set: the table costs one start-up, not 14.

Checked per family: 2 optimizer steps; every LoRA B matrix moved off zero (the experts' too where adapted);
the merged export's logits equal the adapter model's (atol 1e-4, fp32: the merge reorders a sum) while the
adapter changes the logits by far more; the estimate's trainable parameters equal the elements of the
checkpoint's LoRA tensors exactly; MoE entries are estimated as MoE (active < total parameters).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
MERGE_ATOL = 1e-4
SIZE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
GQA = dict(num_key_value_heads=2)
#: name -> (config class, its arguments, ftpipe overrides, mixture of experts)
FAMILIES: dict[str, tuple[str, dict, dict, bool]] = {
    "llama": ("LlamaConfig", {**SIZE, **GQA}, {}, False),
    "qwen2": ("Qwen2Config", {**SIZE, **GQA}, {}, False),
    "qwen3": ("Qwen3Config", {**SIZE, **GQA, "head_dim": 16}, {}, False),
    "mistral": ("MistralConfig", {**SIZE, **GQA}, {}, False),
    "phi3": ("Phi3Config", {**SIZE, **GQA}, {}, False),
    "gemma2": ("Gemma2Config", {**SIZE, **GQA, "head_dim": 16}, {}, False),
    "gpt_neox": ("GPTNeoXConfig", SIZE, {}, False),
    "olmo2": ("Olmo2Config", {**SIZE, **GQA}, {}, False),
    "granite": ("GraniteConfig", {**SIZE, **GQA}, {}, False),
    "falcon": (
        "FalconConfig",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
        {},
        False,
    ),
    "starcoder2": ("Starcoder2Config", {**SIZE, **GQA}, {}, False),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            **SIZE,
            **GQA,
            "head_dim": 16,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
        },
        {"lora_target_experts": True},
        True,
    ),
    "mixtral": ("MixtralConfig", {**SIZE, **GQA, "num_local_experts": 4, "num_experts_per_tok": 2}, {}, True),
    "gpt_oss": (
        "GptOssConfig",
        {**SIZE, **GQA, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2},
        {"lora_target_experts": True},
        True,
    ),
}


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now (one process group per family)."""
    import socket

    for first in range(29600, 40000, count + 1):
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError("no free ports")


def _make_models(root: Path, tokenizer) -> dict[str, str]:
    import transformers

    folders = {}
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
        "max_position_embeddings": 256,
    }
    for name, (config_class, kwargs, _, _) in FAMILIES.items():
        config = getattr(transformers, config_class)(**kwargs, **special)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        folder = root / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tokenizer, alpaca_demo) -> dict[str, dict]:
    """Every family trained, exported and estimated: ``{name: what families_main.py recorded}``."""
    root = tmp_path_factory.mktemp("families")
    folders = _make_models(root / "models", tokenizer)
    out = root / "runs"
    out.mkdir()
    spec = {
        "out": str(out),
        "first_port": _free_ports(len(FAMILIES)),
        "common": {
            "dataset": str(alpaca_demo),
            "data_dir": str(root / "data"),
            "max_samples": 16,
            "train_ratio": 0.75,
            "val_ratio": 0.125,
            "test_ratio": 0.125,
            "max_seq_length": 64,
            "micro_batch_size": 2,
            "max_steps": 2,
            "warmup_steps": 0,
            "learning_rate": 1e-2,
            "val_check_interval": 2,
            "lora_rank": 4,
            "lora_alpha": 8,
            "precision": "32-true",
            "strategy": "fsdp2",
            "accelerator": "cpu",
            "gpus_per_node": 2,
            "num_workers": 0,
            "export_dtype": "float32",
            "early_stopping_patience": 0,
        },
        "families": [
            {"name": name, "folder": folders[name], "overrides": overrides}
            for name, (_, _, overrides, _) in FAMILIES.items()
        ],
    }
    plan = root / "plan.json"
    plan.write_text(json.dumps(spec))
    log_path = root / "families.log"
    with open(log_path, "w") as log:
        code = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                str(Path(__file__).with_name("families_main.py")),
                str(plan),
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=900,
        ).returncode
    records = {}
    for name in FAMILIES:
        found = sorted(out.glob(f"{name}.rank*.json"))
        records[name] = {k: v for f in found for k, v in json.loads(f.read_text()).items()}
    assert code == 0 or any("error" in r for r in records.values()), log_path.read_text()[-6000:]
    return records


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_exports_reloads_and_estimates(family_runs, name):
    record = family_runs[name]
    assert record, f"{name}: no record written"
    assert "error" not in record, record["error"]
    assert record["steps"] == 2
    assert record["lora_b_max"] > 0, "the adapters did not train"
    assert record["adapter_vs_base"] > 100 * MERGE_ATOL, "the trained adapter does not change the logits"
    assert record["merged_vs_adapter"] < MERGE_ATOL
    assert record["estimate_trainable"] == record["lora_elements"]
    _, _, overrides, moe = FAMILIES[name]
    if moe:
        assert record["estimate_experts"] == 4
        assert record["estimate_active"] < record["estimate_total"]
    else:
        assert record["estimate_experts"] == 0
        assert record["estimate_active"] == record["estimate_total"]
    if overrides.get("lora_target_experts"):
        assert record["expert_lora_b_max"] and record["expert_lora_b_max"] > 0, (
            "the experts' adapters did not train"
        )
    else:
        assert record["expert_lora_b_max"] is None
