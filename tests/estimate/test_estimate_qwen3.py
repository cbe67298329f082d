"""``ftpipe estimate`` for Qwen3-8B with LoRA from its public config.json alone (no weights, offline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.cli.main import parse
from ftpipe.errors import FtpipeError
from ftpipe.estimate import MemoryEstimate, estimate
from ftpipe.estimate.memory import GIB

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE = REPO_ROOT / "configs" / "qwen3-8b-lora-fsdp.yaml"

#: Qwen/Qwen3-8B's config.json as published on the hub.
QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

HIDDEN, INTER, LAYERS, VOCAB, HEAD_DIM = 4096, 12288, 36, 151936, 128
Q, KV = 32 * HEAD_DIM, 8 * HEAD_DIM
#: Qwen3-8B's parameters by hand: per layer q, k, v, o, gate, up, down, two RMSNorms, q_norm and k_norm;
#: untied input and output embeddings; the final norm.
LAYER_PARAMS = HIDDEN * Q + 2 * HIDDEN * KV + Q * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN + 2 * HEAD_DIM
BASE_PARAMS = LAYERS * LAYER_PARAMS + 2 * VOCAB * HIDDEN + HIDDEN
#: LoRA r=32 on the seven projections: r x (in + out) each.
ADAPTER_PARAMS = LAYERS * 32 * ((HIDDEN + Q) * 2 + 2 * (HIDDEN + KV) + 3 * (HIDDEN + INTER))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("Qwen3-8B")
    (folder / "config.json").write_text(json.dumps(QWEN3_8B_CONFIG), encoding="utf-8")
    return folder


def _estimate(qwen3_dir: Path, *args: str) -> MemoryEstimate:
    _, cfg = parse(["estimate", "--config", str(RECIPE), "--hf_model_id", str(qwen3_dir), *args])
    return estimate(cfg)


@pytest.mark.timeout(120)
def test_qwen3_8b_lora_on_8_x_80gib_fits(qwen3_dir, capsys):
    est = _estimate(qwen3_dir, "--gpu_memory_gib", "80", "--precision", "bf16-true")
    s = est.shape
    assert BASE_PARAMS == 8_190_735_360  # the published figure, about 8.19e9
    assert (s.base_params, s.adapter_params, s.trainable_params) == (
        BASE_PARAMS,
        ADAPTER_PARAMS,
        ADAPTER_PARAMS,
    )
    assert (s.num_layers, s.layer_class, s.vocab_size) == (36, "Qwen3DecoderLayer", VOCAB)
    assert s.layer_params == LAYER_PARAMS + ADAPTER_PARAMS // LAYERS
    assert s.root_params == 2 * VOCAB * HIDDEN + HIDDEN
    # FSDP1 FULL_SHARD over 8 GPUs, bf16 weights: params x 2 bytes / 8
    assert est.layout.shard_size == 8 and est.target.precision == "bf16-true"
    assert est.weights == BASE_PARAMS * 2 // 8
    assert est.lora_weights == ADAPTER_PARAMS * 2 // 8
    assert est.gradients == ADAPTER_PARAMS * 2 // 8
    assert est.optimizer_state == 2 * ADAPTER_PARAMS * 2 // 8
    # unsharded bf16: two decoder layers + the root unit (embeddings, norm, head) + one layer's LoRA gradients
    assert est.fsdp_buffers == (2 * s.layer_params + s.root_params + ADAPTER_PARAMS // LAYERS) * 2
    # checkpointing keeps every layer's input: 36 x (2 x 2048 tokens) x 4096 x 2 bytes
    acts = est.activations
    assert acts.checkpoint_inputs == LAYERS * 2 * 2048 * HIDDEN * 2
    assert est.activation_checkpointing and acts.with_checkpointing < acts.without_checkpointing / 5
    parts = est.weights + est.lora_weights + est.gradients + est.optimizer_state + est.fsdp_buffers
    assert est.total == parts + acts.with_checkpointing + est.overhead
    assert est.overhead == 1 * GIB  # CUDA context + NCCL allowance
    assert 8 * GIB < est.total < 20 * GIB
    assert est.fits is True and est.device_memory == 80 * GIB and not est.advice
    out = capsys.readouterr().out
    assert "Qwen3ForCausalLM" in out and "FULL_SHARD" in out and "fits:" in out


@pytest.mark.timeout(120)
def test_bf16_mixed_keeps_fp32_master_weights(qwen3_dir):
    est = _estimate(qwen3_dir, "--gpu_memory_gib", "80")  # the recipe's bf16-mixed
    assert est.target.precision == "bf16-mixed"
    assert est.weights == BASE_PARAMS * 4 // 8
    assert est.optimizer_state == 2 * ADAPTER_PARAMS * 4 // 8
    # FSDP's mixed precision all-gathers in bf16
    assert (
        est.fsdp_buffers
        == (2 * est.shape.layer_params + est.shape.root_params + ADAPTER_PARAMS // LAYERS) * 2
    )


@pytest.mark.timeout(120)
def test_sharding_strategies_and_attention(qwen3_dir):
    full = _estimate(qwen3_dir, "--gpu_memory_gib", "80")
    hybrid = _estimate(
        qwen3_dir, "--gpu_memory_gib", "80", "--num_nodes", "2", "--sharding_strategy", "HYBRID_SHARD"
    )
    no_shard = _estimate(qwen3_dir, "--gpu_memory_gib", "80", "--sharding_strategy", "NO_SHARD")
    grad_op = _estimate(qwen3_dir, "--gpu_memory_gib", "80", "--sharding_strategy", "SHARD_GRAD_OP")
    assert hybrid.layout.shard_size == 8 and hybrid.weights == full.weights  # sharded within a node
    # replicated fp32 master weights, and FSDP's full bf16 copy for the forward and backward passes
    assert no_shard.weights == BASE_PARAMS * 4 and no_shard.fsdp_buffers == no_shard.shape.total_params * 2
    assert grad_op.weights == full.weights and grad_op.fsdp_buffers > BASE_PARAMS * 2  # every unit unsharded
    offload = _estimate(qwen3_dir, "--gpu_memory_gib", "80", "--cpu_offload")
    assert offload.weights == 0 and offload.optimizer_state == 0
    assert offload.host_offloaded == full.weights + full.lora_weights + full.gradients + full.optimizer_state
    eager = _estimate(
        qwen3_dir, "--gpu_memory_gib", "80", "--attn_implementation", "eager", "--no_activation_checkpointing"
    )
    sdpa = _estimate(
        qwen3_dir, "--gpu_memory_gib", "80", "--attn_implementation", "sdpa", "--no_activation_checkpointing"
    )
    # eager keeps the softmax probabilities: at least heads x seq^2 fp32 per sequence and layer
    s2 = LAYERS * 2 * 32 * 2048 * 2048 * 4
    assert eager.activations.without_checkpointing - sdpa.activations.without_checkpointing >= s2
    chunk0 = _estimate(qwen3_dir, "--gpu_memory_gib", "80", "--loss_chunk_size", "0")
    assert chunk0.activations.loss > 2 * 2048 * VOCAB * 4 * 3  # full B x T x vocab fp32 logits and gradients
    assert full.activations.loss < chunk0.activations.loss / 3


@pytest.mark.timeout(120)
def test_one_24gib_gpu_does_not_fit_and_says_what_would(qwen3_dir, capsys):
    est = _estimate(qwen3_dir, "--gpus_per_node", "1", "--gpu_memory_gib", "24")
    assert est.fits is False
    assert est.weights == BASE_PARAMS * 4  # fp32 master weights on one GPU: 30.5 GiB alone
    tips = "\n".join(est.advice)
    assert "cpu_offload: true" in tips and "gpus_per_node: " in tips
    gpus = next(t for t in est.advice if t.startswith("gpus_per_node: "))
    n = int(gpus.split()[1])
    assert 2 <= n <= 8 and f"({n} GPUs)" in gpus
    assert _estimate(qwen3_dir, "--gpus_per_node", str(n), "--gpu_memory_gib", "24").fits is True
    assert _estimate(qwen3_dir, "--gpus_per_node", str(n - 1), "--gpu_memory_gib", "24").fits is False
    out = capsys.readouterr().out
    assert "does not fit" in out and "What would make it fit" in out and "cpu_offload" in out


@pytest.mark.timeout(60)
def test_offline_hub_id_says_to_pass_a_folder_with_config_json(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, cfg = parse(["estimate", "--config", str(RECIPE), "--hf_model_id", "ftpipe-test/no-such-model-7"])
    with pytest.raises(FtpipeError) as err:
        estimate(cfg)
    message = str(err.value)
    assert "hf_model_id" in message and "config.json" in message and "--hf_model_id" in message


@pytest.mark.timeout(120)
def test_cli_prints_the_table(qwen3_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftpipe",
            "estimate",
            "--config",
            str(RECIPE),
            "--hf_model_id",
            str(qwen3_dir),
            "--gpu_memory_gib",
            "80",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for text in (
        "Memory per GPU",
        "base weights",
        "LoRA weights",
        "gradients",
        "optimizer state",
        "FSDP",
        "checkpointing on (counted)",
        "checkpointing off (not counted)",
        "framework overhead",
        "total",
        "fits:",
    ):
        assert text in out, f"{text!r} not in:\n{out}"
    assert "8.19 B params" in out
