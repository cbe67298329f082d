"""Tolerant JSON reading: find unreadable records by their row number, so ``datasets`` loads the rest.

``datasets``' JSON loader fails for a whole file on one unparsable line or one invalid UTF-8 byte.
JSON Lines files are therefore checked line by line first (1-based line numbers); JSON arrays are
loaded by ``datasets`` directly and only checked element by element (0-based index) when that fails.
When some records are bad, the good ones are copied, unchanged, to a clean JSON Lines file that
``datasets`` then loads.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftpipe.data.errors import DataError, bad_row_error

#: (record position, reason, detail) of a record that could not be read.
BadRecord = tuple[int, str, str]


@dataclass
class JsonScan:
    """What a scan found in one JSON file."""

    records: int = 0
    #: record position of each row of the loaded file, in order (the good records).
    good: list[int] = field(default_factory=list)
    #: 1-based line of each record (JSON Lines); None for JSON arrays (rows are 0-based indices).
    line_numbers: list[int] | None = None
    bad: list[BadRecord] = field(default_factory=list)
    #: file holding only the good records; None when the original file can be loaded as it is.
    clean_file: Path | None = None

    def label(self, position: int) -> str:
        if self.line_numbers is not None:
            return f"line {self.line_numbers[position]}"
        return f"row {position}"


def json_layout(path: Path) -> str:
    """``array`` when the file's first non-blank character is ``[``, else ``lines``."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8) :]
    return "array" if head.lstrip()[:1] == b"[" else "lines"


def _parse_line(raw: bytes) -> tuple[str, str] | None:
    """None when the line is a JSON object, else (reason, detail)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return "invalid_utf8", f"invalid UTF-8 (byte {err.start} of the line)"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return "invalid_json", f"unparsable JSON ({err.msg} at column {err.colno})"
    if not isinstance(obj, dict):
        return "not_an_object", f"a JSON {type(obj).__name__}, not an object"
    return None


def scan_json_lines(path: Path, clean_dir: Path, fail: bool) -> JsonScan:
    """Check every line of a JSON Lines file; with ``fail`` stop at the first bad one."""
    scan = JsonScan(line_numbers=[])
    lines = scan.line_numbers
    assert lines is not None
    blank = False
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                blank = True
                continue
            position = scan.records
            scan.records += 1
            lines.append(lineno)
            problem = _parse_line(raw)
            if problem is None:
                scan.good.append(position)
            elif fail:
                raise bad_row_error(str(path), f"line {lineno}", *problem)
            else:
                scan.bad.append((position, *problem))
    if scan.bad or blank:
        keep = {lines[p] for p in scan.good}
        scan.clean_file = _write_clean(path, clean_dir, lambda emit: _copy_lines(path, keep, emit))
    return scan


def _copy_lines(path: Path, keep: set[int], emit: Callable[[bytes], None]) -> None:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if lineno in keep:
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                emit(raw.rstrip(b"\r\n") + b"\n")


def _write_clean(path: Path, clean_dir: Path, fill: Callable[[Callable[[bytes], None]], None]) -> Path:
    clean_dir.mkdir(parents=True, exist_ok=True)
    target = clean_dir / f"clean-{len(list(clean_dir.iterdir()))}-{path.stem}.jsonl"
    with open(target, "wb") as out:
        fill(out.write)
    return target


def _has_surrogate(value: Any) -> bool:
    """True when a decoded string holds bytes that were not valid UTF-8 (surrogate escapes)."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def scan_json_array(path: Path, clean_dir: Path, fail: bool) -> JsonScan:
    """Check every element of a JSON array file (rows are 0-based indices)."""
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); a .json file "
            "must hold an array of row objects, or one JSON object per line (JSON Lines)"
        ) from err
    if not isinstance(items, list):
        raise DataError(f"{path}: the JSON top level is a {type(items).__name__}; expected an array of rows")
    scan = JsonScan(records=len(items))
    for position, item in enumerate(items):
        problem = None
        if not isinstance(item, dict):
            problem = ("not_an_object", f"a JSON {type(item).__name__}, not an object")
        elif _has_surrogate(item):
            problem = ("invalid_utf8", "a string holds bytes that are not valid UTF-8")
        if problem is None:
            scan.good.append(position)
        elif fail:
            raise bad_row_error(str(path), f"row {position}", *problem)
        else:
            scan.bad.append((position, *problem))

    def fill(emit: Callable[[bytes], None]) -> None:
        for position in scan.good:
            emit(json.dumps(items[position], ensure_ascii=False).encode("utf-8") + b"\n")

    scan.clean_file = _write_clean(path, clean_dir, fill)
    return scan
