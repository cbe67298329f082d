"""Rank-zero logging: records from ranks other than 0 are dropped unless they are warnings or worse."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ftpipe.utils.world import global_rank  # re-exported: rank-aware logging asks world

_FORMAT = "%(asctime)s %(levelname)s [%(name)s%(rank_tag)s] %(message)s"


class _RankFilter(logging.Filter):
    """The console: ftpipe's records at their level and other libraries' errors (with ``verbose``, other
    libraries' records from INFO and Python warnings too); on rank 0 only, except warnings."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        record.rank_tag = f" rank {rank}" if rank else ""
        if not record.name.startswith("ftpipe"):
            if record.name == "py.warnings" or record.levelno < logging.WARNING:
                return self.verbose and record.levelno >= logging.INFO
            if record.levelno < logging.ERROR and not self.verbose:
                return False
        return rank == 0 or record.levelno >= logging.WARNING


class _FileFilter(logging.Filter):
    """The run's log file: every ftpipe record, other libraries' from INFO, Python warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        record.rank_tag = f" rank {rank}" if rank else ""
        return record.name.startswith("ftpipe") or record.levelno >= logging.INFO


def _console_handler() -> logging.Handler | None:
    return next((h for h in logging.getLogger().handlers if getattr(h, "_ftpipe", False)), None)


def setup_logging(level: int | str = logging.INFO, *, verbose: bool | None = None) -> None:
    """Install one console handler on the root logger (idempotent); ``verbose`` shows other libraries'
    records and Python warnings on the console as well.

    On the root, so that a library that later calls ``logging.basicConfig`` adds nothing and no record
    is printed twice. Python warnings go through logging (``py.warnings``): to the run's log file, and to
    the console only with ``verbose``.
    """
    logging.getLogger("ftpipe").setLevel(level)
    logging.captureWarnings(True)
    root = logging.getLogger()
    handler = _console_handler()
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(level)
        handler._ftpipe = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
    if verbose is not None:
        for f in handler.filters:
            if isinstance(f, _RankFilter):
                f.verbose = verbose
        _quiet_libraries(not verbose)


def adopt_library_loggers() -> None:
    """Lightning prints through handlers of its own: its records go through ftpipe's handlers instead
    (the console shows them with ``verbose``; the log file always). Call after importing Lightning."""
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "lightning_fabric",
    ):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    if global_rank() > 0:  # the other ranks' progress bars would only repeat rank 0's
        try:
            import datasets

            datasets.disable_progress_bars()
        except ImportError:  # pragma: no cover - datasets is a dependency
            pass


def _quiet_libraries(quiet: bool) -> None:
    """Third-party progress bars that say nothing to a user (weights loading, shard writing) off."""
    try:
        import transformers

        (
            transformers.utils.logging.disable_progress_bar
            if quiet
            else transformers.utils.logging.enable_progress_bar
        )()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


_log_file: Path | None = None


def current_log_file() -> Path | None:
    """The file this process's records go to (:func:`add_log_file`), None without one."""
    return _log_file


def add_log_file(path: Path) -> logging.Handler:
    """Write every record (ftpipe's all, other libraries' from INFO, Python warnings) to ``path`` too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_FileFilter())
    global _log_file
    _log_file = path
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    logging.getLogger("ftpipe").setLevel(logging.DEBUG)
    return handler


def remove_log_file(handler: logging.Handler) -> None:
    global _log_file
    if (
        isinstance(handler, logging.FileHandler)
        and _log_file is not None
        and handler.baseFilename == str(_log_file.absolute())
    ):
        _log_file = None
    handler.close()
    logging.getLogger().removeHandler(handler)


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``ftpipe`` hierarchy (``ftpipe.data.prepare`` ...)."""
    return logging.getLogger(name if name.startswith("ftpipe") else f"ftpipe.{name}")
