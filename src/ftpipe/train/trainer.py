"""Building the Lightning Trainer: strategy, precision, validation cadence, callbacks and logger.

Validation cadence: Lightning counts ``val_check_interval`` in training *batches* (micro-batches)
when ``check_val_every_n_epoch=None``, over epochs; ``val_check_interval`` optimizer steps are
therefore ``val_check_interval * accumulate_grad_batches`` batches. The training loader drops
incomplete batches, and an epoch whose batch count is not a multiple of the accumulation ends with a
shorter step (the loss normalisation counts its tokens, so that step is still a token mean); a
warning says when this shifts the validation points off whole steps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, EarlyStopping, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger

from ftpipe.compat import check_lightning_release
from ftpipe.config.paths import checkpoints_dir, results_root, run_version, tb_logs_dir
from ftpipe.config.schema import PipelineConfig
from ftpipe.train.atomic import CheckpointRoom
from ftpipe.train.callbacks import (
    CHECKPOINT_FILENAME,
    BestAndLastCheckpoint,
    RunFolders,
    ShardReport,
    StepMetrics,
)
from ftpipe.train.faults import NO_FAULTS, Faults
from ftpipe.train.heartbeat import Heartbeat
from ftpipe.train.profile import StepProfiler
from ftpipe.train.resume import RngStates
from ftpipe.train.step import OptimizerStep
from ftpipe.train.stop import GracefulStop
from ftpipe.train.tracking import Tracking, build_loggers, read_tracking
from ftpipe.utils.logging import adopt_library_loggers, get_logger

log = get_logger(__name__)

METRICS_FILENAME = "metrics.jsonl"


@dataclass
class TrainerParts:
    """The Trainer and the callbacks that ``train`` reads after fitting."""

    trainer: pl.Trainer
    checkpoint: BestAndLastCheckpoint
    metrics: StepMetrics
    folders: RunFolders
    logger: TensorBoardLogger
    metrics_path: Path
    stop: GracefulStop
    heartbeat: Heartbeat | None = None


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run, across epochs: optimizer steps (``global_step``) against ``max_steps``,
    with rate and time left; a resumed run starts at its step. ``refresh_rate`` counts optimizer steps.
    Validation runs without a bar of its own."""

    def init_validation_tqdm(self):
        bar = super().init_validation_tqdm()
        bar.disable = True
        return bar

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's training bar (its settings), in optimizer steps from the run's step to max_steps (a
        resumed run's rate counts its own steps only)."""
        trainer = self.trainer
        return Tqdm(
            desc="training",
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,
            unit="step",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        """Nothing: the bar counts the run's optimizer steps, an epoch does not start it again."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if step == bar.n or not self.is_enabled:  # within an accumulation: no new optimizer step yet
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # redraws the bar too

    def on_train_end(self, trainer: pl.Trainer, *args) -> None:
        bar = self.train_progress_bar
        if self.is_enabled and bar.n != trainer.global_step:  # stopped between two refreshes
            bar.n = trainer.global_step
            bar.refresh()
        super().on_train_end(trainer, *args)


def progress_refresh_rate(steps: int, stream: TextIO | None = None) -> int:
    """Optimizer steps between progress-bar updates: every step on a terminal (the bar redraws its line),
    about eight updates in all when the output goes to a file or a pipe (each update is a line there)."""
    stream = stream if stream is not None else sys.stdout
    return 1 if stream.isatty() else max(1, steps // 8)


class EpochAlignmentCheck(Callback):
    """Warns when an epoch's batch count is not a multiple of ``accumulate_grad_batches`` while the run
    spans several epochs (validation then falls between whole optimizer steps)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batches, acc = trainer.num_training_batches, trainer.accumulate_grad_batches
        if acc > 1 and batches != float("inf") and batches % acc:
            steps_per_epoch = -(-int(batches) // acc)
            if trainer.max_steps > steps_per_epoch:
                log.warning(
                    "%d training batches per epoch is not a multiple of accumulate_grad_batches %d: "
                    "each epoch ends with a step of %d micro-batch(es), and validation (every %d batches) "
                    "drifts off whole optimizer steps after the first epoch",
                    int(batches),
                    acc,
                    int(batches) % acc,
                    trainer.val_check_batch,
                )


def resumed_version(cfg: PipelineConfig, resume_from: str | None) -> int | None:
    """N when ``resume_from`` lies in ``<checkpoints_dir>/version_<N>/``: the resumed run continues that
    run (its TensorBoard version and its checkpoint folder) instead of starting version N+1."""
    if not resume_from or cfg.train.checkpoint_dir:
        return None
    parent = Path(resume_from).expanduser().resolve().parent
    if parent.parent != checkpoints_dir(cfg).expanduser().resolve():
        return None
    return run_version(parent)


def build_logger(cfg: PipelineConfig, resume_from: str | None = None) -> TensorBoardLogger:
    """TensorBoard logs in ``tb_logs_dir(cfg)/version_<N>`` (a resumed run keeps its N)."""
    return TensorBoardLogger(
        save_dir=str(tb_logs_dir(cfg)),
        name="",
        version=resumed_version(cfg, resume_from),
        default_hp_metric=False,
    )


def build_callbacks(
    cfg: PipelineConfig,
    precision: str,
    metrics_path: Path,
    version_source: TensorBoardLogger | None = None,
    faults: Faults = NO_FAULTS,
    *,
    steps: OptimizerStep,
    resume_from: str | None = None,
    data: dict | None = None,
) -> tuple[list[Callback], BestAndLastCheckpoint, StepMetrics, RunFolders]:
    """Checkpointing (best val_loss + last step), early stopping, step metrics, progress bar (the
    module logs train_loss, lr and grad_norm itself), and the stop on SIGTERM / SIGINT; ``faults`` go to
    the callbacks that inject them, ``steps`` (the module's step accounting) to those that act on step
    boundaries."""
    t = cfg.train
    fixed_dir = t.checkpoint_dir
    monitor, mode = monitored_metric(cfg)
    checkpoint = BestAndLastCheckpoint(
        # RunFolders adds the run's version folder in setup, unless checkpoint_dir fixes the folder
        dirpath=str(Path(fixed_dir).expanduser()) if fixed_dir else str(checkpoints_dir(cfg)),
        filename=CHECKPOINT_FILENAME
        if monitor == "val_loss"
        else f"{CHECKPOINT_FILENAME}-{monitor}={{{monitor}:.4f}}",
        auto_insert_metric_name=False,
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
        save_on_train_epoch_end=False,
        # names are the run's own (``<run id>-...``): a resumed run writes its ``last`` again under its name,
        # never ``last-v1`` beside it (which ``last`` would then be?)
        enable_version_counter=False,
        faults=faults,
    )
    metrics = StepMetrics(metrics_path, t.peak_tflops_per_device, precision, steps)
    folders = RunFolders(
        None if fixed_dir else checkpoints_dir(cfg),
        checkpoint,
        version_source,
        cfg=cfg,
        resume_from=resume_from,
        data=data,
    )
    callbacks: list[Callback] = [
        folders,
        metrics,
        StepProgressBar(refresh_rate=progress_refresh_rate(t.max_steps)),
        checkpoint,
    ]
    if t.early_stopping_patience > 0:
        callbacks.append(
            EarlyStopping(
                monitor=monitor,
                mode=mode,
                patience=t.early_stopping_patience,
                min_delta=t.early_stopping_min_delta,
                check_finite=True,
                check_on_train_epoch_end=False,
                verbose=True,
                log_rank_zero_only=True,
            )
        )
    if faults.shard_report_dir is not None:
        callbacks.append(ShardReport(faults.shard_report_dir))
    callbacks.append(EpochAlignmentCheck())
    callbacks.append(GracefulStop(steps, faults=faults))
    callbacks.append(Heartbeat(steps, faults))
    callbacks.append(RngStates())
    callbacks.append(CheckpointRoom(lambda: checkpoint.dirpath))
    callbacks.append(Tracking(cfg, lambda: checkpoint.dirpath, metrics_path))
    if t.profile_dir is not None:
        callbacks.append(StepProfiler(t.profile_dir))
    return callbacks, checkpoint, metrics, folders


def monitored_metric(cfg: PipelineConfig) -> tuple[str, str]:
    """The validation metric that picks the best checkpoint and drives early stopping, and its mode."""
    monitor = cfg.objective.monitor
    if monitor == "val_reward_accuracy":
        return monitor, "max"
    return "val_loss", "min"


def build_trainer(
    cfg: PipelineConfig,
    resume_from: str | None = None,
    *,
    faults: Faults = NO_FAULTS,
    steps: OptimizerStep,
    data: dict | None = None,
) -> TrainerParts:
    """The Trainer of ``cfg``: strategy and accelerator from ``ftpipe.distributed``, precision from the
    hardware, ``max_steps`` optimizer steps, validation every ``val_check_interval`` steps."""
    from ftpipe.distributed import build_strategy, cluster_environment, discover_decoder_layer_classes
    from ftpipe.runtime import accelerator_name, select_precision

    adopt_library_loggers()
    check_lightning_release()
    t = cfg.train
    accelerator = accelerator_name(cfg)
    precision = select_precision(cfg)
    layer_classes = discover_decoder_layer_classes(cfg) if cfg.dist.strategy == "fsdp1" else set()
    strategy = build_strategy(cfg, layer_classes)
    metrics_path = results_root(cfg) / METRICS_FILENAME
    previous = read_tracking(Path(resume_from).expanduser().parent if resume_from else None)
    loggers = build_loggers(cfg, resumed_version(cfg, resume_from), previous)
    # the TensorBoard logger numbers the runs (version_<N>), attached or not
    logger = next((lg for lg in loggers if isinstance(lg, TensorBoardLogger)), None) or build_logger(
        cfg, resume_from
    )
    callbacks, checkpoint, metrics, folders = build_callbacks(
        cfg, precision, metrics_path, logger, faults, steps=steps, resume_from=resume_from, data=data
    )
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=t.gpus_per_node,
        num_nodes=t.num_nodes,
        strategy=strategy,
        plugins=[env] if (env := cluster_environment()) is not None else None,
        precision=precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        # clipping is part of the step's end (FineTuneModule.on_before_optimizer_step, OptimizerStep.complete)
        gradient_clip_val=None,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if t.limit_val_batches is not None else 1.0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(results_root(cfg)),
        deterministic=True if accelerator == "cpu" else None,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the data module shards (a stateful loader must not be re-created)
        benchmark=False,
    )
    stop = next(c for c in callbacks if isinstance(c, GracefulStop))
    heartbeat = next(c for c in callbacks if isinstance(c, Heartbeat))
    return TrainerParts(trainer, checkpoint, metrics, folders, logger, metrics_path, stop, heartbeat)
