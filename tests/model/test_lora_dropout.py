"""ftpipe.model.dropout: the LoRA dropout that replaces PEFT's nn.Dropout (drop rate, scaling, gradient, a
one-byte saved mask, the same seed giving the same masks, identity in eval mode, CUDA left to PyTorch)."""

from __future__ import annotations

import pytest
import torch

from ftpipe.model.dropout import LEVELS, LoraDropout, keep_mask, use_lora_dropout


@pytest.mark.timeout(60)
def test_mask_drops_p_of_the_elements_independently():
    torch.manual_seed(0)
    n = 2_000_000
    mask = keep_mask(torch.Size([n]), 0.1, torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    dropped = (~mask).float()
    # drop rate within 5 standard errors of round(0.1 * 65536) / 65536
    p = round(0.1 * LEVELS) / LEVELS
    assert abs(dropped.mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    # neighbours (lanes of one 64-bit word, and across words) are independent: both dropped ~ p^2
    both = (dropped[:-1] * dropped[1:]).mean().item()
    assert abs(both - p * p) < 0.002
    for lane in range(4):  # every 16-bit lane of the words is uniform
        assert abs(dropped[lane::4].mean().item() - p) < 0.003
    assert keep_mask(torch.Size([3, 5]), 0.0, torch.device("cpu")).all()
    assert keep_mask(torch.Size([7]), 0.5, torch.device("cpu")).shape == (7,)  # not a multiple of 4


@pytest.mark.timeout(60)
def test_forward_backward_scale_and_seed():
    drop = LoraDropout(0.25).train()
    scale = 1 / (1 - round(0.25 * LEVELS) / LEVELS)
    x = torch.full((64, 48), 2.0, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 2.0 * scale))
    assert 0.15 < 1 - kept.float().mean().item() < 0.35
    (y * torch.arange(48.0)).sum().backward()
    assert torch.equal(x.grad, kept * torch.arange(48.0) * scale)  # the gradient flows through kept ones
    torch.manual_seed(3)
    assert torch.equal(drop(x.detach()), y.detach())  # the same seed draws the same mask
    assert torch.equal(drop.eval()(x), x)  # eval mode: identity
    assert torch.equal(LoraDropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        LoraDropout(1.0)


@pytest.mark.timeout(60)
def test_only_a_one_byte_mask_is_saved_for_backward():
    """What autograd keeps for the dropout: the boolean mask, not a float copy of it or of the input."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(32, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LoraDropout(0.1).train()(x).sum().backward()
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.bool, (32, 16))]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.Dropout(0.1).train()(x).sum()
    assert all(t.dtype == torch.float32 for t in saved)  # PyTorch's CPU dropout keeps a float mask


@pytest.mark.timeout(60)
def test_other_devices_use_pytorchs_fused_dropout(monkeypatch):
    calls = []

    def fake(x, p, training):
        calls.append((x.device.type, p, training))
        return x

    monkeypatch.setattr(torch.nn.functional, "dropout", fake)
    x = torch.empty(4, 4, device="meta")
    LoraDropout(0.1).train()(x)
    assert calls == [("meta", 0.1, True)]


@pytest.mark.timeout(120)
def test_apply_lora_swaps_every_adapter_dropout_and_keeps_the_weights(tiny_llama):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ftpipe.cli.main import parse
    from ftpipe.model.lora import apply_lora, lora_config

    _, cfg = parse(["train", "--hf_model_id", str(tiny_llama), "--lora_dropout", "0.05"])
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), cfg)
    drops = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert drops and all(type(d) is LoraDropout and d.p == 0.05 for d in drops)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora_config(cfg))
    assert model.state_dict().keys() == plain.state_dict().keys()  # nothing saved or exported changes
    assert use_lora_dropout(model) == 0  # idempotent
    _, no_drop = parse(["train", "--hf_model_id", str(tiny_llama), "--lora_dropout", "0"])
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), no_drop)
    assert not any(isinstance(m, LoraDropout) for m in model.modules())  # p = 0: PEFT's identity stays
