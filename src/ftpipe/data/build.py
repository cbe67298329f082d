"""Rank 0's work: format every row, drop and count bad ones, split with a seed, write the folder.

Files are written to temporary names and renamed; ``.data_ready`` is written last, after every
other file is complete and flushed, so a folder without it is never used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from ftpipe.config.io import CONFIG_FILENAME, save_config
from ftpipe.config.schema import DataConfig, PipelineConfig
from ftpipe.data.errors import BadRow, DataError, bad_row_error
from ftpipe.data.formats import RowFormat, load_converter, replace_text, row_format
from ftpipe.data.sources import ROW_NUMBERS, Part, Source, load_parts
from ftpipe.utils.logging import get_logger, global_rank

log = get_logger(__name__)

SPLIT_FILES = {"train": "training.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
MANIFEST_NAME = "manifest.json"
READY_MARKER = ".data_ready"
_FEATURES = datasets.Features(
    {
        "id": datasets.Value("int64"),
        "line": datasets.Value("string"),
        "reason": datasets.Value("string"),
        "detail": datasets.Value("string"),
    }
)


def split_counts(n: int, train_ratio: float, val_ratio: float, test_ratio: float) -> dict[str, int]:
    """Rows per split: floor for validation and test, the rest to train; a split whose ratio is
    above 0 gets at least one row while train keeps at least one."""
    del train_ratio  # train takes the rest
    counts = {"validation": math.floor(n * val_ratio + 1e-9), "test": math.floor(n * test_ratio + 1e-9)}
    for name, ratio in (("validation", val_ratio), ("test", test_ratio)):
        if ratio > 0 and counts[name] == 0 and n - sum(counts.values()) >= 2:
            counts[name] = 1
    return {"train": n - counts["validation"] - counts["test"], **counts}


def _format_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    fmt: RowFormat,
    part: Part,
    offset: int,
    fail: bool,
    replacements: dict[str, str] | None = None,
) -> dict[str, list]:
    out: dict[str, list] = {"id": [], "line": [], "reason": [], "detail": []}
    columns = list(batch)
    for j, index in enumerate(indices):
        position = part.positions[index] if part.positions is not None else index
        row_id = offset + position
        try:
            raw = replace_text({c: batch[c][j] for c in columns}, replacements or {})
            line = json.dumps({"id": row_id, **fmt(raw)}, ensure_ascii=False)
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as err:
                raise BadRow("invalid_utf8", "a value holds characters that are not valid UTF-8") from err
        except BadRow as err:
            if fail and err.fatal:
                raise bad_row_error(part.name, part.label(position), err.reason, err.detail) from None
            out["id"].append(row_id)
            out["line"].append(None)
            out["reason"].append(err.reason)
            out["detail"].append(f"{part.name}: {part.label(position)}: {err.detail}")
            continue
        out["id"].append(row_id)
        out["line"].append(line)
        out["reason"].append(None)
        out["detail"].append(None)
    return out


@dataclass
class Formatted:
    """All rows formatted: one ``id/line/reason/detail`` row per loaded row."""

    dataset: datasets.Dataset
    rows_read: int
    formats: dict[str, str]
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    usable: list[int] = field(default_factory=list)


def _check_columns(part: Part, fmt: RowFormat) -> None:
    columns = part.dataset.column_names
    missing = [c for c in fmt.required_columns() if c not in columns]
    if not missing:
        return
    if fmt.kind == "alpaca":
        assert fmt.alpaca is not None
        named = ", ".join(
            f"{c!r} (field_mapping {f}: {c})" for f, c in fmt.alpaca.field_mapping.items() if c in missing
        )
        fix = "map each template field to an existing column in field_mapping, or fix the data"
    else:
        named = ", ".join(repr(c) for c in missing)
        fix = "set data_format to the format of the data, or give a converter"
    raise DataError(f"{part.name}: no column {named}; its columns are {columns}. {fix}")


def format_parts(parts: list[Part], data: DataConfig, work_dir: Path, fail: bool, digest: str) -> Formatted:
    """Format every row of every part with ``datasets.map``; columns are checked before any work."""
    converter = load_converter(data.converter) if data.converter else None
    fmts = [row_format(data, part.dataset.column_names, converter) for part in parts]
    for part, fmt in zip(parts, fmts, strict=True):
        _check_columns(part, fmt)
    result = Formatted(datasets.Dataset.from_dict({}), sum(p.records for p in parts), {})
    mapped, offset = [], 0
    for i, (part, fmt) in enumerate(zip(parts, fmts, strict=True)):
        result.formats[part.name] = fmt.kind
        for position, reason, detail in part.bad:
            result.dropped[reason] += 1
            result.examples.setdefault(reason, f"{part.name}: {part.label(position)}: {detail}")
        fn = partial(
            _format_batch, fmt=fmt, part=part, offset=offset, fail=fail, replacements=data.text_replacements
        )
        mapped.append(
            part.dataset.map(
                fn,
                batched=True,
                with_indices=True,
                remove_columns=part.dataset.column_names,
                features=_FEATURES,
                new_fingerprint=f"ftpipe-{digest}-{i}",
                cache_file_name=str(work_dir / f"formatted-{i}.arrow"),
                load_from_cache_file=False,
                desc=f"ftpipe: formatting {Path(part.name).name}",
            )
        )
        offset += part.records
    result.dataset = datasets.concatenate_datasets(mapped) if mapped else result.dataset
    index = 0
    for batch in result.dataset.select_columns(["reason", "detail"]).iter(batch_size=8192):
        for reason, detail in zip(batch["reason"], batch["detail"], strict=True):
            if reason is None:
                result.usable.append(index)
            else:
                result.dropped[reason] += 1
                result.examples.setdefault(reason, detail)
            index += 1
    return result


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary name, flush and fsync, then rename onto ``path``."""
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _write_split(ds: datasets.Dataset | None, fh: Any) -> None:
    if ds is None:  # an empty split: an empty file
        return
    for batch in ds.iter(batch_size=4096):
        fh.writelines(line + "\n" for line in batch["line"])


def clean_folder(folder: Path) -> None:
    """Remove the marker first, then leftovers of an earlier or interrupted preparation."""
    (folder / READY_MARKER).unlink(missing_ok=True)
    for path in folder.glob(".*.tmp-*"):
        path.unlink(missing_ok=True)
    for path in folder.glob(".work-*"):
        shutil.rmtree(path, ignore_errors=True)
    for name in [*SPLIT_FILES.values(), MANIFEST_NAME, CONFIG_FILENAME]:
        (folder / name).unlink(missing_ok=True)


def _log_dropped(result: Formatted) -> None:
    total = sum(result.dropped.values())
    if not total:
        return
    per_reason = ", ".join(f"{r}={n}" for r, n in sorted(result.dropped.items()))
    log.warning("Dropped %d of %d rows (on_bad_row: skip): %s", total, result.rows_read, per_reason)
    for reason, example in sorted(result.examples.items()):
        log.warning("  first %s: %s", reason, example)


def build_prepared(
    cfg: PipelineConfig, source: Source, fingerprint: list[dict], settings: dict, digest: str, folder: Path
) -> dict:
    """Prepare ``folder`` from the source; returns the manifest. The caller holds the folder's lock."""
    data, started = cfg.data, time.time()
    clean_folder(folder)
    work_dir = folder / f".work-{os.getpid()}"
    try:
        parts = load_parts(
            source, data.dataset_subset, data.dataset_split, work_dir, data.on_bad_row == "fail"
        )
        result = format_parts(parts, data, work_dir, data.on_bad_row == "fail", digest)
        _log_dropped(result)
        if not result.usable:
            reasons = (
                ", ".join(f"{r}={n}" for r, n in sorted(result.dropped.items())) or "the source is empty"
            )
            raise DataError(
                f"dataset {data.dataset!r}: no usable rows ({result.rows_read} read; dropped: {reasons}). "
                "Check the data format, field_mapping and templates."
            )
        usable = result.dataset.select(result.usable).shuffle(seed=data.split_seed, keep_in_memory=True)
        selected = min(len(usable), data.max_samples or len(usable))
        counts = split_counts(selected, data.train_ratio, data.val_ratio, data.test_ratio)
        start = 0
        for name, filename in SPLIT_FILES.items():
            rows = usable.select(range(start, start + counts[name])) if counts[name] else None
            write_atomic(folder / filename, partial(_write_split, rows))
            start += counts[name]
        kinds = set(result.formats.values())
        manifest = {
            "source": {
                "dataset": data.dataset,
                "kind": source.kind,
                "subset": data.dataset_subset if source.kind == "hub" else None,
                "split": data.dataset_split if source.kind != "files" else None,
                "files": fingerprint,
            },
            "settings": settings,
            "settings_hash": digest,
            "format": kinds.pop() if len(kinds) == 1 else "mixed",
            "formats": result.formats,
            "rows_read": result.rows_read,
            "rows_dropped": dict(sorted(result.dropped.items())),
            "rows_usable": len(result.usable),
            "rows_selected": selected,
            "counts": counts,
            "files": SPLIT_FILES,
            "ids": "each line's id is the row's index in the source (files in order, unreadable rows counted)",
            "row_numbers": ROW_NUMBERS,
            "prepared_by": {"rank": global_rank(), "host": socket.gethostname(), "pid": os.getpid()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 3),
            "versions": {"datasets": datasets.__version__},
        }
        write_atomic(folder / MANIFEST_NAME, lambda fh: json.dump(manifest, fh, indent=2, ensure_ascii=False))
        save_config(cfg, folder)
        _fsync_dir(folder)
        write_atomic(folder / READY_MARKER, lambda fh: fh.write(f"{digest}\n"))
        _fsync_dir(folder)
        return manifest
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
