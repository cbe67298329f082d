"""Measure the memory of a real ``ftpipe train`` run on the CPU; used by test_estimate_embedded.py.

Usage: ``python measure_train.py OUT.json --field value ...`` (flat configuration fields, as on the
``ftpipe train`` command line); ranks other than 0 write ``OUT.rank<N>.json``. Runs ftpipe's own training path (``ftpipe.train.run.train``) in this
process with one extra Lightning callback that records:

- ``baseline``: the resident set size just before the model is built (``setup``, which Lightning calls
  before ``configure_model``), so the tokenizer, the data and the libraries are left out;
- ``model_built``: the resident set size when training starts (model, adapters, optimizer built);
- ``peak``: the peak resident set size during the training steps: ``VmHWM`` reset when training starts
  (``echo 5 > /proc/self/clear_refs``, Linux), read after the last step.

Start it with ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0`` so that freed large
tensors go back to the operating system (the resident set size then follows the live tensors).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

import ftpipe.train.run as run_module
import ftpipe.train.trainer as trainer_module
from ftpipe.cli.main import parse
from ftpipe.utils.logging import setup_logging

#: torch threads of the measured process (unset: ftpipe's own choice). On a shared two-core machine two
#: threads spin against each other and a step takes ten times longer; the memory does not depend on it.
THREADS_ENV = "FTPIPE_MEASURE_THREADS"


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class MemoryProbe(pl.Callback):
    """Resident set sizes around the training steps (bytes)."""

    def __init__(self) -> None:
        self.record: dict[str, int] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.record["baseline"] = _status_kib("VmRSS") * 1024

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["model_built"] = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.record["hwm_after_reset"] = _status_kib("VmHWM") * 1024

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["peak"] = _status_kib("VmHWM") * 1024
        self.record["rank"] = trainer.global_rank
        self.record["steps"] = trainer.global_step
        self.record["batch_shape"] = list(batch["input_ids"].shape)


def main() -> None:
    out = Path(sys.argv[1])
    setup_logging()
    _, cfg = parse(["train", *sys.argv[2:]])
    probe = MemoryProbe()
    build = trainer_module.build_trainer

    def build_with_probe(*args, **kwargs):
        parts = build(*args, **kwargs)
        parts.trainer.callbacks.append(probe)
        return parts

    trainer_module.build_trainer = build_with_probe
    if os.environ.get(THREADS_ENV):
        threads = int(os.environ[THREADS_ENV])
        run_module.set_cpu_threads = lambda cfg: (torch.set_num_threads(threads), threads)[1]
    run_module.train(cfg)
    rank = probe.record.get("rank", 0)  # Lightning re-runs this script for the other local ranks
    target = out if rank == 0 else out.with_name(f"{out.stem}.rank{rank}{out.suffix}")
    target.write_text(json.dumps(probe.record, indent=2))


if __name__ == "__main__":
    main()
