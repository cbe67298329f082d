"""``ftpipe evaluate`` for a preference run: did the tuned model learn to prefer the chosen answers?

On the (first ``max_eval_samples``) held-out test pairs, for the base model and the tuned model alike:

* **preference accuracy**: how often the model's length-normalised log-probability of the chosen answer
  is above that of the rejected one (both answers after the same prompt, encoded exactly as training
  encodes them), and the mean margin between the two;
* **reward accuracy** (tuned model only): how often the implicit DPO reward
  ``beta * (log pi(y|x) - log pi_base(y|x))`` ranks chosen above rejected, with the base model as the
  reference, and the mean reward margin;
* **generation**: answers generated for the test prompts (vLLM or transformers, as for SFT), scored by
  BERTScore against the chosen and against the rejected answer: the share closer to chosen.

The report (``eval_report.json``, ``report.md``, the training curves with reward accuracy) is written
where SFT's is.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

from ftpipe.config.schema import PipelineConfig
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    from ftpipe.data.prepare import PreparedData
    from ftpipe.evaluate.common import EvalResult

log = get_logger(__name__)


def _answer_text(record: dict[str, Any], side: str) -> str:
    """A pair side as text (chat form: the assistant contents, then tool calls as JSON lines)."""
    import json

    value = record[side]
    if isinstance(value, str):
        return value
    parts = []
    for message in value:
        if message.get("content"):
            parts.append(message["content"])
        for call in message.get("tool_calls") or []:
            fn = call.get("function", call)
            parts.append(
                json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")}, ensure_ascii=False)
            )
    return "\n".join(parts)


def pair_logps(
    model_path: str, encodings: list[Any], cfg: PipelineConfig, pad_id: int
) -> list[tuple[float, float, int, int]]:
    """Per pair: (chosen log-prob sum, rejected log-prob sum, chosen tokens, rejected tokens) under the
    model in ``model_path`` (eval mode, no gradients, full logits in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftpipe.evaluate.device import device_and_dtype
    from ftpipe.evaluate.metrics import _padded_batch

    device, dtype = device_and_dtype(cfg.dist.accelerator)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
    ).to(device)
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            size = max(1, cfg.eval.eval_batch_size // 2)
            for first in range(0, len(encodings), size):
                group = encodings[first : first + size]
                examples = [(e.chosen_input_ids, e.chosen_labels) for e in group] + [
                    (e.rejected_input_ids, e.rejected_labels) for e in group
                ]
                input_ids, labels, mask = (t.to(device) for t in _padded_batch(examples, pad_id))
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                targets = labels[:, 1:]
                keep = targets != -100
                token_logps = (
                    torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                )
                sums = (token_logps * keep).sum(1).tolist()
                counts = keep.sum(1).tolist()
                n = len(group)
                out += [(sums[i], sums[n + i], counts[i], counts[n + i]) for i in range(n)]
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def preference_scores(
    logps: list[tuple[float, float, int, int]],
    base: list[tuple[float, float, int, int]] | None,
    beta: float,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(means, per-pair values) of the ranking scores; ``base`` given: the implicit-reward scores too."""
    per: dict[str, list[float]] = {"preference_correct": [], "preference_margin": []}
    if base is not None:
        per["reward_correct"], per["reward_margin"] = [], []
    for i, (c, r, nc, nr) in enumerate(logps):
        margin = c / max(nc, 1) - r / max(nr, 1)
        per["preference_correct"].append(float(margin > 0))
        per["preference_margin"].append(margin)
        if base is not None:
            bc, br, _, _ = base[i]
            reward = beta * ((c - bc) - (r - br))
            per["reward_correct"].append(float(reward > 0))
            per["reward_margin"].append(reward)
    means = {
        "preference_accuracy": statistics.fmean(per["preference_correct"]),
        "preference_margin": statistics.fmean(per["preference_margin"]),
    }
    if base is not None:
        means["reward_accuracy"] = statistics.fmean(per["reward_correct"])
        means["reward_margin"] = statistics.fmean(per["reward_margin"])
    return means, per


def evaluate_preferences(
    cfg: PipelineConfig, finetuned_path: str, prepared: PreparedData | None = None
) -> EvalResult:
    """Score the base and the tuned model on the test pairs; write the report (see the module doc).
    ``prepared``: ``cfg``'s prepared data when the caller has it; None: prepared (or found prepared) here."""
    from ftpipe.data.pairs import encode_pair
    from ftpipe.evaluate.common import (
        EvaluationError,
        answer_text,
        finish_report,
        rows_to_score,
    )
    from ftpipe.evaluate.generate import GenerationSettings, generate
    from ftpipe.evaluate.metrics import MetricSettings, score
    from ftpipe.model.embedded import resolve_model_path
    from ftpipe.model.tokenizer import load_tokenizer

    start = time.monotonic()
    test_file, rows = rows_to_score(cfg, prepared)
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encodings, prompts, kept = [], [], []
    for row in rows:
        trained = encode_pair(tokenizer, row, cfg.data)
        whole = encode_pair(tokenizer, row, cfg.data, max_len=10**9)  # the prompt as generation sees it
        if trained.drop is not None or whole.drop is not None:
            continue
        encodings.append(trained)
        prompts.append(list(whole.chosen_input_ids[: whole.prompt_length]))
        kept.append(row)
    if not kept:
        raise EvaluationError(f"no usable pair in the test split {test_file} (every pair was dropped)")
    chosen = [_answer_text(r, "chosen") for r in kept]
    rejected = [_answer_text(r, "rejected") for r in kept]
    models = {
        "base": resolve_model_path(cfg.model.hf_model_id, cfg.model.model_cache_dir),
        "finetuned": finetuned_path,
    }
    logps = {name: pair_logps(path, encodings, cfg, pad_id) for name, path in models.items()}
    beta = cfg.objective.dpo_beta
    aggregates: dict[str, dict[str, Any]] = {}
    per_pair: dict[str, dict[str, list]] = {}
    generations = {}
    settings = MetricSettings.from_config(cfg)
    first_scores: dict[str, Any] = {}
    for name, path in models.items():
        means, per = preference_scores(logps[name], logps["base"] if name == "finetuned" else None, beta)
        log.info("evaluating the %s model %s on %d test pairs", name, path, len(kept))
        gen = generate(path, prompts, GenerationSettings.from_config(cfg), backend=cfg.eval.eval_backend)
        answers = [answer_text(t) for t in gen.texts]
        to_chosen = score(answers, chosen, settings)
        to_rejected = score(answers, rejected, settings)
        first_scores = first_scores or to_chosen
        closer = [
            float(a > b)
            for a, b in zip(
                to_chosen["per_sample"]["bertscore_f1"],
                to_rejected["per_sample"]["bertscore_f1"],
                strict=True,
            )
        ]
        per.update(
            {
                "bertscore_f1_chosen": to_chosen["per_sample"]["bertscore_f1"],
                "bertscore_f1_rejected": to_rejected["per_sample"]["bertscore_f1"],
                "closer_to_chosen": closer,
            }
        )
        aggregates[name] = {
            **means,
            "bertscore_f1_chosen": to_chosen["mean"]["bertscore_f1"],
            "bertscore_f1_rejected": to_rejected["mean"]["bertscore_f1"],
            "closer_to_chosen": statistics.fmean(closer),
        }
        per_pair[name] = per
        generations[name] = gen
    samples = []
    for i, row in enumerate(kept):
        sample = {
            "index": i,
            "id": row.get("id"),
            "source": row.get("source"),
            "prompt_text": tokenizer.decode(prompts[i], skip_special_tokens=False),
            "prompt_tokens": len(prompts[i]),
            "chosen": chosen[i],
            "rejected": rejected[i],
        }
        for name in models:
            sample[name] = {
                "prediction": generations[name].texts[i],
                "tokens": generations[name].token_counts[i],
                "logps": dict(
                    zip(
                        ("chosen", "rejected", "chosen_tokens", "rejected_tokens"),
                        logps[name][i],
                        strict=True,
                    )
                ),
                **{metric: values[i] for metric, values in per_pair[name].items()},
            }
        samples.append(sample)
    backend = generations["finetuned"].backend
    report = {
        "objective": "dpo",
        "backend": backend,
        "models": models,
        "test_file": str(test_file),
        "num_samples": len(kept),
        "num_dropped_pairs": len(rows) - len(kept),
        "bertscore_model": first_scores["bertscore_model"],
        "bertscore_num_layers": first_scores["bertscore_num_layers"],
        "settings": {
            "eval_backend": cfg.eval.eval_backend,
            "temperature": cfg.eval.temperature,
            "top_p": cfg.eval.top_p,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "eval_seed": cfg.eval.eval_seed,
            "dpo_beta": beta,
        },
        "aggregates": aggregates,
        "per_source": {},
        "generation": {name: gen.as_dict() | {"texts": None} for name, gen in generations.items()},
        "samples": samples,
        "config": cfg.to_flat(),
    }
    headline = (
        "preference_accuracy",
        "preference_margin",
        "reward_accuracy",
        "closer_to_chosen",
        "bertscore_f1_chosen",
    )
    return finish_report(
        cfg, report, headline, start=start, finetuned_path=finetuned_path, what="preference evaluation"
    )
