"""Values keep their meaning: a value's type never depends on the other rows of the file.

For every file format a file of 10,000 rows in which one row breaks the type pattern keeps every
other row with its text unchanged; a JSON number or boolean in a text field is taken as its JSON text
and counted (``coerced:<field>``); with ``on_bad_row: fail`` it stops the preparation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ftpipe.config import PipelineConfig, validate_config
from ftpipe.data.errors import BadRowError
from ftpipe.data.prepare import prepare_data, read_jsonl

pytestmark = pytest.mark.timeout(180)
N = 10_000
#: text answers that a per-column type guess turns into numbers, booleans or missing values
LOOKALIKES = ["0", "42", "true", "007", "3.10", "1e5", "-0", "NA", "null", "", "False", " 12 "]


def answer(i: int) -> str:
    return LOOKALIKES[i % len(LOOKALIKES)] or "x"


def instruction(i: int) -> str:
    return str(i)  # every instruction looks like a number


def prepare(tmp_path: Path, path: Path, **flat):
    cfg = PipelineConfig.from_flat(
        {
            "dataset": str(path),
            "data_dir": str(tmp_path / "out"),
            "train_ratio": 1.0,
            "val_ratio": 0.0,
            "test_ratio": 0.0,
            "input_template": "{instruction}|{input}",
            "input_template_no_input": "{instruction}",
            **flat,
        }
    )
    return prepare_data(validate_config(cfg))


def by_id(result) -> dict[int, dict]:
    return {r["id"]: r for r in read_jsonl(result.train_file)}


def check_unchanged(rows: dict[int, dict], skip: set[int]) -> None:
    for i in range(N):
        if i in skip:
            continue
        assert rows[i]["output"] == answer(i), i
        assert rows[i]["input"] == (f"{i}|4" if i % 7 == 0 else str(i)), i


def json_rows(breaker: dict) -> list[dict]:
    rows = [
        {"instruction": instruction(i), "input": "4" if i % 7 == 0 else "", "output": answer(i)}
        for i in range(N)
    ]
    rows[5000] = {**rows[5000], **breaker}
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_text_fields_stay_text_when_one_row_holds_a_number(tmp_path, suffix):
    rows = json_rows({"output": 42})  # the one row that breaks the pattern: a JSON number
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    result = prepare(tmp_path, path)
    prepared = by_id(result)
    assert len(prepared) == N
    check_unchanged(prepared, {5000})
    assert prepared[5000]["output"] == "42"  # taken as its JSON text
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["rows_coerced"] == {"coerced:output": 1} and manifest["rows_dropped"] == {}


def test_json_booleans_and_floats_keep_their_json_text_and_lists_are_bad_rows(tmp_path):
    rows = [
        {"instruction": "a", "input": "", "output": True},
        {"instruction": "b", "input": "", "output": 2.50},
        {"instruction": 7, "input": "", "output": "x"},
        {"instruction": "c", "input": "", "output": ["x"]},
        {"instruction": "d", "input": "", "output": "y"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = prepare(tmp_path, path)
    prepared = by_id(result)
    assert [prepared[i]["output"] for i in (0, 1, 2, 4)] == ["true", "2.5", "x", "y"]
    assert prepared[2]["input"] == "7"
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["rows_coerced"] == {"coerced:instruction": 1, "coerced:output": 2}
    assert manifest["rows_dropped"] == {"not_string:output": 1}


def test_coerced_value_stops_on_bad_row_fail(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": "", "output": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(
        BadRowError, match=r"d\.jsonl: line 2: bad row \(coerced:output\): a JSON number or boolean"
    ):
        prepare(tmp_path, path, on_bad_row="fail")


def test_csv_cells_are_always_text(tmp_path):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["instruction", "input", "output"])
        for i in range(N):
            out = "a sentence, with a comma" if i == 5000 else answer(i)  # the row that breaks the pattern
            writer.writerow([instruction(i), "4" if i % 7 == 0 else "", out])
    result = prepare(tmp_path, path)
    prepared = by_id(result)
    assert len(prepared) == N
    check_unchanged(prepared, {5000})
    assert prepared[5000]["output"] == "a sentence, with a comma"
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["rows_coerced"] == {} and manifest["rows_dropped"] == {}


def test_csv_rows_with_extra_cells_are_bad_rows_by_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\na,,b\nc,,d,e\nf,,g\n", encoding="utf-8")
    result = prepare(tmp_path, path)
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["rows_dropped"] == {"csv_extra_cells": 1}
    assert sorted(by_id(result)) == [0, 2]
    with pytest.raises(BadRowError, match=r"d\.csv: row 1: bad row \(csv_extra_cells\)"):
        prepare(tmp_path / "f", path, on_bad_row="fail")


def test_parquet_text_column_with_one_null_keeps_every_other_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    outputs = [answer(i) for i in range(N)]
    outputs[5000] = None  # the row that breaks the pattern: a null where text belongs
    table = pa.table(
        {
            "instruction": [instruction(i) for i in range(N)],
            "input": ["4" if i % 7 == 0 else "" for i in range(N)],
            "output": pa.array(outputs, pa.string()),
        }
    )
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    result = prepare(tmp_path, path)
    prepared = by_id(result)
    assert len(prepared) == N - 1 and 5000 not in prepared
    check_unchanged(prepared, {5000})
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["rows_dropped"] == {"missing:output": 1}


def test_parquet_numeric_column_is_taken_as_text_and_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nums.parquet"
    pq.write_table(
        pa.table({"instruction": ["a", "b", "c"], "input": ["", "", ""], "output": [1, 20, 300]}), path
    )
    result = prepare(tmp_path, path)
    assert [r["output"] for r in sorted(read_jsonl(result.train_file), key=lambda r: r["id"])] == [
        "1",
        "20",
        "300",
    ]
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["rows_coerced"] == {"coerced:output": 3}
