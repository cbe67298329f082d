"""``ftpipe run``: prepare, train, export and evaluate in one command and one configuration.

Launch. ``ftpipe train``'s processes are started by Lightning: for local ranks > 0 its subprocess
launcher re-runs this very command line (``ftpipe run ...``) when ``trainer.fit`` starts, and under
``torchrun`` / SLURM every rank runs it. So every rank prepares (rank 0 does the work, the others
reuse it) and trains; after training, every rank leaves the process group together, ranks other than 0
return, and rank 0 exports and evaluates alone, once.

One preparation per run: the data is prepared once, here, and the prepared data goes to training and
evaluation, which prepare it themselves only when run on their own (``ftpipe train``, ``ftpipe
evaluate``). With ``sft_config`` the SFT stage prepares its own (other) data, once.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.config import results_root, validate_config
from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.launch import without_worker_variables
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    from ftpipe.data.prepare import PreparedData
    from ftpipe.evaluate.evaluate import EvalResult
    from ftpipe.train.run import TrainResult

log = get_logger(__name__)


@dataclass
class RunResult:
    """What ``ftpipe run`` produced (rank 0).

    Attributes:
        data_dir: the prepared data folder.
        checkpoint: the exported checkpoint.
        checkpoint_dir: the run's checkpoint folder.
        model_dir: the exported model.
        report_md: the Markdown report.
        report_json: eval_report.json.
        backend: the generation backend of the evaluation.
        base: headline scores of the base model.
        finetuned: headline scores of the fine-tuned model.
        seconds: wall time of each stage and in all.
    """

    data_dir: str
    checkpoint: str
    checkpoint_dir: str | None
    model_dir: str
    report_md: str
    report_json: str
    backend: str
    base: dict[str, float]
    finetuned: dict[str, float]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _use_all_cores() -> None:
    """After training (whose ranks shared the cores, and left the process group together), rank 0
    works alone."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))


def run(cfg: PipelineConfig) -> RunResult | None:
    """The whole pipeline on ``cfg``; returns the result on rank 0 and None on the other ranks."""
    from ftpipe.data.prepare import prepare_data
    from ftpipe.export.export import check_export_target
    from ftpipe.train.run import train

    cfg = validate_config(cfg)
    check_export_target(cfg)  # a foreign export_dir stops the run before training, not after it
    seconds: dict[str, float] = {}
    start = time.monotonic()
    if cfg.objective.sft_config:  # SFT, then the preference stage continues its adapter
        from ftpipe.train.sft_first import train_sft_first

        cfg = train_sft_first(cfg)
        seconds["sft"] = time.monotonic() - start
    mark = time.monotonic()
    prepared = prepare_data(cfg)  # the one preparation of this run: every stage below takes it
    seconds["prepare"] = time.monotonic() - mark

    mark = time.monotonic()
    trained = train(cfg, prepared)
    seconds["train"] = time.monotonic() - mark
    if trained.rank != 0:
        log.info("training done on this rank; rank 0 exports and evaluates")
        return None
    _use_all_cores()

    with without_worker_variables():
        return _export_and_evaluate(cfg, prepared, trained, seconds, start)


class ExportNotUsable(FtpipeError):
    """``export_dir`` names a folder that cannot be evaluated as the run's fine-tuned model."""


def finetuned_model_path(cfg: PipelineConfig) -> str:
    """The fine-tuned model to evaluate: ``export_dir`` when it is set (it must exist, hold a merged model
    and be the export of the checkpoint meant), else ``<results_root>/export/merged``, exported (again)
    from the checkpoint when it is missing or stale (from another run or checkpoint than the one meant)."""
    from ftpipe.export.export import default_export_dir, export_model, read_export_info, stale_export

    if cfg.export.export_dir:
        folder = Path(cfg.export.export_dir).expanduser()
        if not folder.exists():
            raise ExportNotUsable(
                f"export_dir: {folder} does not exist. Export first (`ftpipe export --export_dir {folder}`), "
                "or leave export_dir unset to evaluate the run's own export (made when missing)"
            )
        if not (folder / "config.json").is_file():
            raise ExportNotUsable(
                f"export_dir: {folder} holds no merged model (no config.json); give the folder of a merged "
                "export (`ftpipe export` without --no_merge), or leave export_dir unset"
            )
        info = read_export_info(folder)
        reason = stale_export(cfg, folder) if info is not None and info.get("run_id") else None
        if reason:
            raise ExportNotUsable(
                f"export_dir: {folder} is not the model asked about: {reason}. Export again "
                f"(`ftpipe export --export_dir {folder}`), or set run_id / checkpoint to what it was made from"
            )
        return str(folder)
    merged = results_root(cfg) / "export" / "merged"
    if (merged / "config.json").is_file():
        reason = stale_export(cfg, merged)
        if reason is None:
            return str(merged)
        log.info("the export at %s is stale (%s): exporting the checkpoint again", merged, reason)
    else:
        log.info("no merged export at %s: exporting the checkpoint first", merged)
    return export_model(
        cfg.replace(merge=True, export_dir=str(default_export_dir(cfg.replace(export_dir=None), "merged")))
    ).path


def evaluate_model(
    cfg: PipelineConfig, finetuned_path: str | None = None, prepared: PreparedData | None = None
) -> EvalResult:
    """``ftpipe evaluate``: the fine-tuned model against the base on the test split.

    The model is ``finetuned_path``, else the merged export (exported first when missing, after the
    report folder, the device, the data and its test split are checked); the export's model card gets
    the evaluation table. ``prepared``: ``cfg``'s prepared data when the caller has it (``ftpipe run``);
    None: prepared (or found prepared) here, once.
    """
    from ftpipe.evaluate.common import prepared_for_evaluation
    from ftpipe.evaluate.evaluate import evaluate, rows_to_score
    from ftpipe.export.card import update_evaluation

    cfg = validate_config(cfg)
    prepared = prepared_for_evaluation(cfg, prepared)
    if finetuned_path is None:
        rows_to_score(cfg, prepared)  # what would stop the evaluation stops it before an export is written
        finetuned_path = finetuned_model_path(cfg)
    result = evaluate(cfg, finetuned_path, prepared)
    if Path(finetuned_path).is_dir():  # an export with its model card: the table goes in
        update_evaluation(
            finetuned_path, {"base": result.base, "finetuned": result.finetuned}, result.num_samples
        )
    return result


def _export_and_evaluate(
    cfg: PipelineConfig,
    prepared: PreparedData,
    trained: TrainResult,
    seconds: dict[str, float],
    start: float,
) -> RunResult:
    """Rank 0 after training: export the checkpoint, evaluate, log where everything is."""
    from ftpipe.export.export import export_model
    from ftpipe.train.tracking import log_evaluation

    mark = time.monotonic()
    checkpoint = cfg.export.checkpoint
    if checkpoint == "best":
        checkpoint = trained.best_checkpoint or trained.last_checkpoint or checkpoint
    elif checkpoint == "last":
        checkpoint = trained.last_checkpoint or checkpoint
    cfg = cfg.replace(checkpoint=checkpoint)
    exported = export_model(cfg)
    seconds["export"] = time.monotonic() - mark

    mark = time.monotonic()
    evaluated = evaluate_model(cfg, None if exported.kind == "adapter" else exported.path, prepared)
    seconds["evaluate"] = time.monotonic() - mark
    report_files = [Path(evaluated.report_md), Path(evaluated.report_json), *map(Path, evaluated.plots)]
    log_evaluation(
        cfg, trained.checkpoint_dir, {"base": evaluated.base, "finetuned": evaluated.finetuned}, report_files
    )
    seconds["total"] = time.monotonic() - start

    result = RunResult(
        data_dir=str(prepared.folder),
        checkpoint=exported.checkpoint,
        checkpoint_dir=trained.checkpoint_dir,
        model_dir=exported.path,
        report_md=evaluated.report_md,
        report_json=evaluated.report_json,
        backend=evaluated.backend,
        base=evaluated.base,
        finetuned=evaluated.finetuned,
        seconds=seconds,
    )
    scores = "\n".join(
        f"  {name:<13} base {result.base.get(name, float('nan')):.4f}  fine-tuned {value:.4f}"
        for name, value in result.finetuned.items()
    )
    log.info(
        "ftpipe run done in %.0fs (prepare %.0fs, train %.0fs, export %.0fs, evaluate %.0fs)\n"
        "  data:        %s\n  checkpoints: %s\n  model:       %s (%s)\n  report:      %s\n"
        "  scores (%s, %d test samples):\n%s",
        seconds["total"],
        seconds["prepare"],
        seconds["train"],
        seconds["export"],
        seconds["evaluate"],
        result.data_dir,
        result.checkpoint_dir,
        result.model_dir,
        exported.kind,
        result.report_md,
        result.backend,
        evaluated.num_samples,
        scores,
    )
    return result
