"""What both evaluations (supervised and preference) share: the result, the errors, the rows to score,
the report folder and how a generated answer is read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.config import results_root
from ftpipe.config.paths import check_output_folder
from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError

if TYPE_CHECKING:
    from ftpipe.data.prepare import PreparedData

METRICS_FILENAME = "metrics.jsonl"


class EvaluationError(FtpipeError, RuntimeError):
    """Evaluation cannot run; the message says what to change."""


@dataclass
class EvalResult:
    """Where the report is and the headline scores.

    Attributes:
        report_json: ``eval_report.json``.
        report_md: ``report.md``.
        backend: generation backend that ran (``vllm`` or ``transformers``).
        num_samples: test rows scored.
        base: aggregate scores of the base model (metric -> value).
        finetuned: aggregate scores of the fine-tuned model.
        plots: training-curve PNGs.
        seconds: how long the evaluation took.
        finetuned_path: the fine-tuned model that was scored.
    """

    report_json: str
    report_md: str
    backend: str
    num_samples: int
    base: dict[str, float]
    finetuned: dict[str, float]
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0
    finetuned_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def eval_dir(cfg: PipelineConfig) -> Path:
    """``eval_dir`` when set, else ``<results_root>/eval``."""
    if cfg.eval.eval_dir:
        return Path(cfg.eval.eval_dir).expanduser()
    return results_root(cfg) / "eval"


def prepared_for_evaluation(cfg: PipelineConfig, prepared: PreparedData | None = None) -> PreparedData:
    """The prepared data to score, after the checks that would stop the evaluation (the report folder can
    be written, the ``accelerator``'s device is there): ``prepared`` when an earlier stage hands it over,
    else prepared (or found prepared) here."""
    from ftpipe.data.prepare import prepared_for
    from ftpipe.evaluate.device import evaluation_device

    check_output_folder("eval_dir" if cfg.eval.eval_dir else "results_dir", eval_dir(cfg))
    evaluation_device(cfg.dist.accelerator)
    return prepared_for(cfg, prepared)


def rows_to_score(
    cfg: PipelineConfig, prepared: PreparedData | None = None
) -> tuple[Path, list[dict[str, Any]]]:
    """The prepared test split and its rows to score (the first ``max_eval_samples``), after the checks of
    ``prepared_for_evaluation`` (which prepares the data unless ``prepared`` is given); an EvaluationError
    when there is nothing to score."""
    from ftpipe.data.prepare import read_jsonl

    prepared = prepared_for_evaluation(cfg, prepared)
    rows = read_jsonl(prepared.test_file)
    if cfg.eval.max_eval_samples is not None:
        rows = rows[: cfg.eval.max_eval_samples]
    if not rows:
        raise EvaluationError(
            f"the test split {prepared.test_file} is empty: set test_ratio above 0 (and max_eval_samples >= 1)"
        )
    return prepared.test_file, rows


def answer_text(generated: str) -> str:
    """A generated answer as the text scores compare it with the reference: without its leading reasoning
    trace, and with its tool calls (when they parse) written as the reference writes them, one
    ``{"name": ..., "arguments": ...}`` object per line after the text."""
    import json

    from ftpipe.data.chat import split_think
    from ftpipe.evaluate.toolcalls import TOOL_CALL_BLOCK, parse_tool_calls

    try:
        answer = split_think(generated, "answer")[1]
    except ValueError:  # an unclosed trace: the answer never came
        return ""
    calls, parsed = parse_tool_calls(answer)
    if not parsed:
        return answer
    text = TOOL_CALL_BLOCK.sub("", answer).strip()
    text = "" if text.startswith(("{", "[")) else text  # a bare JSON call is the call itself
    return "\n".join([t for t in [text] if t] + [json.dumps(c, ensure_ascii=False) for c in calls])


def finish_report(
    cfg: PipelineConfig,
    report: dict[str, Any],
    headline: tuple[str, ...],
    *,
    start: float,
    finetuned_path: str,
    what: str,
) -> EvalResult:
    """Write ``report`` (JSON, markdown, plots) into the evaluation folder, log the headline scores base ->
    fine-tuned, and return the result (``what`` names the evaluation in the log)."""
    import time

    from ftpipe.evaluate.report import write_report
    from ftpipe.utils.logging import get_logger

    aggregates = report["aggregates"]
    report["timings"] = {"total_seconds": time.monotonic() - start}
    paths = write_report(report, eval_dir(cfg), results_root(cfg) / METRICS_FILENAME)
    result = EvalResult(
        report_json=paths["json"],
        report_md=paths["markdown"],
        backend=report["backend"],
        num_samples=report["num_samples"],
        base={k: aggregates["base"][k] for k in headline if aggregates["base"].get(k) is not None},
        finetuned={
            k: aggregates["finetuned"][k] for k in headline if aggregates["finetuned"].get(k) is not None
        },
        plots=paths["plots"],
        seconds=time.monotonic() - start,
        finetuned_path=finetuned_path,
    )
    get_logger("ftpipe.evaluate").info(
        "%s (%s, %d samples) in %.0fs: %s; report: %s",
        what,
        result.backend,
        result.num_samples,
        result.seconds,
        ", ".join(
            f"{k} {result.base.get(k, float('nan')):.4f} -> {v:.4f}" for k, v in result.finetuned.items()
        ),
        result.report_md,
    )
    return result
