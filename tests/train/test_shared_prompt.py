"""A pair batched as one row, the prompt once (``share_prompt``): the same answer log-probabilities and
gradients as two rows of their own, on a real (tiny) model with both attention implementations that
take a custom mask; the first-forward check that refuses a model whose attention ignores the mask; and
where ``auto`` turns the layout off."""

from __future__ import annotations

import pytest
import torch

from ftpipe.config.errors import ConfigError
from ftpipe.config.schema import PipelineConfig
from ftpipe.data.pairs import PairCollator
from ftpipe.objectives import dpo as dpo_objective
from ftpipe.train import loss as loss_module
from ftpipe.train.loss import (
    ChunkedLossHead,
    SharedPromptError,
    check_model_numerics,
    pair_attention_mask,
    sequence_logps_from_logits,
)

pytestmark = pytest.mark.timeout(120)


def _pairs(vocab: int) -> list[dict[str, torch.Tensor]]:
    """Three seeded pairs, prompts of 5/8/11 tokens, answers of unequal lengths."""
    generator = torch.Generator().manual_seed(1)
    pairs = []
    for i in range(3):
        prompt = torch.randint(0, vocab, (5 + 3 * i,), generator=generator)
        sides = {}
        for side, n in (("chosen", 4 + i), ("rejected", 7 - i)):
            ids = torch.cat([prompt, torch.randint(0, vocab, (n,), generator=generator)])
            labels = ids.clone()
            labels[: len(prompt)] = -100
            sides |= {f"{side}_input_ids": ids, f"{side}_labels": labels}
        pairs.append(sides)
    return pairs


def _logps_and_grads(model, batch, head: ChunkedLossHead | None):
    model.zero_grad()
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "pair_segments" in batch:
        inputs |= {
            "position_ids": batch["position_ids"],
            "attention_mask": pair_attention_mask(model, batch["pair_segments"]),
        }
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    if head is None:
        logps = sequence_logps_from_logits(model(**inputs).logits, batch["labels"])
    else:
        with head.targets(batch["labels"], chunk_size=4, per_sequence=True):
            logps = model(**inputs).logits.reshape(-1)
    (logps * torch.arange(1.0, len(logps) + 1)).sum().backward()  # every row its own weight
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_row_per_pair_scores_like_two_rows(tiny_llama, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn, dtype=torch.float32)
    pairs = _pairs(model.config.vocab_size)
    rows = PairCollator(0)(pairs)
    shared = PairCollator(0, share_prompt=True)(pairs)
    assert shared["input_ids"].numel() < rows["input_ids"].numel()
    expected, expected_grads = _logps_and_grads(model, rows, None)
    for head in (None, ChunkedLossHead(model, 4)):
        logps, grads = _logps_and_grads(model, shared, head)
        torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-4)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
        if head is not None:
            head.remove()
    report = check_model_numerics(
        model, None, packing=False, device=torch.device("cpu"), per_sequence=True, shared_prompt=True
    )
    assert report.shared_prompt_rel_diff is not None and report.shared_prompt_rel_diff < 1e-5


def test_a_model_that_ignores_the_mask_is_refused_at_the_first_forward(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa", dtype=torch.float32)
    monkeypatch.setattr(loss_module, "pair_attention_mask", lambda model, segments: None)  # plain causal
    with pytest.raises(SharedPromptError, match="Set share_prompt: false"):
        check_model_numerics(
            model, None, packing=False, device=torch.device("cpu"), per_sequence=True, shared_prompt=True
        )


def test_flash_attention_takes_no_block_mask():
    model = torch.nn.Linear(1, 1)
    model.config = type("Config", (), {"_attn_implementation": "flash_attention_2"})()
    with pytest.raises(SharedPromptError, match="set share_prompt: false"):
        pair_attention_mask(model, torch.zeros(1, 3, dtype=torch.int8))


@pytest.mark.parametrize(
    ("setting", "attn", "window", "expected"),
    [
        ("auto", "sdpa", None, "auto"),
        ("auto", "eager", 4096, "auto"),  # the window covers every row auto shares
        ("auto", "flash_attention_2", None, False),
        ("auto", "sdpa", 1024, False),  # rows of up to max_seq_length 2048 would outrun the window
        (True, "sdpa", 4096, True),
        (True, "sdpa", 3000, "error"),  # rows of up to 4096 tokens
        (True, "flash_attention_2", None, "error"),
        (False, "flash_attention_2", None, False),
    ],
)
def test_where_share_prompt_applies(monkeypatch, setting, attn, window, expected):
    cfg = PipelineConfig().replace(objective="dpo", share_prompt=setting, max_seq_length=2048)
    monkeypatch.setattr("ftpipe.runtime.select_attn_implementation", lambda cfg, device: attn)
    monkeypatch.setattr(dpo_objective, "_sliding_window", lambda cfg: window)
    if expected == "error":
        with pytest.raises(ConfigError, match=r"objective\.share_prompt: true cannot be used"):
            dpo_objective.resolve_share_prompt(cfg)
    else:
        assert dpo_objective.resolve_share_prompt(cfg) == expected
