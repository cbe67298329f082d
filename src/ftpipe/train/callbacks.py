"""Callbacks of the training loop: per-step throughput, MFU and memory, ``metrics.jsonl``, the best/last
checkpoint, the run's checkpoint folder and a per-rank parameter-shard report.

FLOPs of one optimizer step (documented estimate, "model FLOPs", no attention term and no
activation-checkpointing recompute): ``(4 * N_total + 2 * N_trainable) * T`` with ``T`` the real
(non-padding) tokens of the step over all ranks. The forward costs ``2 * N_total`` per token, the
backward to the activations another ``2 * N_total`` (it runs through the frozen weights too), and
the weight gradients ``2 * N_trainable``; for full fine-tuning this is the usual ``6 * N * T``, for
LoRA about ``4 * N * T``. MFU = FLOPs / (step time x sum over ranks of the per-device peak). The peak
is ``peak_tflops_per_device`` when configured, else on CUDA a table of dense bf16 peaks (A100, H100,
H200, B200), else on the CPU the rate of a 2048 x 2048 fp32 matmul measured once per rank at start.
Peak memory per rank: ``torch.cuda.max_memory_allocated`` on GPUs, the process's maximum resident
set size (``getrusage``) on the CPU.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from ftpipe.compat import AtomicModelCheckpoint
from ftpipe.config.runs import RunManifest, manifests_in, new_run_id, run_of_checkpoint
from ftpipe.config.schema import PipelineConfig
from ftpipe.train.atomic import remove_leftovers, save_atomically
from ftpipe.train.faults import NO_FAULTS, Faults
from ftpipe.train.step import OptimizerStep
from ftpipe.utils.logging import get_logger
from ftpipe.utils.world import all_reduce

log = get_logger(__name__)

#: A checkpoint's name after the run id (``<run id>-step=4-val_loss=1.2345.ckpt``; the last is
#: ``<run id>-last.ckpt``).
CHECKPOINT_FILENAME = "step={step}-val_loss={val_loss:.4f}"

GIB = 1024**3
#: Dense bf16 peak TFLOP/s per device, matched against ``torch.cuda.get_device_name()`` (first hit).
CUDA_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("B200", 2250.0),
)
#: Totals of a run (``StepMetrics.summary``), written by rank 0 beside ``metrics.jsonl``.
SUMMARY_FILENAME = "train_summary.json"


def measure_cpu_matmul_tflops(n: int = 2048, reps: int = 4) -> float:
    """TFLOP/s of an ``n x n`` fp32 matmul on this process's threads (one warm-up, then ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    elapsed = time.perf_counter() - start
    return 2.0 * n**3 * reps / elapsed / 1e12


def cuda_peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense bf16/fp16 peak of a known GPU; None for other GPUs and for fp32 training."""
    if not any(k in precision for k in ("bf16", "16-")):
        return None
    for key, value in CUDA_BF16_PEAK_TFLOPS:
        if key in device_name:
            return value
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: allocated GPU memory on CUDA, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def step_flops(total_params: int, trainable_params: int, tokens: int, reference_passes: int = 0) -> float:
    """Model FLOPs of a step: ``(4 * N_total + 2 * N_trainable) * tokens`` (see the module doc), plus
    ``2 * N_total * tokens`` per forward of a reference model (preference objectives)."""
    return float((4 + 2 * reference_passes) * total_params + 2 * trainable_params) * tokens


def keep_history(path: Path, step: int) -> None:
    """Keep the lines of ``path`` (a ``metrics.jsonl``) whose step is at most ``step`` (the checkpoint a
    run resumes from; 0 for a fresh run), dropping later and unreadable lines; rewritten atomically."""
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
    if kept:
        log.info("%s: kept the %d lines of steps up to %d (resumed run)", path, len(kept), step)


class StepMetrics(Callback):
    """Per optimizer step: tokens/s, MFU and peak memory to the logger and ``metrics.jsonl`` (rank 0).

    ``metrics.jsonl`` keeps the history of the run: a fresh run starts it empty, a resumed one keeps
    the lines of the steps up to its checkpoint (:func:`keep_history`) and appends. It gets one line
    per optimizer step (step, loss, lr, grad_norm, tokens,
    label_tokens, padded_tokens, tokens_per_s, mfu, peak_mem_gib, step_time_s) and one per validation
    (step, val_loss). The step time is the time spent in the step's training batches (validation
    and checkpointing excluded). ``summary`` holds the totals at the end (also written to
    ``train_summary.json`` beside ``metrics.jsonl``); its rates leave out the first (warm-up) step.

    Args:
        metrics_path: the ``metrics.jsonl`` to (re)write; None writes no file.
        peak_tflops_per_device: configured peak; None measures or looks it up (see module doc).
        precision: Lightning precision (selects the GPU peak table).
        steps: the module's optimizer-step accounting (its boundaries and statistics).
    """

    def __init__(
        self,
        metrics_path: Path | None,
        peak_tflops_per_device: float | None,
        precision: str,
        steps: OptimizerStep,
    ):
        super().__init__()
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.configured_peak = peak_tflops_per_device
        self.precision = precision
        self.peak_tflops_total: float | None = None
        self.summary: dict[str, Any] = {}
        self._busy = 0.0
        self._t0: float | None = None
        self._steps: list[dict[str, Any]] = []
        self.steps = steps

    # -------------------------------------------------------------- set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        if self.configured_peak is not None:
            peak, source = self.configured_peak, "configured peak_tflops_per_device"
        elif device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak, source = cuda_peak_tflops(name, self.precision), f"table ({name})"
        else:
            peak, source = measure_cpu_matmul_tflops(), "measured 2048x2048 fp32 matmul"
        if peak is None:
            log.info("MFU: no peak known for this device and precision; set peak_tflops_per_device")
        else:
            total = all_reduce(torch.tensor([peak], dtype=torch.float64, device=device), "sum")
            self.peak_tflops_total = float(total)
            log.info(
                "MFU peak: %.3f TFLOP/s per device (%s), %.3f in total over %d rank(s)",
                peak,
                source,
                self.peak_tflops_total,
                trainer.world_size,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        if trainer.is_global_zero and self.metrics_path is not None:
            keep_history(self.metrics_path, trainer.global_step)

    def _write(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        if trainer.is_global_zero and self.metrics_path is not None:
            with self.metrics_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    # -------------------------------------------------------------- per step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ):
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._t0 is not None:
            self._busy += time.perf_counter() - self._t0
            self._t0 = None
        stats = self.steps.just_completed()
        if stats is None:
            return  # still accumulating
        step_time, self._busy = self._busy, 0.0
        device = trainer.strategy.root_device
        mem = all_reduce(torch.tensor([peak_memory_bytes(device)], dtype=torch.float64, device=device), "max")
        objective = getattr(pl_module, "objective", None)
        passes = objective.reference_passes if objective is not None else 0
        flops = step_flops(pl_module.total_params, pl_module.trainable_params, stats.tokens, passes)
        record: dict[str, Any] = {
            "step": stats.step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "skipped": stats.skipped,
            "nonfinite_steps": stats.nonfinite_steps,
            "tokens": stats.tokens,
            "label_tokens": stats.label_tokens,
            "padded_tokens": stats.padded_tokens,
            "tokens_per_s": stats.tokens / step_time if step_time > 0 else None,
            "mfu": (
                flops / step_time / (self.peak_tflops_total * 1e12)
                if self.peak_tflops_total and step_time > 0
                else None
            ),
            "peak_mem_gib": float(mem) / GIB,
            "step_time_s": step_time,
            **stats.metrics,
        }
        self._steps.append(record)
        self._write(trainer, record)
        logged = {
            k: float(record[k]) for k in ("tokens_per_s", "mfu", "peak_mem_gib") if record[k] is not None
        }
        pl_module.log_dict(logged, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        val_loss = getattr(pl_module, "last_val_loss", None)
        if trainer.sanity_checking or val_loss is None:
            return
        extra = getattr(pl_module, "last_val_metrics", None) or {}
        self._write(trainer, {"step": trainer.global_step, "val_loss": val_loss, **extra})

    # -------------------------------------------------------------- end

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        per_rank = trainer.strategy.all_gather(torch.tensor(float(peak_memory_bytes(device)), device=device))
        per_rank_gib = [float(x) / GIB for x in per_rank.reshape(-1).cpu()]
        steps = self._steps[1:] if len(self._steps) > 1 else self._steps  # the first step warms up
        time_s = sum(s["step_time_s"] for s in steps)
        tokens = sum(s["tokens"] for s in steps)
        padded = sum(s["padded_tokens"] for s in self._steps)
        flops = sum(
            step_flops(pl_module.total_params, pl_module.trainable_params, s["tokens"]) for s in steps
        )
        self.summary = {
            "steps": len(self._steps),
            "world_size": trainer.world_size,
            "tokens_per_s": tokens / time_s if time_s else None,
            "mean_step_time_s": time_s / len(steps) if steps else None,
            "padding_share": 1.0 - sum(s["tokens"] for s in self._steps) / padded if padded else None,
            "mfu": flops / time_s / (self.peak_tflops_total * 1e12)
            if self.peak_tflops_total and time_s
            else None,
            "peak_tflops_total": self.peak_tflops_total,
            "peak_mem_gib_per_rank": per_rank_gib,
            "total_params": pl_module.total_params,
            "trainable_params": pl_module.trainable_params,
        }
        if trainer.is_global_zero and self.metrics_path is not None:
            path = self.metrics_path.with_name(SUMMARY_FILENAME)
            path.write_text(json.dumps(self.summary, indent=1) + "\n", encoding="utf-8")
        mfu = self.summary["mfu"]
        log.info(
            "throughput (steps 2+): %s real tokens/s over %d rank(s), padding %.1f%%, MFU %s, peak memory per rank %s GiB",
            f"{self.summary['tokens_per_s']:.1f}" if self.summary["tokens_per_s"] else "n/a",
            trainer.world_size,
            100 * (self.summary["padding_share"] or 0.0),
            f"{100 * mfu:.2f}%" if mfu is not None else "n/a",
            ", ".join(f"{g:.2f}" for g in per_rank_gib),
        )


class BestAndLastCheckpoint(AtomicModelCheckpoint):
    """ModelCheckpoint that also saves ``last`` at the final optimizer step (not only at the last
    validation that improved), publishes every checkpoint atomically (``ftpipe.train.atomic``) and
    records each one in the run's manifest (``RunFolders``)."""

    def __init__(self, *args: Any, faults: Faults = NO_FAULTS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = faults
        self.folders: RunFolders | None = None

    def write_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        save_atomically(trainer, filepath, self.save_weights_only, self.faults)
        if self.folders is not None and trainer.is_global_zero:
            is_last = Path(filepath).name == f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            score = None if is_last else self.current_score
            self.folders.checkpoint_written(
                trainer,
                filepath,
                float(score) if score is not None else None,
                best=self.best_model_path or None,
                last=self.last_model_path or None,
                best_score=float(self.best_model_score) if self.best_model_score is not None else None,
            )

    def after_remove(self, trainer: pl.Trainer, filepath: str) -> None:
        if self.folders is not None and trainer.is_global_zero:
            self.folders.checkpoint_removed()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save_last_if_unsaved(trainer)
        super().on_train_end(trainer, pl_module)


class RunFolders(Callback):
    """The run's identity and folder: its id (a resumed run keeps the id of the run it continues when it
    resumes from a checkpoint of its own folder), checkpoint names that start with the id, and its
    manifest ``run-<id>.json`` (``ftpipe.config.runs``), written by rank 0.

    The checkpoints go to ``<checkpoints_dir>/version_<N>``, N being the TensorBoard version (decided on
    rank 0 and broadcast, so every rank and node agrees); a fixed ``checkpoint_dir``
    (``checkpoints_root`` None) stays as it is and may hold several runs.
    """

    def __init__(
        self,
        checkpoints_root: Path | None,
        checkpoint: BestAndLastCheckpoint,
        version_source: Any = None,
        *,
        cfg: PipelineConfig | None = None,
        resume_from: str | None = None,
        data: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.checkpoints_root = Path(checkpoints_root) if checkpoints_root is not None else None
        self.checkpoint = checkpoint
        checkpoint.folders = self
        self.version_source = version_source  # the TensorBoard logger that numbers the runs
        self.version: str | None = None
        self.cfg = cfg
        self.resume_from = resume_from
        self.data = data or {}
        self.run_id: str | None = None
        self.manifest: RunManifest | None = None

    def _continued_run(self, folder: Path) -> RunManifest | None:
        """The manifest of the run a resume continues: the checkpoint's run, when it lies in ``folder``."""
        if not self.resume_from:
            return None
        found = run_of_checkpoint(self.resume_from)
        if found is not None and found.folder.resolve() == folder.resolve():
            return found
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        source = self.version_source or trainer.logger
        version = source.version if source is not None else 0
        name = version if isinstance(version, str) else f"version_{version}"
        self.version = trainer.strategy.broadcast(name)
        if self.checkpoints_root is not None:
            self.checkpoint.dirpath = str(self.checkpoints_root / self.version)
        folder = Path(self.checkpoint.dirpath or trainer.default_root_dir)
        continued = self._continued_run(folder) if trainer.is_global_zero else None
        run_id = continued.run_id if continued is not None else new_run_id()
        self.run_id = trainer.strategy.broadcast(run_id)
        self.checkpoint.filename = f"{self.run_id}-{CHECKPOINT_FILENAME}"
        self.checkpoint.CHECKPOINT_NAME_LAST = f"{self.run_id}-last"
        if trainer.is_global_zero:
            if continued is not None:
                self.manifest = continued
                self.manifest.status = "running"
                self.manifest.ended = None
            elif self.cfg is not None:
                self.manifest = RunManifest.create(folder, self.cfg, self.run_id, data=self.data)
            if self.manifest is not None:
                if self.resume_from:
                    self.manifest.resumed_from.append(str(self.resume_from))
                self.manifest.save()
                log.info("run %s: manifest %s", self.run_id, self.manifest.path)
        if trainer.local_rank == 0 and folder.is_dir():
            owners = tuple(
                f"{run_id}-" for run_id in {m.run_id for m in manifests_in(folder)} | {self.run_id}
            )
            removed = remove_leftovers(folder, lambda name: name.startswith(owners))
            if removed:
                log.info("removed %d unfinished checkpoint save(s): %s", len(removed), ", ".join(removed))
        trainer.strategy.barrier("ftpipe_run_folders")

    def checkpoint_written(
        self,
        trainer: pl.Trainer,
        filepath: str,
        val_loss: float | None,
        *,
        best: str | None,
        last: str | None,
        best_score: float | None,
    ) -> None:
        """Rank 0, after a checkpoint was published: list it, with the run's best and last."""
        if self.manifest is None:
            return
        self.manifest.record_checkpoint(filepath, trainer.global_step, val_loss)
        self.manifest.best = Path(best).name if best else None
        self.manifest.last = Path(last).name if last else None
        self.manifest.best_val_loss = best_score if best else None
        self.manifest.prune()
        self.manifest.save()

    def checkpoint_removed(self) -> None:
        if self.manifest is not None:
            self.manifest.prune()
            self.manifest.save()

    def finish(self, status: str, global_step: int) -> None:
        """Rank 0 after fitting: the run's final status and end time."""
        if self.manifest is None:
            return
        self.manifest.status = status
        self.manifest.ended = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.manifest.global_step = max(self.manifest.global_step, global_step)
        self.manifest.prune()
        self.manifest.save()


def _local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def _local_abs_sum(p: torch.Tensor) -> float:
    local = p.to_local() if hasattr(p, "to_local") else p
    return float(local.detach().double().abs().sum())


class ShardReport(Callback):
    """Diagnostics: each rank writes ``shards_rank<R>.json`` into ``folder`` at train start and end: the
    local (shard) and global element counts of its trainable and frozen parameters and the sum of
    absolute values of its local shards (a fingerprint that shows which weights changed).

    Enabled by ``shard_report_dir`` (the ``debug`` section).
    """

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)
        self.report: dict[str, Any] = {}

    def _snapshot(self, trainer: pl.Trainer) -> dict[str, Any]:
        snap = {
            "trainable_local": 0,
            "frozen_local": 0,
            "trainable_global": 0,
            "frozen_global": 0,
            "trainable_abs_sum": 0.0,
            "frozen_abs_sum": 0.0,
        }
        for p in trainer.strategy.model.parameters():
            kind = "trainable" if p.requires_grad else "frozen"
            snap[f"{kind}_local"] += _local_numel(p)
            snap[f"{kind}_global"] += p.numel()
            snap[f"{kind}_abs_sum"] += _local_abs_sum(p)
        return snap

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "cluster_environment": type(trainer.strategy.cluster_environment).__name__
            if getattr(trainer.strategy, "cluster_environment", None) is not None
            else None,
            "total_params": getattr(pl_module, "total_params", None),
            "trainable_params": getattr(pl_module, "trainable_params", None),
            "start": self._snapshot(trainer),
        }
        self._dump(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report["end"] = self._snapshot(trainer)
        self.report["global_step"] = trainer.global_step
        self._dump(trainer)

    def _dump(self, trainer: pl.Trainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"shards_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.report, indent=1), encoding="utf-8")
