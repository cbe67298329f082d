"""Rank 0's work: format every row of every source, drop and count bad ones, mix and split with a seed,
write the folder.

Files are written to temporary names and renamed; ``.data_ready`` is written last, after every
other file is complete and flushed, so a folder without it is never used.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ftpipe.config.io import CONFIG_FILENAME, save_config
from ftpipe.config.mix import SourceSettings
from ftpipe.config.paths import source_identity
from ftpipe.config.schema import DataConfig, PipelineConfig
from ftpipe.data.errors import BadRow, DataError, bad_row_error
from ftpipe.data.formats import ConverterStopped, RowFormat, make_converter, replace_text, row_format
from ftpipe.data.jsonscan import RAW_COLUMN
from ftpipe.data.manifest import MANIFEST_NAME
from ftpipe.data.manifest import READY_MARKER as READY_MARKER
from ftpipe.data.mix import SPLITS, allocate_splits, mix_targets, select_source_rows, shuffle_split
from ftpipe.data.mix import split_counts as split_counts
from ftpipe.data.preference import (
    PAIR_OBJECTIVES,
    PairFormat,
    pair_columns_problem,
    pair_format,
    record_uses_tools,
    sft_columns_problem,
)
from ftpipe.data.sources import ROW_NUMBERS, Part, Source, load_parts
from ftpipe.utils.logging import get_logger, global_rank

log = get_logger(__name__)

SPLIT_FILES = {"train": "training.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
_FEATURES = datasets.Features(
    {
        "id": datasets.Value("int64"),
        "line": datasets.Value("string"),
        "reason": datasets.Value("string"),
        "detail": datasets.Value("string"),
        "notes": datasets.List(datasets.Value("string")),
        "tools": datasets.Value("bool"),
    }
)
_COERCED_HELP = (
    "a JSON number or boolean where text belongs (with on_bad_row: skip it is taken as its JSON text "
    "and counted)"
)


def drop_nested_nulls(value: Any, top: bool = True) -> Any:
    """``value`` without null entries of the objects nested in it (a row's own columns are kept).

    Arrow (Parquet, hub and save_to_disk data) gives every object in a column the same keys, filling
    the absent ones with null, so a null there cannot mean anything of the row's own.
    """
    if isinstance(value, dict):
        return {k: drop_nested_nulls(v, False) for k, v in value.items() if top or v is not None}
    if isinstance(value, list):
        return [drop_nested_nulls(v, False) for v in value]
    return value


def _raw_row(batch: dict[str, list], j: int, part: Part) -> dict[str, Any]:
    if part.raw:
        return json.loads(batch[RAW_COLUMN][j])
    return drop_nested_nulls({c: batch[c][j] for c in batch})


def _format_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    fmt: RowFormat | PairFormat,
    part: Part,
    offset: int,
    fail: bool,
    source: str,
    replacements: dict[str, str] | None = None,
) -> dict[str, list]:
    out: dict[str, list] = {"id": [], "line": [], "reason": [], "detail": [], "notes": [], "tools": []}
    for j, index in enumerate(indices):
        position = part.positions[index] if part.positions is not None else index
        row_id = offset + position
        notes: list[str] = []
        try:
            raw = replace_text(_raw_row(batch, j, part), replacements or {})
            record = fmt(raw, notes)
            coerced = [note for note in notes if note.startswith("coerced:")]
            if coerced and fail:
                raise BadRow(coerced[0], _COERCED_HELP)
            line = json.dumps({"id": row_id, "source": source, **record}, ensure_ascii=False)
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as err:
                raise BadRow("invalid_utf8", "a value holds characters that are not valid UTF-8") from err
        except ConverterStopped as err:
            raise err.at(f"{part.name}: {part.label(position)}") from err.__cause__
        except BadRow as err:
            if fail and err.fatal:
                raise bad_row_error(part.name, part.label(position), err.reason, err.detail) from None
            out["id"].append(row_id)
            out["line"].append(None)
            out["reason"].append(err.reason)
            out["detail"].append(f"{part.name}: {part.label(position)}: {err.detail}")
            out["notes"].append([])
            out["tools"].append(False)
            continue
        out["id"].append(row_id)
        out["line"].append(line)
        out["reason"].append(None)
        out["detail"].append(None)
        out["notes"].append(sorted(set(notes)))
        out["tools"].append(record_uses_tools(record))
    return out


@dataclass
class Formatted:
    """One source's rows formatted: one ``id/line/reason/detail/notes/tools`` row per loaded row."""

    name: str
    dataset: datasets.Dataset
    rows_read: int
    formats: dict[str, str]
    dropped: Counter = field(default_factory=Counter)
    coerced: Counter = field(default_factory=Counter)
    #: rows kept with a warning (``converter_dropped:<field>``), by note.
    warned: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    usable: list[int] = field(default_factory=list)
    rows_with_tools: int = 0


def _check_readable(part: Part, origin: str) -> None:
    """A file with no rows, or none that could be read, is one error naming it (not a missing column)."""
    where = f"{origin}: " if origin != "dataset" else ""
    if part.records == 0:
        raise DataError(f"{where}{part.name}: holds no rows (only a header?); give a file with data")
    if len(part.dataset) == 0 and part.bad:
        reasons = Counter(reason for _, reason, _ in part.bad)
        counts = ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()))
        first = part.bad[0]
        raise DataError(
            f"{where}{part.name}: none of its {part.records} rows can be read ({counts}); the first, "
            f"{part.label(first[0])}: {first[2]}. Check the file's format and encoding (UTF-8)"
        )


def _check_columns(part: Part, fmt: RowFormat | PairFormat, origin: str) -> None:
    columns = part.columns
    where = f"{origin}: " if origin != "dataset" else ""
    problem = (
        pair_columns_problem(fmt, columns)
        if isinstance(fmt, PairFormat)
        else sft_columns_problem(fmt, columns)
    )
    if problem:
        raise DataError(f"{where}{part.name}: {problem}")
    missing = [c for c in fmt.required_columns() if c not in columns]
    if not missing:
        return
    if fmt.kind == "alpaca" and isinstance(fmt, RowFormat):
        assert fmt.alpaca is not None
        named = ", ".join(
            f"{c!r} (field_mapping {f}: {c})" for f, c in fmt.alpaca.field_mapping.items() if c in missing
        )
        fix = "map each template field to an existing column in field_mapping, or fix the data"
    else:
        named = ", ".join(repr(c) for c in missing)
        fix = "set data_format to the format of the data, or give a converter"
    raise DataError(f"{where}{part.name}: no column {named}; its columns are {columns}. {fix}")


def format_source(
    spec: SourceSettings,
    parts: list[Part],
    work_dir: Path,
    fail: bool,
    digest: str,
    index: int,
    offset: int,
    objective: str = "sft",
) -> Formatted:
    """Format every row of one source's parts with ``datasets.map``; columns are checked before any work.

    Row ids continue from ``offset`` (the rows of the sources before this one); a preference
    ``objective`` (dpo) reads preference layouts and writes pair records (``ftpipe.data.preference``).
    """
    data = spec.data
    converter = make_converter(data)
    pairs = objective in PAIR_OBJECTIVES
    fmts: list[RowFormat | PairFormat] = [
        pair_format(data, part.columns, converter) if pairs else row_format(data, part.columns, converter)
        for part in parts
    ]
    for part, fmt in zip(parts, fmts, strict=True):
        _check_readable(part, spec.origin)
        _check_columns(part, fmt, spec.origin)
    result = Formatted(spec.name, datasets.Dataset.from_dict({}), sum(p.records for p in parts), {})
    mapped = []
    for i, (part, fmt) in enumerate(zip(parts, fmts, strict=True)):
        result.formats[part.name] = fmt.kind
        for position, reason, detail in part.bad:
            result.dropped[reason] += 1
            result.examples.setdefault(reason, f"{part.name}: {part.label(position)}: {detail}")
        fn = partial(
            _format_batch,
            fmt=fmt,
            part=part,
            offset=offset,
            fail=fail,
            source=spec.name,
            replacements=data.text_replacements,
        )
        mapped.append(
            part.dataset.map(
                fn,
                batched=True,
                with_indices=True,
                remove_columns=part.dataset.column_names,
                features=_FEATURES,
                new_fingerprint=f"ftpipe-{digest}-{index}-{i}",
                cache_file_name=str(work_dir / f"formatted-{index}-{i}.arrow"),
                load_from_cache_file=False,
                desc=f"ftpipe: formatting {Path(part.name).name}",
            )
        )
        offset += part.records
    result.dataset = datasets.concatenate_datasets(mapped) if mapped else result.dataset
    row = 0
    columns = ["reason", "detail", "notes", "tools"]
    for batch in result.dataset.select_columns(columns).iter(batch_size=8192):
        for reason, detail, notes, tools in zip(*(batch[c] for c in columns), strict=True):
            if reason is None:
                result.usable.append(row)
                result.coerced.update(n for n in notes if n.startswith("coerced:"))
                result.warned.update(n for n in notes if not n.startswith("coerced:"))
                result.rows_with_tools += bool(tools)
            else:
                result.dropped[reason] += 1
                result.examples.setdefault(reason, detail)
            row += 1
    return result


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """A full disk's OSError that names no file gets ``path``: the message then says what was being written."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_atomic(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary name, flush and fsync, then rename onto ``path``."""
    tmp = _tmp(path)
    with naming(path):
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


def _log_source(result: Formatted, several: bool) -> None:
    prefix = f"{result.name}: " if several else ""
    total = sum(result.dropped.values())
    if total:
        per_reason = ", ".join(f"{r}={n}" for r, n in sorted(result.dropped.items()))
        log.warning(
            "%sDropped %d of %d rows (on_bad_row: skip): %s", prefix, total, result.rows_read, per_reason
        )
        for reason, example in sorted(result.examples.items()):
            log.warning("  first %s: %s", reason, example)
    for note, count in sorted(result.warned.items()):
        field_name = note.split(":", 1)[-1]
        log.warning(
            "%sin %d of %d rows the converter's result does not contain the row's %r, a field the "
            "templates use: the converter drops it (check that this is meant)",
            prefix,
            count,
            result.rows_read,
            field_name,
        )
    if result.coerced:
        per_field = ", ".join(f"{r}={n}" for r, n in sorted(result.coerced.items()))
        log.warning(
            "%s%d rows hold a JSON number or boolean where text belongs; taken as its JSON text: %s",
            prefix,
            sum(result.coerced.values()),
            per_field,
        )


def _no_usable_rows(result: Formatted, spec: SourceSettings) -> DataError:
    reasons = ", ".join(f"{r}={n}" for r, n in sorted(result.dropped.items())) or "the source is empty"
    where = f"{spec.origin} ({spec.name})" if spec.origin != "dataset" else "dataset"
    return DataError(
        f"{where} {spec.data.dataset!r}: no usable rows ({result.rows_read} read; dropped: {reasons}). "
        "Check the data format, field_mapping and templates."
    )


def _check_tool_template(cfg: PipelineConfig, results: list[Formatted]) -> None:
    """Rows with tools need a template that renders tools, calls and results: checked before any split is
    written (and so before any training)."""
    with_tools = {r.name: r.rows_with_tools for r in results if r.rows_with_tools}
    if not with_tools:
        return
    from ftpipe.data.tokenize import check_tool_template
    from ftpipe.model.tokenizer import load_tokenizer

    where = ", ".join(f"{name}: {n} rows" for name, n in with_tools.items())
    check_tool_template(load_tokenizer(cfg.model), f"the data uses tools ({where})")


def _select(results: list[Formatted], sources: list[SourceSettings], data: DataConfig) -> tuple[dict, list]:
    """Global row indices (into the concatenated formatted rows) of each split, and per-source counts."""
    sizes = [len(r.usable) for r in results]
    targets = mix_targets(
        sizes, [s.weight for s in sources], [s.num_samples for s in sources], data.max_samples
    )
    allocation = allocate_splits(targets, (data.train_ratio, data.val_ratio, data.test_ratio))
    splits: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    repeated, base = False, 0
    for i, result in enumerate(results):
        chosen, again = select_source_rows(sizes[i], allocation[i], data.split_seed, i)
        repeated |= again
        usable = np.asarray(result.usable, dtype=np.int64) + base
        for name in SPLITS:
            splits[name].append(usable[chosen[name]])
        base += len(result.dataset)
    ordered = {}
    for k, name in enumerate(SPLITS):
        rows = np.concatenate(splits[name]) if splits[name] else np.empty(0, dtype=np.int64)
        ordered[name] = shuffle_split(rows, data.split_seed, k) if (len(results) > 1 or repeated) else rows
    return ordered, [{"rows_selected": t, "counts": a} for t, a in zip(targets, allocation, strict=True)]


def _source_manifest(
    spec: SourceSettings, source: Source, files: list[dict], result: Formatted, chosen: dict
) -> dict:
    return {
        "dataset": spec.data.dataset,
        "identity": source_identity(spec.data.dataset),
        "origin": spec.origin,
        "kind": source.kind,
        "subset": spec.data.dataset_subset if source.kind == "hub" else None,
        "split": spec.data.dataset_split if source.kind != "files" else None,
        "files": files,
        "formats": result.formats,
        "weight": spec.weight,
        "num_samples": spec.num_samples,
        "rows_read": result.rows_read,
        "rows_dropped": dict(sorted(result.dropped.items())),
        "rows_coerced": dict(sorted(result.coerced.items())),
        "rows_warned": dict(sorted(result.warned.items())),
        "rows_usable": len(result.usable),
        "rows_with_tools": result.rows_with_tools,
        **chosen,
    }


def build_prepared(
    cfg: PipelineConfig,
    inputs: list[tuple[SourceSettings, Source]],
    files_of: list[list[dict]],
    settings: dict,
    digest: str,
    folder: Path,
) -> dict:
    """Prepare ``folder`` (a fresh staging folder, swapped in by the caller) from the sources (``files_of``:
    each source's files with size and mtime); returns the manifest. The caller holds the folder's lock."""
    data, started = cfg.data, time.time()
    fail = data.on_bad_row == "fail"
    clean_folder(folder)
    work_dir = folder / f".work-{os.getpid()}"
    try:
        results, offset = [], 0
        for i, (spec, source) in enumerate(inputs):
            d = spec.data
            # no reference to the raw parts is kept past formatting: their memory-mapped Arrow files are then
            # unmapped, and the split writing below does not hold them in the process's memory as well
            with naming(work_dir):
                result = format_source(
                    spec,
                    load_parts(source, d.dataset_subset, d.dataset_split, work_dir / f"source-{i}", fail),
                    work_dir,
                    fail,
                    digest,
                    i,
                    offset,
                    cfg.objective.objective,
                )
            offset += result.rows_read
            _log_source(result, len(inputs) > 1)
            if not result.usable:
                raise _no_usable_rows(result, spec)
            results.append(result)
        _check_tool_template(cfg, results)
        combined = datasets.concatenate_datasets([r.dataset for r in results])
        chosen, per_source = _select(results, [spec for spec, _ in inputs], data)
        for name, filename in SPLIT_FILES.items():
            rows = combined.select(chosen[name]) if len(chosen[name]) else None
            write_atomic(folder / filename, partial(_write_split, rows))
        counts = {name: len(chosen[name]) for name in SPLIT_FILES}
        kinds = {kind for r in results for kind in r.formats.values()}
        dropped = sum((r.dropped for r in results), Counter())
        coerced = sum((r.coerced for r in results), Counter())
        sources = {
            spec.name: _source_manifest(spec, source, files, result, chosen_counts)
            for (spec, source), files, result, chosen_counts in zip(
                inputs, files_of, results, per_source, strict=True
            )
        }
        first_spec, first_source = inputs[0]
        manifest = {
            "source": {
                "dataset": first_spec.data.dataset
                if len(inputs) == 1
                else [s.data.dataset for s, _ in inputs],
                "kind": first_source.kind if len(inputs) == 1 else "mix",
                "subset": data.dataset_subset if first_source.kind == "hub" and len(inputs) == 1 else None,
                "split": data.dataset_split if first_source.kind != "files" and len(inputs) == 1 else None,
                "identity": [i for spec, _ in inputs for i in source_identity(spec.data.dataset)],
                "files": [entry for files in files_of for entry in files],
            },
            "sources": sources,
            "settings": settings,
            "settings_hash": digest,
            "objective": cfg.objective.objective,
            "format": kinds.pop() if len(kinds) == 1 else "mixed",
            "formats": {part: kind for r in results for part, kind in r.formats.items()},
            "rows_read": sum(r.rows_read for r in results),
            "rows_dropped": dict(sorted(dropped.items())),
            "rows_coerced": dict(sorted(coerced.items())),
            "rows_usable": sum(len(r.usable) for r in results),
            "rows_with_tools": sum(r.rows_with_tools for r in results),
            "rows_selected": sum(counts.values()),
            "counts": counts,
            "files": SPLIT_FILES,
            "ids": "each line's id is the row's index in the sources (sources and files in order, unreadable rows counted); source names its source",
            "row_numbers": ROW_NUMBERS,
            "prepared_by": {"rank": global_rank(), "host": socket.gethostname(), "pid": os.getpid()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 3),
            "versions": {"datasets": datasets.__version__},
        }
        if len(inputs) > 1:
            for name, entry in sources.items():
                log.info(
                    "%s: %d rows read, %d usable, %d selected: train %d, validation %d, test %d",
                    name,
                    entry["rows_read"],
                    entry["rows_usable"],
                    entry["rows_selected"],
                    *(entry["counts"][s] for s in SPLITS),
                )
        write_atomic(folder / MANIFEST_NAME, lambda fh: json.dump(manifest, fh, indent=2, ensure_ascii=False))
        with naming(folder / CONFIG_FILENAME):
            save_config(cfg, folder)
        _fsync_dir(folder)
        write_atomic(folder / READY_MARKER, lambda fh: fh.write(f"{digest}\n"))
        _fsync_dir(folder)
        return manifest
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
