"""``ftpipe evaluate``: the base model and the fine-tuned model side by side on the test split.

For the (first ``max_eval_samples``) rows of the prepared test split: prompts built exactly as in
training (``build_prompts``), answers generated with vLLM when installed (else transformers),
BERTScore / ROUGE-L / exact match against each row's reference answer, and loss / perplexity of the
reference answers (``encode_example``, as training encodes them). The same for the base model and
the fine-tuned one (a model folder the caller gives; ``ftpipe evaluate`` finds or makes the merged
export first, see ``ftpipe.pipeline.evaluate_model``). Written to
``<results_root>/eval/``: ``eval_report.json`` and ``report.md`` with the training curves.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ftpipe.config import validate_config
from ftpipe.config.schema import PipelineConfig
from ftpipe.evaluate.common import (  # part of this module's interface
    EvalResult,
    answer_text,
    finish_report,
    rows_to_score,
)
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    from ftpipe.data.prepare import PreparedData

log = get_logger(__name__)

HEADLINE = (
    "bertscore_f1",
    "rougeL_f1",
    "exact_match",
    "tool_call_parsed",
    "tool_call_name",
    "tool_call_exact",
    "loss",
    "perplexity",
)


def _loss(model_path: str, examples: list[tuple[list[int], list[int]]], cfg: PipelineConfig, pad_id: int):
    import torch
    from transformers import AutoModelForCausalLM

    from ftpipe.evaluate.device import device_and_dtype
    from ftpipe.evaluate.metrics import loss_and_perplexity

    device, dtype = device_and_dtype(cfg.dist.accelerator)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
    ).to(device)
    try:
        return loss_and_perplexity(model, examples, cfg.eval.eval_batch_size, pad_token_id=pad_id)
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _score_model(
    name: str, model_path: str, prompts, references, tool_refs, examples, cfg: PipelineConfig, pad_id: int
):
    from ftpipe.evaluate.generate import GenerationSettings, generate
    from ftpipe.evaluate.metrics import MetricSettings, score
    from ftpipe.evaluate.toolcalls import score_tool_calls

    log.info("evaluating the %s model %s", name, model_path)
    generated = generate(
        model_path, prompts, GenerationSettings.from_config(cfg), backend=cfg.eval.eval_backend
    )
    scores = score([answer_text(t) for t in generated.texts], references, MetricSettings.from_config(cfg))
    tools = score_tool_calls(generated.texts, tool_refs)
    if tools["num_samples"]:
        full = {metric: [None] * len(prompts) for metric in tools["per_sample"]}
        for metric, values in tools["per_sample"].items():
            for i, value in zip(tools["indices"], values, strict=True):
                full[metric][i] = value
        scores["per_sample"].update(full)
        scores["mean"].update(tools["mean"])
    loss = _loss(model_path, examples, cfg, pad_id) if examples else None
    return generated, scores, loss


def per_source_scores(sources: list[str | None], per_sample: dict[str, list]) -> dict[str, dict[str, Any]]:
    """Mean of every per-sample score within each source (samples without a score left out)."""
    import statistics

    out: dict[str, dict[str, Any]] = {}
    for source in dict.fromkeys(s or "unknown" for s in sources):
        members = [i for i, s in enumerate(sources) if (s or "unknown") == source]
        scores: dict[str, Any] = {"num_samples": len(members)}
        for metric, values in per_sample.items():
            present = [values[i] for i in members if values[i] is not None]
            if present:
                scores[metric] = statistics.fmean(present)
        out[source] = scores
    return out


def evaluate(cfg: PipelineConfig, finetuned_path: str, prepared: PreparedData | None = None) -> EvalResult:
    """Score the base model and the fine-tuned model in ``finetuned_path`` (a Hugging Face folder) on the
    test split; write the report in ``results_root/eval``. Which model that is, and whether it must be
    exported first, is the caller's choice (``ftpipe.pipeline.evaluate_model``). ``prepared``: ``cfg``'s
    prepared data when the caller has it; None: prepared (or found prepared) here."""
    from ftpipe.data.tokenize import encode_example, reference_output, reference_tool_calls
    from ftpipe.evaluate.generate import build_prompts
    from ftpipe.model.embedded import resolve_model_path
    from ftpipe.model.tokenizer import check_tokenizer_files, load_tokenizer

    start = time.monotonic()
    cfg = validate_config(cfg)
    check_tokenizer_files(finetuned_path, "export_dir" if cfg.export.export_dir else "the fine-tuned model")
    if cfg.objective.objective != "sft":
        from ftpipe.evaluate.preference import evaluate_preferences

        return evaluate_preferences(cfg, finetuned_path, prepared)
    test_file, rows = rows_to_score(cfg, prepared)
    tokenizer = load_tokenizer(cfg.model)
    prompts = build_prompts(tokenizer, rows, cfg.data)
    references = [reference_output(row) for row in rows]
    tool_refs = [reference_tool_calls(row) for row in rows]
    sources = [row.get("source") for row in rows]
    encoded = [encode_example(tokenizer, row, cfg.data) for row in rows]
    examples = [(e.input_ids, e.labels) for e in encoded if e is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    models = {
        "base": resolve_model_path(cfg.model.hf_model_id, cfg.model.model_cache_dir),
        "finetuned": finetuned_path,
    }
    results = {
        name: _score_model(name, path, prompts, references, tool_refs, examples, cfg, pad_id)
        for name, path in models.items()
    }
    backend = results["finetuned"][0].backend

    aggregates: dict[str, dict[str, Any]] = {}
    for name, (_, scores, loss) in results.items():
        aggregates[name] = {
            **scores["mean"],
            "loss": loss.loss if loss else None,
            "perplexity": loss.perplexity if loss else None,
            "loss_tokens": loss.num_tokens if loss else 0,
        }
    samples = []
    for i, row in enumerate(rows):
        sample = {
            "index": i,
            "id": row.get("id"),
            "source": row.get("source"),
            "prompt_text": tokenizer.decode(prompts[i], skip_special_tokens=False),
            "prompt_tokens": len(prompts[i]),
            "reference": references[i],
            "reference_tool_calls": tool_refs[i],
        }
        for name, (gen, scores, _) in results.items():
            sample[name] = {
                "prediction": gen.texts[i],
                "tokens": gen.token_counts[i],
                **{metric: values[i] for metric, values in scores["per_sample"].items()},
            }
        samples.append(sample)
    first_scores = results["base"][1]
    report = {
        "backend": backend,
        "models": models,
        "test_file": str(test_file),
        "num_samples": len(rows),
        "num_loss_samples": len(examples),
        "bertscore_model": first_scores["bertscore_model"],
        "bertscore_num_layers": first_scores["bertscore_num_layers"],
        "settings": {
            "eval_backend": cfg.eval.eval_backend,
            "temperature": cfg.eval.temperature,
            "top_p": cfg.eval.top_p,
            "max_new_tokens": cfg.eval.max_new_tokens,
            "eval_seed": cfg.eval.eval_seed,
        },
        "aggregates": aggregates,
        "num_tool_call_samples": sum(1 for ref in tool_refs if ref),
        "per_source": (
            {
                name: per_source_scores(sources, scores["per_sample"])
                for name, (_, scores, _) in results.items()
            }
            if len(set(sources)) > 1
            else {}
        ),
        "generation": {name: gen.as_dict() | {"texts": None} for name, (gen, _, _) in results.items()},
        "samples": samples,
        "config": cfg.to_flat(),
    }
    return finish_report(cfg, report, HEADLINE, start=start, finetuned_path=finetuned_path, what="evaluation")
