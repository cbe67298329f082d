"""``ftpipe train``: fine-tune (LoRA or full) with FSDP2, FSDP1, DDP or one device, through Lightning.

Launch. With ``gpus_per_node`` devices on one machine, Lightning's subprocess launcher re-runs this
very command line (``ftpipe train ...`` or ``python -m ftpipe train ...``) for the other local ranks
when ``trainer.fit`` starts; the launching process therefore prepares the data and converts the
embedded model *before* fitting, and the re-run ranks find both ready. Under ``torchrun`` or SLURM
every rank is started by the launcher (Lightning's cluster environments detect them) and the same
code runs unchanged; data preparation then happens on rank 0 while the others wait
(``ftpipe.data.prepare``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ftpipe.config import results_root, save_config, tb_logs_dir, validate_config
from ftpipe.config.lock import acquire, release
from ftpipe.config.paths import check_output_folder
from ftpipe.config.schema import PipelineConfig
from ftpipe.distributed.devices import leave_process_group
from ftpipe.errors import StoppedResumable
from ftpipe.estimate.memory import resolve_activation_checkpointing
from ftpipe.model.load import check_4bit_support
from ftpipe.train.faults import Faults
from ftpipe.train.heartbeat import is_peer_lost, is_timeout, peer_lost_error, timeout_error
from ftpipe.train.resume import ResumeError, resolve_resume
from ftpipe.train.step import OptimizerStep
from ftpipe.utils.allocator import describe as malloc_settings
from ftpipe.utils.launch import check_launch, expect_local_processes
from ftpipe.utils.launch import current as current_launch
from ftpipe.utils.logging import get_logger, global_rank
from ftpipe.utils.world import in_group

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ftpipe.data.prepare import PreparedData

log = get_logger(__name__)


@dataclass
class TrainResult:
    """What a training run produced (the same on every rank but ``rank``).

    Attributes:
        best_checkpoint: checkpoint with the lowest val_loss (None when no validation ran).
        last_checkpoint: checkpoint of the final optimizer step.
        global_step: optimizer steps taken.
        best_val_loss: the lowest val_loss (None when no validation ran).
        metrics_path: ``metrics.jsonl`` (one line per step and per validation; written by rank 0).
        checkpoint_dir: this run's checkpoint folder.
        tb_logs_dir: this run's TensorBoard folder.
        stopped_early: True when early stopping ended the run before ``max_steps``.
        summary: throughput, padding share, MFU and peak memory per rank.
        rank: this process's global rank in training (the process group is gone afterwards).
        stopped_by_signal: a SIGTERM / SIGINT stopped training (after saving the last checkpoint).
        run_id: the run's id (its manifest is ``run-<id>.json`` in ``checkpoint_dir``).
        manifest: the run manifest's path.
    """

    best_checkpoint: str | None
    last_checkpoint: str | None
    global_step: int
    best_val_loss: float | None
    metrics_path: str
    checkpoint_dir: str | None = None
    tb_logs_dir: str | None = None
    stopped_early: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    stopped_by_signal: bool = False
    run_id: str | None = None
    manifest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_cpu_threads(cfg: PipelineConfig) -> int:
    """On the CPU, share the cores among this machine's ranks: ``cpu_count // gpus_per_node`` threads."""
    from ftpipe.runtime import accelerator_name

    if accelerator_name(cfg) != "cpu":
        return torch.get_num_threads()
    launch = current_launch()
    local_world = launch.processes_per_node if launch.external else cfg.train.gpus_per_node
    threads = max(1, (os.cpu_count() or 1) // max(1, local_world))
    torch.set_num_threads(threads)
    return threads


def _warn_torchrun_shared_store() -> None:
    """``torchrun --max-restarts N`` shares one rendezvous store across restarts by default; the restarted
    ranks then read the dead round's addresses and hang joining the process group."""
    launch = current_launch()
    if launch.shared_store and launch.max_restarts > 0 and global_rank() == 0:
        log.warning(
            "torchrun --max-restarts %d with its shared rendezvous store: restarted ranks can hang while "
            "joining the process group. Start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
            "environment, and resume_from_checkpoint auto.",
            launch.max_restarts,
        )


def _prepare_inputs(
    cfg: PipelineConfig, prepared: PreparedData | None = None
) -> tuple[PreTrainedTokenizerBase, PreparedData]:
    """The tokenizer (which converts the embedded model once) and the prepared data (prepared here unless
    handed over), before any fork."""
    from ftpipe.data.prepare import prepared_for
    from ftpipe.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    return tokenizer, prepared_for(cfg, prepared)


def train(cfg: PipelineConfig, prepared: PreparedData | None = None) -> TrainResult:
    """Fine-tune ``cfg``'s model on its data; returns where the checkpoints, logs and metrics are.

    ``prepared``: ``cfg``'s prepared data when the caller prepared it (``ftpipe run`` does, once for all
    its stages); None: training prepares it (rank 0 prepares, the other ranks wait and reuse it).
    """
    import lightning.pytorch as pl

    cfg = validate_config(cfg)
    launch = check_launch(cfg.train.num_nodes, cfg.train.gpus_per_node)  # before any data or weights
    expect_local_processes(cfg.train.gpus_per_node)
    log.info("%s", launch.describe())
    cfg = resolve_activation_checkpointing(cfg)  # the same choice on every rank: config and machine only
    # Lightning saves ``last`` into the same distributed-checkpoint folder again: expected, not a problem.
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint in", category=UserWarning)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    threads = set_cpu_threads(cfg)
    _warn_torchrun_shared_store()
    root = results_root(cfg)
    check_output_folder("results_dir", root)
    check_4bit_support(cfg)
    if cfg.train.checkpoint_dir:
        check_output_folder("checkpoint_dir", Path(cfg.train.checkpoint_dir))
    check_init_adapter(cfg)
    resume_from = resolve_resume(cfg)
    if resume_from:
        check_resume_compatible(cfg, resume_from)  # before a byte of data, config.yaml or logs is written
    # the model id and the data are checked (tokenizer, preparation) before anything is written for the run
    tokenizer, prepared = _prepare_inputs(cfg, prepared)
    locks = _lock_run_folders(cfg, root) if global_rank() == 0 else []
    try:
        return _train_locked(cfg, tokenizer, prepared, resume_from, root, threads)
    finally:
        for lock in locks:
            release(lock)


def check_init_adapter(cfg: PipelineConfig) -> None:
    """``init_adapter`` names an existing checkpoint or adapter folder (checked before anything is written)."""
    from ftpipe.model.checkpoint import CheckpointError

    path = cfg.objective.init_adapter
    if path and not Path(path).expanduser().exists():
        raise CheckpointError(
            f"init_adapter: {path} does not exist (give an SFT run's checkpoint file or folder, or an adapter "
            "folder exported with merge: false)"
        )


def _lock_run_folders(cfg: PipelineConfig, root: Path) -> list[Path]:
    """Rank 0 holds the results folder (and a ``checkpoint_dir`` outside it) while the run writes them: a
    second run into the same folders stops at once with a message naming the holder."""
    locks = [acquire(root, "results_dir", "ftpipe train")]
    if cfg.train.checkpoint_dir:
        folder = Path(cfg.train.checkpoint_dir).expanduser()
        if root.resolve() not in [folder.resolve(), *folder.resolve().parents]:
            try:
                locks.append(acquire(folder, "checkpoint_dir", "ftpipe train"))
            except BaseException:
                release(locks[0])
                raise
    return locks


def check_resume_compatible(cfg: PipelineConfig, resume_from: str) -> None:
    """The checkpoint was trained with this run's model, fine-tuning mode and LoRA shape (its run manifest
    says, else its own metadata); else a ResumeError naming each field, before anything is written."""
    from ftpipe.config.runs import resume_problems, run_of_checkpoint
    from ftpipe.model.checkpoint import read_checkpoint_meta

    manifest = run_of_checkpoint(resume_from)
    trained = (
        manifest.config if manifest is not None else read_checkpoint_meta(resume_from).get("config") or {}
    )
    problems = resume_problems(trained, cfg)
    if problems:
        raise ResumeError(
            f"resume_from_checkpoint: {resume_from} cannot continue with this configuration: "
            + "; ".join(problems)
            + ". Resume with the settings it was trained with, or start a new run (another results_dir, "
            "or no resume_from_checkpoint)"
        )


def _data_identity(prepared: PreparedData) -> dict[str, Any]:
    """The prepared data a run trained on: its folder and the hash of its manifest."""
    import hashlib

    folder = Path(prepared.folder)
    manifest = folder / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else None
    return {"prepared_dir": str(folder.resolve()), "manifest_sha256": digest, "counts": prepared.counts}


def _train_locked(
    cfg: PipelineConfig,
    tokenizer: PreTrainedTokenizerBase,
    prepared: PreparedData,
    resume_from: str | None,
    root: Path,
    threads: int,
) -> TrainResult:
    """Training proper, once the checks passed and rank 0 holds the run's folders."""
    from ftpipe.data.datamodule import SFTDataModule
    from ftpipe.objectives import get_objective
    from ftpipe.train.module import FineTuneModule
    from ftpipe.train.trainer import build_trainer

    if global_rank() == 0:
        saved = save_config(cfg, root)
        log.info(
            "resolved configuration saved to %s (%d torch thread(s) per rank; %s)",
            saved,
            threads,
            malloc_settings(),
        )

    objective = get_objective(cfg)
    if global_rank() == 0:
        log.info("%s", objective.describe())
    datamodule = SFTDataModule(cfg, tokenizer, objective, prepared=prepared)  # prepared once, above
    faults = Faults.from_config(cfg.debug)
    # the module and the step callbacks share the step's accounting
    steps = OptimizerStep(cfg.train.max_nonfinite_steps, objective.metric_names)
    module = FineTuneModule(cfg, faults, steps, objective)
    parts = build_trainer(cfg, resume_from, faults=faults, steps=steps, data=_data_identity(prepared))
    trainer = parts.trainer
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except BaseException as err:
        parts.folders.finish("failed", trainer.global_step)
        if isinstance(err, RuntimeError) and is_timeout(err):
            raise timeout_error(err, cfg.dist.process_group_timeout_s) from err
        if is_peer_lost(err) and parts.heartbeat is not None and in_group():
            raise peer_lost_error(err, parts.heartbeat.peers, trainer.global_step) from err
        raise
    parts.folders.finish(
        "stopped" if parts.stop.stopped_at_step is not None else "completed", trainer.global_step
    )

    ckpt = parts.checkpoint
    best_score = ckpt.best_model_score
    result = TrainResult(
        best_checkpoint=ckpt.best_model_path or None,
        last_checkpoint=ckpt.last_model_path or None,
        global_step=trainer.global_step,
        best_val_loss=float(best_score) if best_score is not None else None,
        metrics_path=str(parts.metrics_path),
        checkpoint_dir=ckpt.dirpath,
        tb_logs_dir=str(Path(tb_logs_dir(cfg)) / (parts.folders.version or "")),
        stopped_early=trainer.global_step < cfg.train.max_steps
        and not trainer.interrupted
        and parts.stop.stopped_at_step is None,
        summary=parts.metrics.summary,
        rank=trainer.global_rank,
        stopped_by_signal=parts.stop.stopped_at_step is not None,
        run_id=parts.folders.run_id,
        manifest=str(parts.folders.manifest.path) if parts.folders.manifest is not None else None,
    )
    log.info(
        "training done after %d step(s)%s; best checkpoint: %s (val_loss %s); last checkpoint: %s; "
        "TensorBoard: %s; metrics: %s",
        result.global_step,
        " (stopped early)" if result.stopped_early else "",
        result.best_checkpoint,
        f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a",
        result.last_checkpoint,
        result.tb_logs_dir,
        result.metrics_path,
    )
    leave_process_group()
    if result.stopped_by_signal and result.rank == 0:
        raise StoppedResumable(
            f"stopped, resumable: a stop signal ({parts.stop.signal_name or 'on another rank'}) ended "
            f"training after step {result.global_step} of {cfg.train.max_steps}; the last checkpoint is "
            f"{result.last_checkpoint}. Run the same command with --resume_from_checkpoint auto (or "
            f"that path) to continue."
        )
    return result
