"""Which checkpoint ``resume_from_checkpoint`` means: a path, or ``auto`` (the newest complete one).

A checkpoint is a Lightning ``.ckpt`` file (single device, DDP) or a distributed-checkpoint folder
(FSDP1 sharded, FSDP2) that is complete once both the ``torch.distributed.checkpoint`` index
(``.metadata``, written after every shard) and Lightning's ``meta.pt`` (written last) are there.
"""

from __future__ import annotations

from pathlib import Path

from ftpipe.config.paths import checkpoints_dir
from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

AUTO = "auto"


class ResumeError(FtpipeError):
    """``resume_from_checkpoint`` names a checkpoint that is missing or incomplete."""


def is_complete(path: Path) -> bool:
    """True for a non-empty checkpoint file or a distributed-checkpoint folder with its index and meta."""
    if path.is_file():
        return path.stat().st_size > 0
    return path.is_dir() and (path / ".metadata").is_file() and (path / "meta.pt").is_file()


def _run_dirs(cfg: PipelineConfig) -> list[Path]:
    if cfg.train.checkpoint_dir:
        return [Path(cfg.train.checkpoint_dir).expanduser()]
    return [p for p in checkpoints_dir(cfg).glob("version_*") if p.is_dir()]


def newest_checkpoint(cfg: PipelineConfig) -> Path | None:
    """The most recently written complete checkpoint of this run's checkpoint folder(s), or None."""
    candidates = [p for run in _run_dirs(cfg) for p in run.glob("*.ckpt") if is_complete(p)]
    if not candidates:
        return None

    def written(path: Path) -> float:
        return (path / "meta.pt").stat().st_mtime if path.is_dir() else path.stat().st_mtime

    return max(candidates, key=written)


def resolve_resume(cfg: PipelineConfig) -> str | None:
    """The checkpoint to resume from (None: a fresh start); a clear error for a bad explicit path."""
    choice = cfg.train.resume_from_checkpoint
    if not choice:
        return None
    if choice == AUTO:
        found = newest_checkpoint(cfg)
        where = ", ".join(str(p) for p in _run_dirs(cfg)) or str(checkpoints_dir(cfg))
        if found is None:
            log.info("resume_from_checkpoint auto: no complete checkpoint in %s, starting fresh", where)
            return None
        log.info("resume_from_checkpoint auto: resuming from %s", found)
        return str(found)
    path = Path(choice).expanduser()
    if not path.exists():
        raise ResumeError(
            f"resume_from_checkpoint: {path} does not exist; give a checkpoint file or "
            "distributed-checkpoint folder, or 'auto' for the newest one of this run"
        )
    if not is_complete(path):
        raise ResumeError(
            f"resume_from_checkpoint: {path} is incomplete (an interrupted save: no .metadata/meta.pt); "
            "give an earlier checkpoint, or 'auto' to take the newest complete one"
        )
    return str(path)
