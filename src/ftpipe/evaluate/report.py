"""The evaluation report: ``eval_report.json``, ``report.md`` and the training-curve plots.

The plots (loss, val_loss, learning rate per optimizer step) are read from the run's
``metrics.jsonl`` (one JSON object per line: step records with ``loss`` and ``lr``, validation
records with ``val_loss``) and drawn with matplotlib's Agg backend into PNG files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

REPORT_JSON = "eval_report.json"
REPORT_MD = "report.md"
#: (metric key, label, higher is better) in the before/after table.
TABLE_ROWS = (
    ("bertscore_f1", "BERTScore F1", True),
    ("rougeL_f1", "ROUGE-L F1", True),
    ("exact_match", "Exact match", True),
    ("tool_call_parsed", "Tool calls that parse", True),
    ("tool_call_name", "Tool calls naming the right function", True),
    ("tool_call_exact", "Exact tool calls (name and arguments)", True),
    ("loss", "Test loss", False),
    ("perplexity", "Test perplexity", False),
    ("preference_accuracy", "Preference accuracy (avg log-prob: chosen above rejected)", True),
    ("preference_margin", "Mean margin (avg log-prob, chosen - rejected)", True),
    ("reward_accuracy", "Reward accuracy (implicit reward vs the base model)", True),
    ("reward_margin", "Mean reward margin (implicit reward vs the base model)", True),
    ("closer_to_chosen", "Generations closer to chosen than rejected (BERTScore)", True),
    ("bertscore_f1_chosen", "BERTScore F1 to chosen", True),
    ("bertscore_f1_rejected", "BERTScore F1 to rejected", False),
)
#: rows shown only when the test split has samples they apply to.
OPTIONAL_ROWS = frozenset(
    {
        "tool_call_parsed",
        "tool_call_name",
        "tool_call_exact",
        "loss",
        "perplexity",
        "preference_accuracy",
        "preference_margin",
        "reward_accuracy",
        "reward_margin",
        "closer_to_chosen",
        "bertscore_f1_chosen",
        "bertscore_f1_rejected",
    }
)
#: (metrics.jsonl key, plot file, title).
CURVES = (
    ("loss", "loss.png", "Training loss"),
    ("val_loss", "val_loss.png", "Validation loss"),
    ("lr", "lr.png", "Learning rate"),
    ("rewards/accuracies", "reward_accuracy.png", "Reward accuracy (training)"),
    ("val_reward_accuracy", "val_reward_accuracy.png", "Reward accuracy (validation)"),
)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (empty when it does not exist; bad lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def curve(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in metrics records; the last value wins for a repeated step."""
    points: dict[int, float] = {}
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, int | float) and isinstance(step, int | float) and math.isfinite(value):
            points[int(step)] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_curves(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One PNG per curve with at least one point; returns the files written."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    for key, name, title in CURVES:
        steps, values = curve(records, key)
        if not steps:
            log.info("no %s in the training metrics: no %s plot", key, name)
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        target = folder / name
        fig.savefig(target)
        plt.close(fig)
        written.append(target)
    return written


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return str(value)


def markdown_report(report: dict[str, Any], plots: list[Path]) -> str:
    """The human-readable report: before/after table, generation details, examples and plots."""
    agg = report["aggregates"]
    base, tuned = agg["base"], agg["finetuned"]
    lines = [
        "# ftpipe evaluation report",
        "",
        f"- base model: `{report['models']['base']}`",
        f"- fine-tuned model: `{report['models']['finetuned']}`",
        f"- test samples: {report['num_samples']} (from `{report['test_file']}`)",
        f"- generation backend: **{report['backend']}** (eval_backend {report['settings']['eval_backend']}), "
        f"temperature {report['settings']['temperature']}, top_p {report['settings']['top_p']}, "
        f"max_new_tokens {report['settings']['max_new_tokens']}",
        f"- BERTScore model: `{report['bertscore_model']}` (layer {report['bertscore_num_layers']})",
        "",
        "## Before / after",
        "",
        "| Metric | Base | Fine-tuned | Change |",
        "|---|---:|---:|---:|",
    ]
    for key, label, higher_better in TABLE_ROWS:
        b, t = base.get(key), tuned.get(key)
        if key in OPTIONAL_ROWS and b is None and t is None:
            continue
        change = "n/a"
        if isinstance(b, float) and isinstance(t, float) and math.isfinite(b) and math.isfinite(t):
            better = (t > b) if higher_better else (t < b)
            change = f"{t - b:+.4f}" + (" ✓" if better else "")
        lines.append(f"| {label} | {_fmt(b)} | {_fmt(t)} | {change} |")
    if report.get("num_tool_call_samples"):
        lines += [
            "",
            f"Tool-call scores are over the {report['num_tool_call_samples']} test samples whose reference "
            "answer is a tool call.",
        ]
    per_source = report.get("per_source") or {}
    if per_source:
        metrics = [
            (k, label)
            for k, label, _ in TABLE_ROWS
            if k not in ("loss", "perplexity")
            and any(k in s for scores in per_source.values() for s in scores.values())
        ]
        lines += [
            "",
            "## Per source",
            "",
            "| Source | Samples | "
            + " | ".join(f"{label} (base → fine-tuned)" for _, label in metrics)
            + " |",
            "|---|---:|" + "---:|" * len(metrics),
        ]
        for source, tuned_scores in per_source["finetuned"].items():
            base_scores = per_source["base"].get(source, {})
            cells = [f"{_fmt(base_scores.get(k))} → {_fmt(tuned_scores.get(k))}" for k, _ in metrics]
            lines.append(f"| {source} | {tuned_scores['num_samples']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Timings",
        "",
        "| Model | Generation (s) | Tokens generated | Tokens/s |",
        "|---|---:|---:|---:|",
    ]
    for name in ("base", "finetuned"):
        g = report["generation"][name]
        lines.append(
            f"| {name} | {g['total_seconds']:.1f} | {g['generated_tokens']} | {g['tokens_per_second']:.1f} |"
        )
    if plots:
        lines += ["", "## Training curves", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Examples", ""]
    for sample in report["samples"][:5]:
        lines += [
            f"**Prompt {sample['index']}:** {sample['prompt_text'].strip()[:500]}",
            "",
            *(
                [
                    f"- chosen: {sample['chosen'].strip()[:500]}",
                    f"- rejected: {sample['rejected'].strip()[:500]}",
                ]
                if "chosen" in sample
                else [f"- reference: {sample['reference'].strip()[:500]}"]
            ),
            f"- base: {sample['base']['prediction'].strip()[:500]}",
            f"- fine-tuned: {sample['finetuned']['prediction'].strip()[:500]}",
            "",
        ]
    return "\n".join(lines) + "\n"


def write_report(
    report: dict[str, Any], folder: str | os.PathLike, metrics_path: str | os.PathLike
) -> dict[str, Any]:
    """Write eval_report.json, the plots and report.md into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(read_metrics(metrics_path), folder)
    report = {**report, "plots": [str(p) for p in plots], "metrics_file": str(metrics_path)}
    json_path = folder / REPORT_JSON
    json_path.write_text(
        json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
    )
    md_path = folder / REPORT_MD
    md_path.write_text(markdown_report(report, plots), encoding="utf-8")
    return {"json": str(json_path), "markdown": str(md_path), "plots": [str(p) for p in plots]}
