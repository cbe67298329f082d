"""Exact reading of JSON, JSON Lines and CSV files: every value keeps the type its own row gives it.

``datasets``' JSON and CSV loaders infer one type per column from all rows, so one numeric answer in
a file turns the text answers that look like numbers (``"0"``, ``"42"``) into numbers, and numeric CSV
cells stop being text. Here every record is parsed on its own (Python's ``json``, the ``csv`` module:
a CSV cell is always text) and kept as its JSON text in a one-column Arrow file (``__json__``) that
``datasets`` memory-maps; the format step decodes each row back. Unreadable records (unparsable
JSON, invalid UTF-8, not an object, values nested deeper than :data:`MAX_DEPTH` levels, a CSV row with
more cells than the header) are found by their row number and reported, and the rest is read.

Row numbers: 1-based line numbers for JSON Lines, 0-based indices for JSON arrays and CSV rows
(header excluded).
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ftpipe.data.errors import DataError, bad_row_error

#: (record position, reason, detail) of a record that could not be read.
BadRecord = tuple[int, str, str]
#: The one column of a raw-row Arrow file: each row's JSON text.
RAW_COLUMN = "__json__"
_SCHEMA = pa.schema([(RAW_COLUMN, pa.string())])
_BATCH = 8192
_CSV_FIELD_LIMIT = 2**31 - 1
#: the deepest nesting of lists and objects a row may have (the row object is level 1); deeper rows are
#: bad rows (``too_deep``): no real data set nests that deep, and Python's recursion would not follow.
MAX_DEPTH = 100
TOO_DEEP = (
    "too_deep",
    f"values nested more than {MAX_DEPTH} levels deep (lists or objects inside each other)",
)
_BLANK = re.compile(r"[ \t\n\r]*")


def too_deep(value: Any, text: str | None = None, limit: int = MAX_DEPTH) -> bool:
    """True when lists and objects nest more than ``limit`` levels in ``value`` (found without recursion;
    ``text``, its JSON text, lets shallow rows skip the walk)."""
    if text is not None and text.count("[") + text.count("{") <= limit:
        return False
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


@dataclass
class JsonScan:
    """What a scan found in one file."""

    records: int = 0
    #: record position of each row of the Arrow file, in order (the good records).
    good: list[int] = field(default_factory=list)
    #: 1-based line of each record (JSON Lines); None for JSON arrays and CSV (0-based indices).
    line_numbers: list[int] | None = None
    bad: list[BadRecord] = field(default_factory=list)
    #: every top-level key seen in a good record, in order of first appearance.
    columns: list[str] = field(default_factory=list)
    #: the Arrow file holding the good records' JSON text.
    arrow_file: Path | None = None

    def label(self, position: int) -> str:
        if self.line_numbers is not None:
            return f"line {self.line_numbers[position]}"
        return f"row {position}"


class _RawWriter:
    """Streams JSON texts into an Arrow file (IPC stream format, what ``datasets`` memory-maps)."""

    def __init__(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        self.target = target
        self._sink = pa.OSFile(str(target), "wb")
        self._writer = pa.ipc.new_stream(self._sink, _SCHEMA)
        self._pending: list[str] = []
        self._columns: dict[str, None] = {}

    def add(self, record: dict[str, Any], text: str | None = None) -> None:
        self._columns.update(dict.fromkeys(record))
        self._pending.append(text if text is not None else json.dumps(record, ensure_ascii=False))
        if len(self._pending) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(pa.record_batch([pa.array(self._pending, pa.string())], schema=_SCHEMA))
            self._pending = []

    def close(self) -> list[str]:
        self._flush()
        self._writer.close()
        self._sink.close()
        return list(self._columns)


def _writer_for(path: Path, work_dir: Path) -> _RawWriter:
    work_dir.mkdir(parents=True, exist_ok=True)
    return _RawWriter(work_dir / f"raw-{len(list(work_dir.glob('raw-*')))}-{path.stem}.arrow")


def json_layout(path: Path) -> str:
    """``array`` when the file's first non-blank character is ``[``, else ``lines``."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8) :]
    return "array" if head.lstrip()[:1] == b"[" else "lines"


def _parse_line(raw: bytes) -> tuple[dict | None, str, str]:
    """(the object, its text, "") for a JSON object line, else (None, reason, detail)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, "invalid_utf8", f"invalid UTF-8 (byte {err.start} of the line)"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, "invalid_json", f"unparsable JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return None, *TOO_DEEP
    if not isinstance(obj, dict):
        return None, "not_an_object", f"a JSON {type(obj).__name__}, not an object"
    if too_deep(obj, text):
        return None, *TOO_DEEP
    return obj, text.strip(), ""


def _record(
    scan: JsonScan, writer: _RawWriter, path: Path, label: str, fail: bool, problem: tuple[str, str] | None
) -> bool:
    """Count one record; True when it is good (the caller then writes it)."""
    position = scan.records
    scan.records += 1
    if problem is None:
        scan.good.append(position)
        return True
    if fail:
        writer.close()
        raise bad_row_error(str(path), label, *problem)
    scan.bad.append((position, *problem))
    return False


def scan_json_lines(path: Path, work_dir: Path, fail: bool) -> JsonScan:
    """Read every line of a JSON Lines file; with ``fail`` stop at the first bad one."""
    scan = JsonScan(line_numbers=[])
    lines = scan.line_numbers
    assert lines is not None
    writer = _writer_for(path, work_dir)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            lines.append(lineno)
            obj, text, detail = _parse_line(raw)
            if _record(
                scan, writer, path, f"line {lineno}", fail, None if obj is not None else (text, detail)
            ):
                assert obj is not None
                writer.add(obj, text)
    scan.columns = writer.close()
    scan.arrow_file = writer.target
    return scan


def _has_surrogate(value: Any) -> bool:
    """True when a decoded string holds bytes that were not valid UTF-8 (surrogate escapes)."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


class _TooDeep:
    """An array element nested too deeply to be parsed (it was skipped)."""


def _value_end(text: str, start: int) -> int:
    """Where the JSON value (a list or an object) starting at ``start`` ends, found without parsing it."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise json.JSONDecodeError("unterminated value", text, start)


def _array_items(text: str) -> list[Any]:
    """The elements of a JSON array parsed one by one, an element nested too deeply for Python's parser
    as a ``_TooDeep`` (the whole array at once raises RecursionError)."""
    decoder = json.JSONDecoder()
    i = _BLANK.match(text, 0).end()  # type: ignore[union-attr]
    if text[i : i + 1] != "[":
        return decoder.decode(text)  # not an array: the caller names what it is
    items: list[Any] = []
    i = _BLANK.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i : i + 1] == "]":
        return items
    while True:
        try:
            item, i = decoder.raw_decode(text, i)
        except RecursionError:
            item, i = _TooDeep(), _value_end(text, i)
        items.append(item)
        i = _BLANK.match(text, i).end()  # type: ignore[union-attr]
        if text[i : i + 1] == ",":
            i = _BLANK.match(text, i + 1).end()  # type: ignore[union-attr]
        elif text[i : i + 1] == "]" and not text[i + 1 :].strip():
            return items
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter or the end of the array", text, i)


def scan_json_array(path: Path, work_dir: Path, fail: bool) -> JsonScan:
    """Read every element of a JSON array file (rows are 0-based indices)."""
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        try:
            items = json.loads(text)
        except RecursionError:  # an element nested too deeply: parse them one by one to name it
            items = _array_items(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); a .json file "
            "must hold an array of row objects, or one JSON object per line (JSON Lines)"
        ) from err
    except RecursionError as err:
        raise DataError(f"{path}: {TOO_DEEP[1]}; a .json file must hold an array of row objects") from err
    if not isinstance(items, list):
        raise DataError(f"{path}: the JSON top level is a {type(items).__name__}; expected an array of rows")
    scan = JsonScan()
    writer = _writer_for(path, work_dir)
    for position, item in enumerate(items):
        problem = None
        if isinstance(item, _TooDeep) or (isinstance(item, dict) and too_deep(item)):
            problem = TOO_DEEP
        elif not isinstance(item, dict):
            problem = ("not_an_object", f"a JSON {type(item).__name__}, not an object")
        elif _has_surrogate(item):
            problem = ("invalid_utf8", "a string holds bytes that are not valid UTF-8")
        if _record(scan, writer, path, f"row {position}", fail, problem):
            writer.add(item)
    scan.columns = writer.close()
    scan.arrow_file = writer.target
    return scan


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str | None, Any]]]:
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as err:
            raise DataError(f"{path}: line {reader.line_num}: not readable as CSV ({err})") from err


def scan_csv(path: Path, work_dir: Path, fail: bool) -> JsonScan:
    """Read every row of a CSV file with a header row; every cell is text, an empty cell is ``""``."""
    scan = JsonScan()
    writer = _writer_for(path, work_dir)
    for _, row in _csv_rows(path):
        position = scan.records
        problem = None
        if None in row:
            problem = (
                "csv_extra_cells",
                f"{len(row[None]) if row[None] else 0} more cells than the header has columns",
            )
        elif _has_surrogate(row):
            problem = ("invalid_utf8", "a cell holds bytes that are not valid UTF-8")
        if _record(scan, writer, path, f"row {position}", fail, problem):
            writer.add({k: v for k, v in row.items() if k is not None})
    scan.columns = writer.close()
    scan.arrow_file = writer.target
    return scan


#: file suffix -> scanner of files read row by row.
SCANNERS: dict[str, Callable[[Path, Path, bool], JsonScan]] = {".jsonl": scan_json_lines, ".csv": scan_csv}


def scan_file(path: Path, work_dir: Path, fail: bool) -> JsonScan:
    """Scan a ``.json`` (array or lines), ``.jsonl`` or ``.csv`` file into a raw-row Arrow file."""
    suffix = path.suffix.lower()
    with open(path, "rb") as fh:
        head = fh.read(65536)
    if not head.replace(codecs.BOM_UTF8, b"").strip() and path.stat().st_size <= len(head):
        raise DataError(
            f"{path}: the file is empty (no rows); give a file with data, or remove it from dataset"
        )
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in head:
        raise DataError(
            f"{path}: not UTF-8 text (it holds NUL bytes or a UTF-16 byte-order mark: UTF-16?); save it as UTF-8"
        )
    if suffix == ".json":
        return (
            scan_json_array(path, work_dir, fail)
            if json_layout(path) == "array"
            else scan_json_lines(path, work_dir, fail)
        )
    return SCANNERS[suffix](path, work_dir, fail)
