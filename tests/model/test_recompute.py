"""ftpipe.model.recompute: the LoRA dropout's output and the MLP activation's output are kept as recipes and
recomputed in the backward pass: the same gradients to the bit, the expected bytes less, views of a
recomputed tensor rebuilt with their layout, an input changed in place is an error, a marked tensor changed
in place is kept, and autograd's check of kept tensors for in-place changes still holds."""

from __future__ import annotations

import pytest
import torch

from ftpipe.config.io import load_config
from ftpipe.model import recompute
from ftpipe.model.load import prepare_for_finetuning
from ftpipe.model.recompute import recomputable, recompute_saved

HIDDEN, INTERMEDIATE, LAYERS, TOKENS = 64, 160, 2, 2 * 24


def _tiny_lora_llama(recompute_elementwise: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    cfg = load_config(
        None,
        finetuning="lora",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.1,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        recompute_elementwise=recompute_elementwise,
    )
    return prepare_for_finetuning(model, cfg, announce=False).train()


def _step(
    model, ids: torch.Tensor, on: bool, tally: dict[int, int], recipes: list
) -> dict[str, torch.Tensor]:
    """One forward and backward; ``tally`` gets the bytes of every storage kept for the backward pass,
    ``recipes`` the recipes kept instead of tensors."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    alive = []  # no storage is freed (and its address reused) while the bytes are tallied

    def count(t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        if key not in params:
            tally[key] = t.untyped_storage().nbytes()
            alive.append(t)

    if on:
        pack = recompute._pack

        def counting_pack(t):
            packed = pack(t)
            if isinstance(packed, recompute._Recipe):
                recipes.append(packed)
            for kept in packed.inputs if isinstance(packed, recompute._Recipe) else packed[:1]:
                count(kept)
            return packed

        recompute._pack = counting_pack
        try:
            with recompute_saved():
                loss = model(input_ids=ids).logits.square().mean()
        finally:
            recompute._pack = pack
    else:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (count(t), t)[1], lambda t: t):
            loss = model(input_ids=ids).logits.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.timeout(120)
def test_same_gradients_to_the_bit_and_exactly_the_expected_bytes_less():
    model = _tiny_lora_llama()
    ids = torch.randint(0, 128, (2, TOKENS // 2))
    kept_off: dict[int, int] = {}
    kept_on: dict[int, int] = {}
    recipes: list = []
    torch.manual_seed(1)  # the same dropout masks in both passes
    off = _step(model, ids, False, kept_off, [])
    torch.manual_seed(1)
    on = _step(model, ids, True, kept_on, recipes)
    assert off.keys() == on.keys() and len(on) == LAYERS * 7 * 2  # every lora_A and lora_B trains
    for name in on:
        assert torch.equal(on[name], off[name]), name
    # per layer: the 7 lora_A inputs and the SiLU output (kept by the product with the up projection)
    names = [getattr(r.fn, "__name__", getattr(r.fn, "func", r.fn).__name__) for r in recipes]
    assert sorted(names) == sorted(["masked_scale"] * 7 * LAYERS + ["forward"] * LAYERS)
    # per layer and token at least: q, k, v keep their shared input once instead of three dropped-out
    # copies (2 hidden), gate and up likewise (1 hidden), the SiLU output is rebuilt from the gate
    saved = LAYERS * TOKENS * 4 * (3 * HIDDEN + INTERMEDIATE)
    assert sum(kept_off.values()) - sum(kept_on.values()) >= saved


@pytest.mark.timeout(60)
def test_off_by_configuration_and_outside_training():
    model = _tiny_lora_llama(recompute_elementwise=False)
    assert not any(getattr(m, "_ftpipe_hooked", False) for m in model.modules())
    x = torch.randn(3, 4, requires_grad=True)
    y = recomputable(x.exp(), torch.exp, x)  # outside recompute_saved: no recipe, nothing kept alive
    assert not hasattr(y, recompute._RECIPE)


@pytest.mark.timeout(60)
def test_views_rebuilt_with_their_layout_and_in_place_changes_refused():
    x = torch.randn(4, 6, requires_grad=True)
    with recompute_saved():
        y = recomputable(torch.sigmoid(x), torch.sigmoid, x)
        view = y.t()[1:]
        packed = recompute._pack(view)
        assert isinstance(packed, recompute._Recipe)
        rebuilt = recompute._unpack(packed)
        assert torch.equal(rebuilt, view) and rebuilt.stride() == view.stride()
        plain = torch.randn(3)
        kept, version = recompute._pack(plain)
        assert kept is plain and version == plain._version
        # an input changed in place after the recipe was made
        w = torch.randn(5)
        z = recomputable(w.exp(), torch.exp, w)
        (z * torch.ones(5, requires_grad=True)).sum()
        packed = recompute._pack(z)
        w.add_(1.0)
        with pytest.raises(RuntimeError, match="recompute_elementwise: false"):
            recompute._unpack(packed)


@pytest.mark.timeout(60)
def test_in_place_changes_are_kept_or_refused_as_autograd_does():
    x = torch.randn(5, requires_grad=True)
    c = torch.randn(5)
    # autograd refuses a kept tensor changed in place; its check still holds under the hooks
    with recompute_saved():
        y = x.sigmoid()  # keeps its output
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # a marked tensor changed in place before it is saved is kept, not recomputed from its recipe
    w = torch.randn(5, requires_grad=True)
    reference = torch.autograd.grad((x.sin() * 2 * w).sum(), (x, w))
    with recompute_saved():
        a = recomputable(x.sin(), torch.sin, x.detach())  # sin keeps its input, not its output
        a.mul_(2)
        out = (a * w).sum()  # keeps a (for w's gradient), at version 1
    for got, want in zip(torch.autograd.grad(out, (x, w)), reference, strict=True):
        torch.testing.assert_close(got, want)
    # an in-place activation is not marked: its output is its (changed) input
    act = torch.nn.SiLU(inplace=True)
    recompute.recompute_activation_outputs(act)
    h = x * 1.0
    with recompute_saved():
        g = act(h)
        out = (g * c).sum()
    assert not hasattr(g, recompute._RECIPE)
    expected = torch.autograd.grad((torch.nn.functional.silu(x) * c).sum(), x)[0]
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], expected)
