"""Self-documenting locations of prepared data and of run results.

Prepared data: ``<data_dir>/<dataset id as folders>/<subset>/train=90%-val=5%-test=5%/`` (local data:
``<data_dir>/local/<name>-<hash of its resolved paths>/default/...``; a mix of several data sets:
``<data_dir>/mix/<first source>+<N>-more[-<hash>]/default/...``), with a
``-cfg<hash>`` suffix when any other setting that changes the prepared rows differs from its default
(template, mapping, converter, seed, subset size, a preference ``objective``, ...), so a changed
configuration prepares again into its own folder. Results:
``<results_dir>/<model id as folders>/{checkpoints,tb_logs}``.

Which settings change the prepared rows (and the tokenized samples) is not listed here: every
configuration field declares it in its metadata (:func:`ftpipe.config.schema.affects`), and the keys of
both caches are derived from those declarations (:func:`prepare_settings`, :func:`tokenize_settings`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
from pathlib import Path

from ftpipe.config.schema import (
    EMBEDDED_MODEL,
    PREPARED,
    TOKENIZED,
    DataConfig,
    PipelineConfig,
    fields_affecting,
)

#: Hub id of the model that ``hf_model_id: embedded`` stands for.
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOCAL_DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt"}

#: The objective whose prepared rows are keyed as they were before objectives existed.
DEFAULT_OBJECTIVE = "sft"
#: The prepared-data fields that the folder path itself names (the source, its subset, the split ratios);
#: they enter the prepare settings in a form of their own (``dataset``, ``dataset_subset``, ``ratios``).
PATH_FIELDS = ("dataset", "dataset_subset", "train_ratio", "val_ratio", "test_ratio")
#: Every other DataConfig field declared ``PREPARED`` (in declaration order): hashed into the ``-cfg<hash>``
#: suffix of the folder when one differs from its default, and into the manifest's settings.
PREPARE_FIELDS = tuple(name for name in fields_affecting(DataConfig, PREPARED) if name not in PATH_FIELDS)


def looks_local(source: str) -> bool:
    """True when ``source`` names local files (a path, a glob or a comma-separated list)."""
    if any(c in source for c in "*?[,") or source.startswith((".", "/", "~")):
        return True
    path = Path(source).expanduser()
    return path.exists() or path.suffix.lower() in LOCAL_DATA_SUFFIXES


def _slug_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "_"


def id_as_folders(identifier: str) -> Path:
    """``org/name`` -> ``org/name`` as a relative path, each part made filesystem-safe."""
    parts = [_slug_part(p) for p in identifier.split("/") if p not in ("", ".", "..")]
    return Path(*parts) if parts else Path("_")


def source_identity(source: str) -> list[str]:
    """What a data source is: a hub id as given; local data as the absolute, symlink-resolved path of
    each comma-separated item (a glob's pattern made absolute), so ``v1/train.jsonl`` and
    ``v2/train.jsonl`` (or one relative path from two folders) are different sources."""
    given = source.strip()
    if not looks_local(given):
        return [given]
    identity = []
    for item in (s.strip() for s in given.split(",") if s.strip()):
        path = Path(item).expanduser()
        try:
            identity.append(str(path.resolve()))
        except (OSError, RuntimeError):  # a symlink loop: the sources name it when they read it
            identity.append(os.path.abspath(path))
    return identity


def identity_hash(identities: list[str]) -> str:
    """Short stable hash of source identities (8 hex digits)."""
    return hashlib.sha256("\n".join(identities).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _local_name(source: str) -> str:
    first = source.split(",")[0].strip()
    name = Path(first.rstrip("/")).expanduser()
    stem = name.stem if name.suffix.lower() in LOCAL_DATA_SUFFIXES else name.name
    return _slug_part(re.sub(r"[*?\[\]]", "", stem) or "data")


def dataset_slug(source: str) -> Path:
    """``cognitivecomputations/dolphin`` -> that path; local data -> ``local/<name>-<hash8>``, the hash of
    its resolved path(s) (``source_identity``)."""
    if looks_local(source):
        return Path("local") / f"{_local_name(source)}-{identity_hash(source_identity(source))}"
    return id_as_folders(source)


def split_name(data: DataConfig) -> str:
    """``train=90%-val=5%-test=5%`` from the ratios."""

    def pct(x: float) -> str:
        return f"{round(x * 100, 4):g}%"

    return f"train={pct(data.train_ratio)}-val={pct(data.val_ratio)}-test={pct(data.test_ratio)}"


def _objective_settings(objective: str) -> dict:
    """The objective as a prepare setting: SFT (the default) adds nothing, so SFT hashes stay as they were;
    a preference objective prepares pair records, into a folder of their own."""
    return {} if objective == DEFAULT_OBJECTIVE else {"objective": objective}


def prepare_settings(data: DataConfig, objective: str = DEFAULT_OBJECTIVE) -> dict:
    """The settings that determine the prepared rows (hashed into the manifest; all but the path's own in
    the folder name): every field declared ``PREPARED``; ``objective`` is ``cfg.objective.objective``."""
    values = dataclasses.asdict(data)
    return {
        "dataset": None if data.datasets else data.dataset,
        "dataset_subset": data.dataset_subset,
        "ratios": [data.train_ratio, data.val_ratio, data.test_ratio],
        **{k: values[k] for k in PREPARE_FIELDS},
        **_objective_settings(objective),
    }


def tokenize_settings(data: DataConfig) -> dict:
    """The data settings that determine the tokenized samples (part of the tokenization cache key): every
    DataConfig field declared ``PREPARED`` or ``TOKENIZED``, by name. The tokenizer and its chat template
    (fields declared ``TOKENIZER``) enter that key through the loaded tokenizer itself."""
    values = dataclasses.asdict(data)
    return {name: values[name] for name in fields_affecting(DataConfig, PREPARED, TOKENIZED)}


def settings_hash(settings: dict) -> str:
    """Short stable hash of a JSON-serialisable mapping."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def prepared_data_dir(data: DataConfig, objective: str = DEFAULT_OBJECTIVE) -> Path:
    """Folder of the prepared ``training/validation/test.jsonl`` for this configuration (``objective``:
    ``cfg.objective.objective``; the folders of SFT and of preference records differ)."""
    if data.prepared_dir:
        return Path(data.prepared_dir).expanduser()
    if data.datasets:  # a mix: mix/<first source>+<n>-more[-<hash8 of the local sources' identities>]
        sources = [entry.dataset for entry in data.datasets]
        first = _local_name(sources[0]) if looks_local(sources[0]) else id_as_folders(sources[0]).name
        more = len(sources) - 1
        name = f"{first}+{more}-more" if more else first
        if any(looks_local(s) for s in sources):
            name += f"-{identity_hash([i for s in sources for i in source_identity(s)])}"
        folder = Path(data.data_dir).expanduser() / "mix" / name
        subset = "default"
    else:
        folder = Path(data.data_dir).expanduser() / dataset_slug(data.dataset)
        # Local data has no subsets: dataset_subset (which defaults to a hub subset) is ignored for it.
        subset = "default" if looks_local(data.dataset) else (data.dataset_subset or "default")
    folder = folder / _slug_part(subset)
    name = split_name(data)
    values, defaults = dataclasses.asdict(data), dataclasses.asdict(DataConfig())
    if any(values[k] != defaults[k] for k in PREPARE_FIELDS) or _objective_settings(objective):
        changed = {**{k: values[k] for k in PREPARE_FIELDS}, **_objective_settings(objective)}
        name += f"-cfg{settings_hash(changed)[:8]}"
    return folder / name


def model_slug(hf_model_id: str) -> Path:
    """Model id as folders; the embedded model under its hub id; a local folder as ``local/<name>``."""
    if hf_model_id == EMBEDDED_MODEL:
        return id_as_folders(EMBEDDED_MODEL_ID)
    path = Path(hf_model_id).expanduser()
    if hf_model_id.startswith((".", "/", "~")) or path.is_dir():
        return Path("local") / _slug_part(path.resolve().name)
    return id_as_folders(hf_model_id)


def results_root(cfg: PipelineConfig) -> Path:
    """``<results_dir>/<model id as folders>``."""
    return Path(cfg.train.results_dir).expanduser() / model_slug(cfg.model.hf_model_id)


def checkpoints_dir(cfg: PipelineConfig) -> Path:
    return results_root(cfg) / "checkpoints"


def run_version(folder: Path) -> int | None:
    """N of a ``version_<N>`` run folder, else None."""
    tail = folder.name.removeprefix("version_")
    return int(tail) if folder.name.startswith("version_") and tail.isdigit() else None


def run_checkpoint_dirs(cfg: PipelineConfig) -> list[Path]:
    """The runs' checkpoint folders, oldest first: ``[checkpoint_dir]`` when it is set, else the
    ``version_<N>`` folders of ``checkpoints_dir(cfg)`` by N."""
    if cfg.train.checkpoint_dir:
        return [Path(cfg.train.checkpoint_dir).expanduser()]
    runs = [p for p in checkpoints_dir(cfg).glob("version_*") if p.is_dir() and run_version(p) is not None]
    return sorted(runs, key=run_version)


def tb_logs_dir(cfg: PipelineConfig) -> Path:
    return results_root(cfg) / "tb_logs"


#: Configured folders that commands write to or read from, by field.
FOLDER_FIELDS = (
    "data_dir",
    "prepared_dir",
    "results_dir",
    "checkpoint_dir",
    "export_dir",
    "eval_dir",
    "model_cache_dir",
)
_FOLDER_REASONS = {
    errno.EACCES: "it is not writable (permission denied)",
    errno.EPERM: "it cannot be written (operation not permitted)",
    errno.EROFS: "it is on a read-only file system",
    errno.ENOSPC: "its disk is full (no space left on device)",
    errno.EDQUOT: "its disk quota is exceeded",
    errno.ENOTDIR: "a file stands where a folder belongs",
    errno.EEXIST: "a file of that name is in the way",
    errno.EISDIR: "a folder stands where a file belongs",
    errno.ENAMETOOLONG: "the path is too long",
}


def configured_folders(cfg: PipelineConfig) -> dict[str, Path]:
    """The configured folders that are set, by field."""
    flat = cfg.to_flat()
    return {field: Path(flat[field]).expanduser() for field in FOLDER_FIELDS if flat.get(field)}


def folder_error(err: BaseException, cfg: PipelineConfig) -> str | None:
    """A file-system error on one of the configured folders as one message naming the field (None when
    ``err`` is not such an error)."""
    if not isinstance(err, OSError):
        return None
    names = [Path(os.fsdecode(n)).expanduser().absolute() for n in (err.filename, err.filename2) if n]
    for path in names:
        for field, folder in configured_folders(cfg).items():
            folder = folder.absolute()
            if path == folder or folder in path.parents:
                reason = _FOLDER_REASONS.get(err.errno or -1, err.strerror or type(err).__name__)
                return (
                    f"{field}: {folder} cannot be used: {reason} ({path}). Give {field} a folder you can "
                    "write to, with room for the output"
                )
    return None


def check_output_folder(field: str, folder: Path) -> None:
    """Raise ConfigError when ``folder`` (a configured output folder) cannot be created or written, before
    anything is written: a file in its place or above it, or a parent that is not writable."""
    from ftpipe.config.errors import ConfigError

    folder = folder.expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under {existing}, which is a file"
        raise ConfigError([f"{field}: {folder} {where}; give {field} a folder"])
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            [
                f"{field}: {folder} cannot be written ({existing} is not writable); give {field} a folder you can write to"
            ]
        )
