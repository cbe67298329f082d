"""Source resolution and loading: local files of every kind, save_to_disk folders, hub errors."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import datasets
import pytest

from ftpipe.data.errors import BadRowError, DataError
from ftpipe.data.sources import load_hub, load_parts, resolve_source, source_fingerprint

pytestmark = pytest.mark.timeout(60)

ROW = {"instruction": "i", "input": "", "output": "o"}


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines given as dicts are JSON-encoded; str and bytes lines are written as they are."""
    with open(path, "wb") as fh:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            fh.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


def load(dataset: str, tmp_path: Path, fail: bool = False):
    return load_parts(resolve_source(dataset), None, "train", tmp_path / "work", fail)


def test_jsonl_bad_lines_found_by_line_number(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {**ROW, "output": "a"},
            "",
            '{"instruction": "i",',
            b'{"output": "\xff"}',
            "[1, 2]",
            {**ROW, "output": "b"},
        ],
    )
    [part] = load(str(path), tmp_path)
    assert part.records == 5  # the blank line is not a record
    assert part.positions == [0, 4]
    assert part.column("output") == ["a", "b"]
    assert [(p, r, part.label(p)) for p, r, _ in part.bad] == [
        (1, "invalid_json", "line 3"),
        (2, "invalid_utf8", "line 4"),
        (3, "not_an_object", "line 5"),
    ]


def test_jsonl_fail_mode_names_file_line_and_reason(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, ROW, "{oops"])
    with pytest.raises(BadRowError) as err:
        load(str(path), tmp_path, fail=True)
    assert f"{path}: line 3: bad row (invalid_json)" in str(err.value)


def test_json_array_with_invalid_utf8_rows_uses_0_based_rows(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(
        b'[{"instruction": "a", "output": "x"},\n {"instruction": "b\xfe", "output": "y"}, 7,\n'
        b' {"instruction": "c", "output": "z"}]'
    )
    [part] = load(str(path), tmp_path)
    assert part.records == 4
    assert part.column("instruction") == ["a", "c"]
    assert part.positions == [0, 3]
    assert [(part.label(p), r) for p, r, _ in part.bad] == [
        ("row 1", "invalid_utf8"),
        ("row 2", "not_an_object"),
    ]
    with pytest.raises(BadRowError, match=r"d\.json: row 1: bad row \(invalid_utf8\)"):
        load(str(path), tmp_path / "again", fail=True)


def test_unparsable_json_array_is_one_clear_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"instruction": "a"},\n {"instruction": }]')
    with pytest.raises(DataError, match=r"d\.json: not valid JSON .* line 2, column 18"):
        load(str(path), tmp_path)


def test_csv_parquet_comma_list_and_glob(tmp_path):
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "skipped.jsonl", [ROW])
    datasets.Dataset.from_dict({"instruction": ["p1", "p2"], "output": ["o1", "o2"]}).to_parquet(
        tmp_path / "a.parquet"
    )
    (tmp_path / "b.csv").write_text("instruction,output\nc1,x\nc2,y\nc3,z\n")
    parts = load(f"{tmp_path}/a.parquet, {tmp_path}/b.csv", tmp_path / ".work")
    assert [(Path(p.name).name, p.records) for p in parts] == [("a.parquet", 2), ("b.csv", 3)]
    assert parts[1].column("instruction") == ["c1", "c2", "c3"]
    write_jsonl(tmp_path / "c.jsonl", [ROW])
    (tmp_path / "notes.md").write_text("not data")
    globbed = resolve_source(str(tmp_path / "*"))
    assert [p.name for p in globbed.files] == ["a.parquet", "b.csv", "c.jsonl"]
    assert resolve_source(str(tmp_path)).files == globbed.files  # a folder of files


def test_save_to_disk_folder_and_split(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"x": [1, 2, 3]}),
            "eval": datasets.Dataset.from_dict({"x": [9]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    source = resolve_source(str(tmp_path / "saved"))
    assert source.kind == "disk"
    [part] = load_parts(source, None, "eval", tmp_path / "work", False)
    assert part.dataset["x"] == [9]
    with pytest.raises(DataError, match=r"has no split 'test' \(splits: \['train', 'eval'\]\)"):
        load_parts(source, None, "test", tmp_path / "work", False)
    assert {Path(f["path"]).name for f in source_fingerprint(source)} >= {"dataset_dict.json"}


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(DataError, match=r"'\./nope/missing\.json' does not exist \(looked for /"):
        resolve_source("./nope/missing.json")
    write_jsonl(tmp_path / "ok.jsonl", [ROW])
    with pytest.raises(DataError, match=r"gone\.jsonl' does not exist"):
        resolve_source(f"{tmp_path}/ok.jsonl,{tmp_path}/gone.jsonl")
    with pytest.raises(DataError, match=r"no .* file matches the glob"):
        resolve_source(f"{tmp_path}/*.parquet")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match=r"unsupported type '\.xlsx'"):
        resolve_source(str(tmp_path / "x.xlsx"))


def test_fingerprint_tracks_size_and_mtime(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROW])
    source = resolve_source(str(path))
    before = source_fingerprint(source)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()  # small files: their content too
    stat = path.stat()
    assert before == [
        {"path": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime, "sha256": sha256}
    ]
    write_jsonl(path, [ROW, ROW])
    assert source_fingerprint(source) != before


def test_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("some-org/some-dataset").kind == "hub"
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        load_hub("some-org/some-dataset", "sub", "train")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "'some-org/some-dataset'" in message and "HF_HUB_OFFLINE=1" in message
    assert "point --dataset at it" in message


def test_hub_unreachable_fails_at_once(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    start = time.monotonic()
    with pytest.raises(DataError, match=r"http://127\.0\.0\.1:9 is unreachable .* point --dataset at it"):
        load_hub("some-org/some-dataset", None, "train")
    assert time.monotonic() - start < 6
