"""Where the raw rows come from: a hub id, local files (a file, a glob, comma-separated files, a folder
of files) or a ``save_to_disk`` folder.

JSON, JSON Lines and CSV files are read row by row so that every value keeps its own type
(``ftpipe.data.jsonscan``); Parquet, Arrow, text, hub and ``save_to_disk`` data are loaded with
``datasets`` and keep the types of their schema. Row numbers in messages are the user's: 1-based line
numbers for JSON Lines, 0-based row indices for JSON arrays, CSV (header excluded), Parquet, hub and
``save_to_disk`` data.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets

from ftpipe.config.paths import looks_local
from ftpipe.data.errors import DataError
from ftpipe.data.jsonscan import RAW_COLUMN, SCANNERS, BadRecord, scan_file
from ftpipe.data.manifest import READY_MARKER
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

#: file suffix -> ``datasets`` packaged builder.
BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
ROW_NUMBERS = (
    "JSON Lines: 1-based line numbers; JSON arrays, CSV (header excluded), Parquet, Arrow, hub and "
    "save_to_disk data: 0-based row indices"
)
_LOCAL_HELP = (
    "give an existing file (.json/.jsonl/.csv/.parquet), a glob, comma-separated files, a folder of such "
    "files or a folder written by datasets' save_to_disk (start a relative path with ./)"
)


@dataclass(frozen=True)
class Source:
    """A resolved data source: ``hub`` (an id), ``files`` (local files) or ``disk`` (save_to_disk)."""

    given: str
    kind: str
    files: tuple[Path, ...] = ()
    folder: Path | None = None


@dataclass
class Part:
    """One loaded piece of the source (a file, or the whole hub / save_to_disk data set)."""

    name: str
    dataset: datasets.Dataset
    #: records in the piece, unreadable ones included (ids count them).
    records: int
    #: record position of each dataset row (None: row i is record i).
    positions: list[int] | None = None
    label: Callable[[int], str] = field(default=lambda position: f"row {position}")
    #: records that could not be read at all (position, reason, detail).
    bad: list[BadRecord] = field(default_factory=list)
    #: the data set's one column holds each row's JSON text (read exactly, see ``jsonscan``); otherwise
    #: its columns are the rows' fields as Arrow typed them (Parquet, Arrow, hub and save_to_disk data).
    raw: bool = False
    #: the rows' fields (for a raw part: every key seen in a row).
    columns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.columns and not self.raw:
            self.columns = list(self.dataset.column_names)

    def column(self, name: str) -> list[Any]:
        """One field of every loaded row, in order (None where a row lacks it)."""
        if not self.raw:
            return list(self.dataset[name])
        return [json.loads(text).get(name) for text in self.dataset[RAW_COLUMN]]


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _supported(path: Path) -> bool:
    return path.suffix.lower() in BUILDERS


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _not_prepared(paths: list[Path], item: str) -> list[Path]:
    """``paths`` without the files of ftpipe's own prepared folders (those holding its ready marker)."""
    kept = [p for p in paths if not (p.parent / READY_MARKER).is_file()]
    if len(kept) < len(paths):
        log.warning(
            "dataset %r: skipped %d files of ftpipe's prepared data lying under it (prepared output is never "
            "read as source data)",
            item,
            len(paths) - len(kept),
        )
    return kept


def _not_a_file(path: Path, item: str) -> str | None:
    """Why ``path`` cannot be read as data when it is there but neither a file nor a folder (a symbolic
    link loop or to nothing, a pipe, a device); None when it is a file, a folder or not there at all."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return (
                f"dataset: {item!r} is a symbolic link loop (following its links leads back to {path}); "
                "point dataset at the data file itself"
            )
        if os.path.islink(path):
            return (
                f"dataset: {item!r} is a symbolic link to {os.readlink(path)}, which does not exist; "
                "point dataset at the data file itself"
            )
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return (
            f"dataset: {item!r} is a pipe (a FIFO, or a shell's <(...) process substitution), not a regular "
            "file: ftpipe reads the data more than once. Save it to a file first (`... > data.jsonl`) and "
            "give that file"
        )
    kind = "socket" if stat.S_ISSOCK(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None
    kind = kind or "special file"
    return f"dataset: {item!r} is a {kind}, not a regular file; give a data file (or a folder of them)"


def _expand(item: str) -> list[Path]:
    path = Path(item).expanduser()
    problem = _not_a_file(path, item)
    if problem:
        raise DataError(problem)
    # a name that exists is taken as it is, even with glob characters in it (``train[1].jsonl``)
    if any(c in item for c in "*?[") and not os.path.lexists(path):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        matches = _not_prepared(matches, item)
        found = [p for p in matches if _supported(p)]
        if not found:
            raise DataError(
                f"dataset: no {'/'.join(BUILDERS)} file matches the glob {item!r} (in {Path.cwd()})"
            )
        return found
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and _supported(p) and not _hidden(p.relative_to(path))
        )
        found = _not_prepared(found, item)
        if not found:
            raise DataError(f"dataset: folder {path} holds neither a save_to_disk data set nor data files")
        return found
    if path.is_file():
        if not _supported(path):
            raise DataError(
                f"dataset: {path} has an unsupported type {path.suffix!r} (allowed: {list(BUILDERS)})"
            )
        return [path]
    raise DataError(f"dataset: {item!r} does not exist (looked for {path.resolve()}); {_LOCAL_HELP}")


def resolve_source(dataset: str) -> Source:
    """Resolve ``--dataset``; a local path that does not exist is a DataError naming it."""
    given = dataset.strip()
    if not looks_local(given):
        return Source(given, "hub")
    items = [s.strip() for s in given.split(",") if s.strip()]
    if (
        len(items) == 1
        and Path(items[0]).expanduser().is_dir()
        and _is_saved_dataset(Path(items[0]).expanduser())
    ):
        return Source(given, "disk", folder=Path(items[0]).expanduser().resolve())
    files = [p.resolve() for item in items for p in _expand(item)]
    return Source(given, "files", files=tuple(dict.fromkeys(files)))


#: Source files are content-hashed (besides size and mtime) while their sizes add up to at most this.
HASH_BUDGET_BYTES = 64 * 2**20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_fingerprint(source: Source) -> list[dict]:
    """Resolved path, size and mtime of every local file of the source (empty for hub data), and the
    SHA-256 of the first files while their sizes stay within ``HASH_BUDGET_BYTES`` (a same-size edit
    within the file system's mtime granularity is caught too; large data is not read twice)."""
    paths = list(source.files)
    if source.folder is not None:
        paths = sorted(p for p in source.folder.rglob("*") if p.is_file())
    entries, budget = [], HASH_BUDGET_BYTES
    for path in paths:
        st = path.stat()
        entry: dict = {"path": str(path), "size": st.st_size, "mtime": st.st_mtime}
        if st.st_size <= budget:
            budget -= st.st_size
            entry["sha256"] = _sha256(path)
        entries.append(entry)
    return entries


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """None when the hub endpoint accepts a TCP connection, else why not."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return f"{constants.ENDPOINT} is unreachable ({err})"
    return None


def load_hub(name: str, subset: str | None, split: str) -> datasets.Dataset:
    """A hub data set; offline or unreachable hub -> an immediate DataError saying what to do."""
    hint = f"To use local data, point --dataset at it: {_LOCAL_HELP}."
    offline = _truthy("HF_HUB_OFFLINE") or _truthy("HF_DATASETS_OFFLINE") or datasets.config.HF_HUB_OFFLINE
    what = f"dataset {name!r} is not a local path, so it was taken as a Hugging Face hub id"
    if offline and not datasets.config.HF_HUB_OFFLINE:
        raise DataError(f"{what}, but the hub is offline (HF_HUB_OFFLINE=1). {hint}")
    if not offline:
        problem = _hub_unreachable()
        if problem:
            raise DataError(
                f"{what}, but {problem}. {hint} With a copy in the local cache, set HF_HUB_OFFLINE=1."
            )
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as err:
        if offline:
            raise DataError(
                f"{what}, but the hub is offline (HF_HUB_OFFLINE=1) and no cached copy was found ({err}). {hint}"
            ) from err
        raise DataError(
            f"could not load hub dataset {name!r} (subset {subset!r}, split {split!r}): {err}"
        ) from err


def load_saved(folder: Path, split: str) -> datasets.Dataset:
    """A ``save_to_disk`` folder; a DatasetDict gives its ``split``."""
    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"dataset: {folder} has no split {split!r} (splits: {list(loaded)}); set dataset_split"
            )
        return loaded[split]
    return loaded


def _load_file_with(builder: str, file: Path, cache_dir: Path, shown: Path) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=str(cache_dir))
    except Exception as err:
        cause = err.__cause__ or err
        raise DataError(
            f"{shown}: could not be read as {builder} ({type(cause).__name__}: {cause}); check the file's format"
        ) from err


def _load_file(path: Path, work_dir: Path, fail: bool) -> Part:
    suffix = path.suffix.lower()
    if suffix == ".json" or suffix in SCANNERS:
        scan = scan_file(path, work_dir / "raw", fail)
        assert scan.arrow_file is not None
        ds = datasets.Dataset.from_file(str(scan.arrow_file))
        return Part(
            str(path), ds, scan.records, scan.good, scan.label, scan.bad, raw=True, columns=scan.columns
        )
    builder = BUILDERS[suffix]
    if builder == "parquet":
        _check_parquet(path)
    return Part(str(path), ds := _load_file_with(builder, path, work_dir / "cache", path), len(ds))


def _check_parquet(path: Path) -> None:
    """A Parquet file starts and ends with ``PAR1``; anything else is named before any reader logs about it."""
    with open(path, "rb") as fh:
        head = fh.read(4)
        fh.seek(max(path.stat().st_size - 4, 0))
        tail = fh.read(4)
    if head != b"PAR1" or tail != b"PAR1":
        raise DataError(
            f"{path}: not a Parquet file (no PAR1 marks at its start and end); check the file's format"
        )


def load_parts(source: Source, subset: str | None, split: str, work_dir: Path, fail: bool) -> list[Part]:
    """Load every piece of the source; ``work_dir`` holds the loader's cache and clean copies."""
    if source.kind == "hub":
        ds = load_hub(source.given, subset, split)
        return [Part(source.given, ds, len(ds))]
    if source.kind == "disk" and source.folder is not None:
        ds = load_saved(source.folder, split)
        return [Part(str(source.folder), ds, len(ds))]
    return [_load_file(path, work_dir, fail) for path in source.files]
