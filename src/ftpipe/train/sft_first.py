"""SFT then preference tuning in one command: ``sft_config`` trains the supervised run first.

The supervised run is an ordinary ``ftpipe train`` of its own configuration (its data, results folder,
run manifest). Its best checkpoint becomes the preference run's ``init_adapter``: the preference
training continues that adapter, with the SFT model as the reference (``reference: auto`` -> cached).
A completed SFT run with the same configuration (its manifest's hash) is reused, so running the command
again after a failed or stopped preference stage does not train the SFT stage twice.

Processes. Under torchrun or SLURM (every rank started by the launcher) and on one process, the SFT run
trains in this process, as the preference run does after it. With Lightning's own launcher
(``gpus_per_node`` > 1 on a plain command line), the launching process runs ``ftpipe train`` of the SFT
configuration as a child command (which starts its ranks) before anything else; the ranks that
Lightning starts later for the preference run find that SFT run completed and reuse it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ftpipe.config import load_config, validate_config
from ftpipe.config.errors import ConfigError
from ftpipe.config.runs import all_runs, config_hash, resume_problems
from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


class SFTStageError(FtpipeError):
    """The supervised stage of ``sft_config`` did not produce a checkpoint."""


def sft_stage_config(cfg: PipelineConfig) -> PipelineConfig:
    """The SFT configuration of ``sft_config``, checked against the preference run (same model, fine-tuning
    mode and LoRA shape, since the preference run continues its adapter)."""
    path = Path(cfg.objective.sft_config or "").expanduser()
    if not path.is_file():
        raise ConfigError([f"sft_config: {path} is not a file (give the YAML configuration of the SFT run)"])
    sft = validate_config(load_config(path))
    if sft.objective.objective != "sft":
        raise ConfigError(
            [f"sft_config: {path} sets objective {sft.objective.objective!r}; it must be an sft run"]
        )
    problems = resume_problems(sft.to_flat(), cfg)
    if problems:
        raise ConfigError([f"sft_config: {path} and this run differ: {p}" for p in problems])
    return sft


def completed_sft_checkpoint(sft: PipelineConfig) -> Path | None:
    """The best checkpoint of the newest completed run of exactly this SFT configuration, if one exists."""
    digest = config_hash(sft.to_flat())
    for manifest in reversed(all_runs(sft)):
        best = manifest.checkpoint("best")
        if (
            manifest.status == "completed"
            and manifest.config_hash == digest
            and best is not None
            and best.exists()
        ):
            return best
    return None


def _launched_by_lightning(cfg: PipelineConfig) -> bool:
    """Several local processes that Lightning's launcher would start (not torchrun, SLURM or a child)."""
    from ftpipe.utils.launch import current

    return cfg.train.gpus_per_node * cfg.train.num_nodes > 1 and current().launcher == "single"


def train_sft_first(cfg: PipelineConfig) -> PipelineConfig:
    """Train (or reuse) the SFT run of ``sft_config``; ``cfg`` continuing its best checkpoint."""
    sft = sft_stage_config(cfg)
    best = completed_sft_checkpoint(sft)
    if best is not None:
        log.info("sft_config: reusing the completed SFT run's best checkpoint %s", best)
    elif _launched_by_lightning(sft):
        log.info(
            "sft_config: training the SFT stage first (ftpipe train --config %s)", cfg.objective.sft_config
        )
        cmd = [
            sys.executable,
            "-m",
            "ftpipe",
            "train",
            "--config",
            str(Path(cfg.objective.sft_config).expanduser()),
        ]
        code = subprocess.call(cmd)
        if code != 0:
            raise SFTStageError(
                f"sft_config: the SFT stage (`{' '.join(cmd)}`) failed with exit status {code}; see its log above"
            )
        best = completed_sft_checkpoint(sft)
    else:
        from ftpipe.train.run import train

        log.info("sft_config: training the SFT stage first (%s)", cfg.objective.sft_config)
        result = train(sft)
        best = (
            Path(result.best_checkpoint or result.last_checkpoint)
            if (result.best_checkpoint or result.last_checkpoint)
            else None
        )
    if best is None:
        raise SFTStageError(f"sft_config: the SFT run of {cfg.objective.sft_config} left no checkpoint")
    log.info("preference stage: continuing the SFT adapter of %s (the SFT model is the reference)", best)
    return cfg.replace(init_adapter=str(best), sft_config=None)
