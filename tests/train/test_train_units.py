"""Unit checks of the training pieces that need no process group: schedule, AdamW groups, the summed
token loss, clipping by the global norm, FLOPs/peak bookkeeping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ftpipe.config.schema import TrainConfig
from ftpipe.train.callbacks import cuda_peak_tflops, measure_cpu_matmul_tflops, step_flops
from ftpipe.train.loss import shifted_token_loss_sum
from ftpipe.train.optim import (
    build_optimizer,
    build_scheduler,
    clean_param_name,
    lr_factor,
    no_decay_names,
    param_groups,
)
from ftpipe.train.step import total_grad_norm_and_clip


@pytest.mark.timeout(30)
def test_warmup_then_cosine_to_min_lr():
    train = TrainConfig(max_steps=10, warmup_steps=4, learning_rate=1e-3, min_lr=1e-4)
    layer = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(param_groups(layer.named_parameters(), 0.1), train, "cpu")
    scheduler = build_scheduler(optimizer, train)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up, peak at step 4
    assert lrs[4] == pytest.approx(1e-3)  # cosine starts at the peak
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))  # then decreases
    # cosine at progress 5/6 of the decay: min + (peak - min) * (1 + cos(5 pi / 6)) / 2
    assert lrs[9] == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    end = lr_factor(10, max_steps=10, warmup_steps=4, peak_lr=1e-3, min_lr=1e-4)
    assert end == pytest.approx(0.1)  # exactly min_lr at max_steps
    # after max_steps scheduler steps both groups sit at min_lr
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
        {"decay": 1e-4, "no_decay": 1e-4}
    )


@pytest.mark.timeout(30)
def test_param_groups_decay_matrices_only_and_skip_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model.named_parameters(), 0.05)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    assert [p.shape for p in by_name["decay"]["params"]] == [torch.Size([3, 4])]
    # biases and the norm weight/bias; the frozen matrix is nowhere
    assert sorted(p.numel() for p in by_name["no_decay"]["params"]) == [2, 3, 3, 3]
    optimizer = build_optimizer(groups, TrainConfig(adam_beta1=0.8, adam_beta2=0.9), "cpu")
    assert optimizer.defaults["betas"] == (0.8, 0.9)
    assert optimizer.defaults["fused"] is True  # the fused kernel on the CPU too


@pytest.mark.timeout(30)
def test_fused_adamw_on_the_cpu_matches_the_per_tensor_one():
    torch.manual_seed(0)
    ref = torch.nn.Linear(8, 4)
    fused = torch.nn.Linear(8, 4)
    fused.load_state_dict(ref.state_dict())
    start = ref.weight.detach().clone()
    train = TrainConfig(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.95)
    opts = [
        torch.optim.AdamW(param_groups(ref.named_parameters(), 0.1), lr=1e-2, betas=(0.9, 0.95), fused=False),
        build_optimizer(param_groups(fused.named_parameters(), 0.1), train, "cpu"),
    ]
    x = torch.randn(16, 8)
    for _ in range(3):
        for model, opt in zip((ref, fused), opts, strict=True):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(ref.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(fused.weight, start)  # the steps did move the weights


@pytest.mark.timeout(30)
def test_no_decay_names_survive_fsdp1_flattening():
    """Names recorded before wrapping decide the group even when the parameters became 1-D shard views."""
    names = no_decay_names(
        [("layers.0.mlp.weight", torch.zeros(2, 2)), ("layers.0.norm.weight", torch.zeros(2))]
    )
    assert names == {"layers.0.norm.weight"}
    wrapped = "_fsdp_wrapped_module.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.weight"
    assert clean_param_name(wrapped) == "layers.0.mlp.weight"
    flat_views = [
        ("_fsdp_wrapped_module.layers.0.mlp.weight", torch.nn.Parameter(torch.zeros(4))),
        ("_fsdp_wrapped_module.layers.0.norm.weight", torch.nn.Parameter(torch.zeros(2))),
    ]
    groups = {g["name"]: len(g["params"]) for g in param_groups(flat_views, 0.1, names)}
    assert groups == {"decay": 1, "no_decay": 1}


@pytest.mark.timeout(30)
def test_param_groups_refuse_nothing_to_train():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen.named_parameters(), 0.1)


@pytest.mark.timeout(60)
def test_model_loss_with_num_items_one_is_the_token_sum(tiny_llama):
    """The HF loss with ``num_items_in_batch=1`` is the sum of the shifted token losses (what the module
    relies on), and the sum ignores -100 labels."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 9))
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, 6:] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels, use_cache=False, num_items_in_batch=1)
    summed = shifted_token_loss_sum(out.logits, labels)
    assert float(out.loss.detach()) == pytest.approx(float(summed), rel=1e-5)
    n = int((labels[:, 1:] != -100).sum())
    assert n == 5 + 5  # positions 4..8 of row 0, 1..5 of row 1
    with torch.no_grad():
        mean = model(input_ids=input_ids, labels=labels, use_cache=False).loss
    assert float(summed) / n == pytest.approx(float(mean), rel=1e-5)


@pytest.mark.timeout(30)
def test_clip_by_global_norm_returns_the_norm_before_clipping():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.full((2, 2), 2.0)  # norm 4
    norm = total_grad_norm_and_clip(None, [a, b], max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    clipped = torch.cat([a.grad.flatten(), b.grad.flatten()]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-4)
    assert a.grad[0] / b.grad[0, 0] == pytest.approx(1.5)  # direction kept
    # below the threshold nothing changes
    a.grad = torch.tensor([0.3, 0.4, 0.0])
    b.grad = None
    assert float(total_grad_norm_and_clip(None, [a, b], max_norm=1.0)) == pytest.approx(0.5)
    assert a.grad.tolist() == pytest.approx([0.3, 0.4, 0.0])


@pytest.mark.timeout(60)
def test_flops_and_peaks():
    assert step_flops(total_params=100, trainable_params=100, tokens=10) == 6 * 100 * 10  # full: 6 N T
    assert step_flops(total_params=100, trainable_params=0, tokens=10) == 4 * 100 * 10  # frozen: no dW
    assert cuda_peak_tflops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989.0
    assert cuda_peak_tflops("NVIDIA H100 PCIe", "bf16-true") == 756.0
    assert cuda_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16-mixed") == 312.0
    assert cuda_peak_tflops("NVIDIA A100-SXM4-80GB", "32-true") is None
    assert cuda_peak_tflops("Tesla T4", "16-mixed") is None
    measured = measure_cpu_matmul_tflops(n=256, reps=2)
    assert 1e-4 < measured < 100.0


@pytest.mark.timeout(30)
def test_progress_bar_updates_every_batch_on_a_terminal_and_eight_times_in_a_file():
    import io

    from ftpipe.train.trainer import progress_refresh_rate

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_refresh_rate(48, Terminal()) == 1
    assert progress_refresh_rate(48, io.StringIO()) == 6
    assert progress_refresh_rate(5, io.StringIO()) == 1
