"""Lightning strategies from the configuration, the CPU FSDP1 adaptation, and real FSDP2 loading on 2 ranks."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from torch.distributed.fsdp import (
    BackwardPrefetch,
    FullyShardedDataParallel,
    MixedPrecision,
    ShardingStrategy,
)

from ftpipe.config import ConfigError, PipelineConfig
from ftpipe.distributed import CPUFSDPStrategy, MaterializeMeta, build_strategy
from ftpipe.runtime import accelerator_name

LLAMA = transformers.models.llama.modeling_llama.LlamaDecoderLayer


def _cfg(**flat) -> PipelineConfig:
    return PipelineConfig.from_flat({"process_group_timeout_s": 123.0, **flat})


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def bf16_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


# ---------------------------------------------------------------------------- settings


def test_accelerator_name(no_cuda, monkeypatch):
    assert accelerator_name(_cfg()) == "cpu"
    with pytest.raises(ConfigError, match=r"accelerator: 'cuda' but no CUDA device"):
        accelerator_name(_cfg(accelerator="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert accelerator_name(_cfg()) == "cuda"
    assert accelerator_name(_cfg(accelerator="cpu")) == "cpu"


def test_fsdp2_is_model_parallel_over_every_process(no_cuda):
    strategy = build_strategy(_cfg(strategy="fsdp2", num_nodes=2, gpus_per_node=8), set())
    assert type(strategy) is ModelParallelStrategy
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (16, 1)
    assert strategy._save_distributed_checkpoint is True
    assert strategy._timeout == timedelta(seconds=123)
    assert strategy.process_group_backend == "gloo"


def test_fsdp2_uses_nccl_on_gpus(bf16_gpu):
    assert build_strategy(_cfg(strategy="fsdp2"), set()).process_group_backend == "nccl"


@pytest.mark.parametrize("sharding", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"])
def test_fsdp1_on_cpu_settings(no_cuda, sharding):
    cfg = _cfg(strategy="fsdp1", sharding_strategy=sharding, precision="32-true")
    strategy = build_strategy(cfg, {LLAMA})
    assert type(strategy) is CPUFSDPStrategy
    assert strategy.sharding_strategy == ShardingStrategy[sharding]
    kw = strategy.kwargs
    assert kw["backward_prefetch"] == BackwardPrefetch.BACKWARD_PRE
    assert (kw["limit_all_gathers"], kw["use_orig_params"]) == (True, True)
    assert kw["sync_module_states"] is False  # torch broadcasts module states from GPU tensors only
    assert "param_init_fn" not in kw
    assert kw["auto_wrap_policy"]._module_classes == {LLAMA}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LLAMA}
    assert strategy._state_dict_type == "sharded"
    assert strategy.cpu_offload.offload_params is False
    assert strategy.mixed_precision is None  # fp32
    assert strategy._timeout == timedelta(seconds=123)
    assert strategy.process_group_backend == "gloo"


def test_fsdp1_on_gpus_original_design(bf16_gpu):
    cfg = _cfg(strategy="fsdp1", precision="bf16-mixed", cpu_offload=True)
    strategy = build_strategy(cfg, {LLAMA})
    assert type(strategy) is FSDPStrategy  # the unmodified strategy on CUDA
    bf16 = torch.bfloat16
    assert strategy.mixed_precision == MixedPrecision(
        param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16, cast_forward_inputs=True
    )
    assert strategy.cpu_offload.offload_params is True
    assert strategy.kwargs["sync_module_states"] is True
    assert isinstance(strategy.kwargs["param_init_fn"], MaterializeMeta)
    assert strategy.process_group_backend == "nccl"


def test_fsdp1_options_follow_the_config(bf16_gpu):
    cfg = _cfg(
        strategy="fsdp1",
        precision="bf16-mixed",
        fsdp_mixed_precision=False,
        activation_checkpointing=False,
        limit_all_gathers=False,
        sync_module_states=False,
    )
    strategy = build_strategy(cfg, {LLAMA})
    assert strategy.mixed_precision == MixedPrecision()  # no FSDP casting: autocast alone
    assert strategy._activation_checkpointing_kwargs == {}
    assert strategy.kwargs["limit_all_gathers"] is False
    assert strategy.kwargs["sync_module_states"] is False and "param_init_fn" not in strategy.kwargs
    with pytest.raises(ValueError, match="needs the decoder layer classes"):
        build_strategy(cfg, set())


def test_ddp_and_single(no_cuda):
    ddp = build_strategy(_cfg(strategy="ddp"), set())
    assert type(ddp) is DDPStrategy
    # the gradients are views into the all-reduce buckets: no second copy of them
    assert ddp._ddp_kwargs == {"find_unused_parameters": False, "gradient_as_bucket_view": True}
    assert ddp._timeout == timedelta(seconds=123)
    assert ddp.process_group_backend == "gloo"
    single = build_strategy(_cfg(strategy="single", gpus_per_node=1), set())
    assert type(single) is SingleDeviceStrategy
    assert single.root_device == torch.device("cpu")


@pytest.mark.timeout(30)
def test_trainer_accepts_the_cpu_fsdp1_strategy(no_cuda):
    """Lightning refuses its own FSDPStrategy on the CPU; the subclass gets through."""
    cfg = _cfg(strategy="fsdp1", precision="32-true", gpus_per_node=2)
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), logger=False)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=build_strategy(cfg, {LLAMA}), logger=False)
    assert type(trainer.strategy) is CPUFSDPStrategy
    assert trainer.strategy.root_device == torch.device("cpu")


# ---------------------------------------------------------------------------- FSDP1 on the CPU, for real


def _tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.timeout(60)
def test_cpu_fsdp1_wraps_with_device_id_cpu(no_cuda, tmp_path):
    """A 1-process gloo group: the subclass wraps on the CPU where Lightning's strategy cannot."""
    cfg = _cfg(strategy="fsdp1", precision="32-true", gpus_per_node=1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = FSDPStrategy(parallel_devices=[torch.device("cpu")], auto_wrap_policy={LLAMA})
        with pytest.raises(RuntimeError, match="FSDP needs a non-CPU accelerator device"):
            plain._setup_model(_tiny_llama())
        strategy = build_strategy(cfg, {LLAMA})
        strategy.parallel_devices = [torch.device("cpu")]
        wrapped = strategy._setup_model(_tiny_llama())
        assert isinstance(wrapped, FullyShardedDataParallel)
        assert wrapped.compute_device == torch.device("cpu")
        units = [
            type(m.module).__name__ for m in wrapped.modules() if isinstance(m, FullyShardedDataParallel)
        ]
        assert units == ["LlamaForCausalLM", "LlamaDecoderLayer", "LlamaDecoderLayer"]
        checkpointed = [m for m in wrapped.modules() if type(m).__name__ == "CheckpointWrapper"]
        assert len(checkpointed) == 2
        ids = torch.randint(0, 128, (2, 8))
        wrapped(input_ids=ids, labels=ids).loss.backward()
    finally:
        dist.destroy_process_group()


def test_materialize_meta_keeps_tied_weights_and_real_buffers():
    """FSDP1's param_init_fn on a meta-device model (ranks other than 0 under sync_module_states)."""
    from accelerate import init_empty_weights

    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    assert model.lm_head.weight.is_meta and model.lm_head.weight is model.model.embed_tokens.weight
    init = MaterializeMeta("cpu")
    for module in model.modules():  # FSDP calls it on every module of a unit
        init(module)
    assert not any(p.is_meta for p in model.parameters())
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # allocated once: the tie holds
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)  # real buffers untouched
    real = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in real.parameters()) == 82_240


# ---------------------------------------------------------------------------- FSDP2 on 2 ranks, for real

#: A few tensors compared in full (the tied embedding, a projection, a norm, the last layer's MLP).
COMPARED = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.7.input_layernorm.weight",
    "model.layers.29.mlp.down_proj.weight",
]


def _peft_name(name: str) -> str:
    prefix, _, leaf = name.rpartition(".")
    if "_proj" in prefix:
        return f"base_model.model.{prefix}.base_layer.{leaf}"
    return f"base_model.model.{name}"


def _fsdp2_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from ftpipe.distributed.build import create_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        cfg = PipelineConfig.from_flat(
            {"hf_model_id": "embedded", "precision": "32-true", "gpus_per_node": world, "strategy": "fsdp2"}
        )
        torch.manual_seed(7)
        model = create_model(cfg, device_mesh=mesh, strategy_kind="fsdp2")
        clean = {n.replace("._checkpoint_wrapped_module", ""): p for n, p in model.named_parameters()}
        result = {
            "local": {n: p.to_local().numel() for n, p in clean.items()},
            "full": {n: p.numel() for n, p in clean.items()},
            "shape": {n: tuple(p.shape) for n, p in clean.items()},
            "dtensor": all(type(p).__name__ == "DTensor" for p in clean.values()),
            "tied": model.get_base_model().lm_head.weight is model.get_base_model().model.embed_tokens.weight,
            "inv_freq": model.get_base_model().model.rotary_emb.inv_freq.clone(),
            "lora_A": clean[
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
            ].full_tensor(),
            "tensors": {n: clean[_peft_name(n)].full_tensor() for n in COMPARED},
        }
        # FSDP1 on the CPU: every rank loads; rank 0's adapter init reaches every rank despite other seeds
        torch.manual_seed(100 + rank)
        fsdp1 = create_model(
            cfg.replace(strategy="fsdp1", activation_checkpointing=False), strategy_kind="fsdp1"
        )
        result["fsdp1_lora_A"] = (
            fsdp1.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
        )
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_ranks_fsdp2_shards_and_loads_rank0_weights(tmp_path, embedded_model_path):
    from ftpipe.distributed.build import create_model

    mp.start_processes(_fsdp2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    # every parameter is a DTensor split between the ranks: each holds about half
    assert r0["dtensor"] and r1["dtensor"] and r0["full"] == r1["full"]
    for name, shape in r0["shape"].items():
        rows, per_row = shape[0], r0["full"][name] // shape[0]
        first = -(-rows // 2)  # FSDP2 splits dim 0: ceil(rows / 2) rows on rank 0, the rest on rank 1
        assert (r0["local"][name], r1["local"][name]) == (first * per_row, (rows - first) * per_row), name
    total = sum(r0["full"].values())
    assert total == 144_283_968  # base + LoRA r=32 on 7 projections, tied embeddings counted once
    for r in (r0, r1):
        assert abs(sum(r["local"].values()) / total - 0.5) < 0.01
    assert r0["tied"] and r1["tied"]

    # rank 0's broadcast gives the same weights (and adapter init, same seed) as a plain load
    cfg = PipelineConfig.from_flat(
        {
            "hf_model_id": "embedded",
            "precision": "32-true",
            "strategy": "single",
            "gpus_per_node": 1,
            "activation_checkpointing": False,
        }
    )
    torch.manual_seed(7)
    plain = create_model(cfg)
    plain_params = dict(plain.named_parameters())
    for name in COMPARED:
        expected = plain_params[_peft_name(name)].detach()
        assert torch.equal(r0["tensors"][name], expected), name
        assert torch.equal(r1["tensors"][name], expected), name
    lora_a = plain_params["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].detach()
    assert torch.equal(r0["lora_A"], lora_a) and torch.equal(r1["lora_A"], lora_a)
    assert torch.equal(r0["fsdp1_lora_A"], r1["fsdp1_lora_A"]) and r0["fsdp1_lora_A"].abs().sum() > 0
    # the rotary frequencies (a non-persistent buffer, not in the checkpoint) survive the meta build
    inv_freq = plain.get_base_model().model.rotary_emb.inv_freq
    assert torch.equal(r0["inv_freq"], inv_freq) and torch.equal(r1["inv_freq"], inv_freq)
