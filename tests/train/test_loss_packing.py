"""Packing and the chunked loss give the numbers of the plain computation (fp32, tight tolerances).

A packed batch (samples concatenated, position ids restarting, no attention mask) must give the same
summed loss and the same gradients as the same samples padded one per row, under sdpa and eager
attention and in both packed layouts (one row per pack; all packs flattened into one row as for
flash-attention). The chunked loss must equal the cross-entropy of the model's full logits, gradients
included, for LoRA and full fine-tuning. The checks run on the example alpaca data with a tiny Llama.
"""

from __future__ import annotations

import json

import pytest
import torch

from ftpipe.config.schema import DataConfig
from ftpipe.data.collate import SFTCollator
from ftpipe.data.dataset import SFTDataset
from ftpipe.data.packing import PackedDataset, pack_samples
from ftpipe.train.loss import (
    ChunkedLossHead,
    PackingIsolationError,
    check_model_numerics,
    chunked_token_loss_sum,
    shifted_token_loss_sum,
)

GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def samples(alpaca_demo, tokenizer) -> SFTDataset:
    """Ten real alpaca rows tokenized as training does (prompts masked), up to 192 tokens each."""
    import datasets

    raw = json.loads(alpaca_demo.read_text(encoding="utf-8"))[:10]
    rows = [
        {"id": i, "input": f"{r['instruction']}\n\n{r['input']}".strip(), "output": r["output"]}
        for i, r in enumerate(raw)
    ]
    dataset = SFTDataset(
        datasets.Dataset.from_list(rows), tokenizer, DataConfig(), name="alpaca", max_len=192
    )
    assert len(dataset) == 10 and len(set(dataset.lengths)) > 5  # mixed lengths
    return dataset


def _model(path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()


def _loss_and_grads(model, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    loss = shifted_token_loss_sum(out.logits, batch["labels"])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _assert_grads_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and want
    scale = max(float(g.abs().max()) for g in want.values())
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst <= GRAD_RTOL * scale, f"largest gradient difference {worst:.3g} (scale {scale:.3g})"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True], ids=["row-per-pack", "flattened"])
def test_packed_batch_has_the_loss_and_gradients_of_the_unpacked_batch(
    tiny_llama, tokenizer, samples, attn, flatten
):
    model = _model(tiny_llama, attn)
    items = [samples[i] for i in range(len(samples))]
    unpacked = SFTCollator(tokenizer.pad_token_id)(items)
    packs = PackedDataset(samples, samples.lengths, capacity=256)
    assert 1 < len(packs) < len(samples)  # several samples share a row
    packed = SFTCollator(tokenizer.pad_token_id, flatten=flatten)([packs[i] for i in range(len(packs))])
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[0] == (1 if flatten else len(packs))
    # the same tokens and label tokens in both layouts
    assert int(packed["num_tokens"]) == int(unpacked["num_tokens"]) == sum(samples.lengths)
    assert int(packed["num_label_tokens"]) == int(unpacked["num_label_tokens"])

    loss_u, grads_u = _loss_and_grads(model, unpacked)
    loss_p, grads_p = _loss_and_grads(model, packed)
    assert loss_p == pytest.approx(loss_u, rel=1e-6)
    _assert_grads_equal(grads_p, grads_u)


@pytest.mark.timeout(120)
def test_a_sample_has_the_same_logits_with_others_packed_next_to_it(tiny_llama, samples):
    model = _model(tiny_llama)
    a, b, c = samples[0], samples[1], samples[2]
    row = pack_samples([a, b, c])
    start, end = len(a["input_ids"]), len(a["input_ids"]) + len(b["input_ids"])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits[0]
        packed = model(
            input_ids=torch.tensor([row["input_ids"]]),
            position_ids=torch.tensor([row["position_ids"]]),
            use_cache=False,
        ).logits[0, start:end]
        # control: the same row with a plain causal mask lets b see a, which must show
        crossed = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0, start:end]
    scale = float(alone.abs().max())
    assert float((packed - alone).abs().max()) <= 1e-5 * scale
    assert float((crossed - alone).abs().max()) > 1e-2 * scale


@pytest.mark.timeout(30)
def test_packing_masks_the_first_label_of_every_sample_and_restarts_positions():
    # labels[0] of a tokenized sample is always -100; pack_samples enforces it for any input
    row = pack_samples(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    )
    assert row["input_ids"] == [5, 6, 7, 8, 9]
    assert row["labels"] == [-100, 6, 7, -100, 9]  # 7 never predicts 8
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    batch = SFTCollator(0)([row, pack_samples([{"input_ids": [1, 2], "labels": [-100, 2]}])])
    # the shorter row's padding is a label-less sequence of its own (positions restart at 0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"][1].tolist() == [-100, 2, -100, -100, -100]
    assert int(batch["num_tokens"]) == 7 and int(batch["num_label_tokens"]) == 4


@pytest.mark.timeout(120)
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_chunked_loss_equals_the_full_logit_loss_with_gradients(tiny_llama, tokenizer, samples, finetuning):
    model = _model(tiny_llama)
    if finetuning == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():  # non-zero B so the adapters get real gradients
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    batch = SFTCollator(tokenizer.pad_token_id)([samples[i] for i in range(6)])
    batch["labels"][2] = -100  # a row without any label
    loss_full, grads_full = _loss_and_grads(model, batch)
    head = ChunkedLossHead(model, chunk_size=64)
    for chunk in (1, 37, 10_000):
        model.zero_grad(set_to_none=True)
        with head.targets(batch["labels"], chunk_size=chunk):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        loss = out.logits.reshape(())
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        assert float(loss.detach()) == pytest.approx(loss_full, rel=1e-6), chunk
        _assert_grads_equal(grads, grads_full)
    # without targets the module is the plain output layer again (generation, export)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:1, :5], use_cache=False).logits
    assert logits.shape[-1] == model.config.vocab_size
    head.remove()
    assert "forward" not in model.get_output_embeddings().__dict__


@pytest.mark.timeout(30)
def test_chunked_loss_without_labels_is_zero_and_backpropagates():
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.full((2, 6), -100)
    loss = chunked_token_loss_sum(head, hidden, labels, chunk_size=4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0


@pytest.mark.timeout(30)
def test_chunked_loss_does_not_keep_full_vocabulary_logits():
    """Only one chunk's logits exist at a time: the tensors saved for backward hold no logits at all."""
    vocab, hidden_size, positions = 5000, 16, 300
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(1, positions + 1, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (1, positions + 1))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_token_loss_sum(head, hidden, labels, chunk_size=50)
    assert max(saved) < 50 * vocab  # no chunk's logits are saved (they are recomputed in backward)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        shifted_token_loss_sum(head(hidden), labels)
    assert max(saved) >= positions * vocab  # the plain loss keeps the full logits


@pytest.mark.timeout(120)
def test_numerics_check_passes_for_llama_and_catches_softcapped_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    small = {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**small)).eval()
    report = check_model_numerics(llama, ChunkedLossHead(llama, 8), packing=True, device=torch.device("cpu"))
    assert report.chunked_loss_ok and report.loss_rel_diff < 1e-5
    assert report.packing_rel_diff < 1e-5 < 1e-2 < report.packing_cross_rel_diff
    # Gemma-2 soft-caps its logits after the output layer: the chunked loss would be wrong, and is refused
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=0.5)).eval()
    report = check_model_numerics(gemma, ChunkedLossHead(gemma, 8), packing=False, device=torch.device("cpu"))
    assert report.chunked_loss_ok is False and report.loss_rel_diff > 1e-2


@pytest.mark.timeout(60)
def test_numerics_check_refuses_packing_when_sequences_see_each_other(tiny_llama, monkeypatch):
    """A model that ignored the position-id boundaries would train packed samples on each other."""
    import transformers.masking_utils as masking

    model = _model(tiny_llama)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(PackingIsolationError, match="packing: false"):
        check_model_numerics(model, None, packing=True, device=torch.device("cpu"))
    assert not model.training  # the mode it came in with
