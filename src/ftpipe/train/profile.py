"""``profile_dir``: ``torch.profiler`` over two training batches after a warm-up batch, on every rank.

Writes ``profile-rank<R>.txt`` (the operators by self CPU time, and by self CUDA time on GPUs) and
``trace-rank<R>.json`` (a Chrome / Perfetto trace) into ``profile_dir``. The profiled batches run slower
than the others (the profiler records every operator), so their step times in ``metrics.jsonl`` are not
representative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.profiler import ProfilerActivity, profile

from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

#: Training batches before the profiler starts (the first one allocates and warms the kernels up).
WARMUP_BATCHES = 1
#: Training batches profiled.
PROFILED_BATCHES = 2
#: Operators listed in the text summary.
TOP_OPERATORS = 30


class StepProfiler(Callback):
    """Profile training batches ``WARMUP_BATCHES + 1`` to ``WARMUP_BATCHES + PROFILED_BATCHES`` (1-based)."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self._profiler: profile | None = None
        self._batches = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batches == WARMUP_BATCHES and self._profiler is None:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities, record_shapes=False)
            self._profiler.start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._profiler is not None and self._batches == WARMUP_BATCHES + PROFILED_BATCHES:
            self._finish(trainer.global_rank)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._profiler is not None:  # fewer batches than planned: write what was recorded
            self._finish(trainer.global_rank)

    def _finish(self, rank: int) -> None:
        prof, self._profiler = self._profiler, None
        if prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        tables = [events.table(sort_by="self_cpu_time_total", row_limit=TOP_OPERATORS)]
        if any(e.self_device_time_total for e in events):
            tables.append(events.table(sort_by="self_device_time_total", row_limit=TOP_OPERATORS))
        text = self.out_dir / f"profile-rank{rank}.txt"
        text.write_text("\n\n".join(tables), encoding="utf-8")
        prof.export_chrome_trace(str(self.out_dir / f"trace-rank{rank}.json"))
        log.info("profile of %d training batch(es) written to %s", PROFILED_BATCHES, text)
