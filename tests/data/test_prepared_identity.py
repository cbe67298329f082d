"""Prepared data keyed by the source's identity: same-named files kept apart, a changed source prepared
again, data_dir inside the data set refused, prepared output never read as source, a failed preparation
(full disk) leaving the earlier splits whole, and a prepared_dir that holds raw rows refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.cli.main import main as cli_main
from ftpipe.config import PipelineConfig, validate_config
from ftpipe.config.paths import dataset_slug, identity_hash, prepared_data_dir, source_identity
from ftpipe.data.errors import DataError
from ftpipe.data.prepare import _glob_reaches, prepare_data, read_jsonl

pytestmark = pytest.mark.timeout(120)
HERE = Path(__file__).resolve().parent
SPLITS = ("training.jsonl", "validation.jsonl", "test.jsonl")


def config(dataset, data_dir: Path, **flat) -> PipelineConfig:
    return validate_config(
        PipelineConfig.from_flat({"dataset": str(dataset), "data_dir": str(data_dir), **flat})
    )


def write_rows(path: Path, n: int, tag: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"instruction": f"{tag} {i}", "input": "", "output": f"{tag} answer {i}."}) + "\n"
            for i in range(n)
        )
    )
    return path


def split_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (*SPLITS, "manifest.json", ".data_ready")}


def test_same_named_files_get_their_own_folders_and_both_are_kept(tmp_path, monkeypatch, caplog):
    v1 = write_rows(tmp_path / "v1" / "train.jsonl", 20, "one")
    v2 = write_rows(tmp_path / "v2" / "train.jsonl", 30, "two")
    first = prepare_data(config(v1, tmp_path / "data"))
    second = prepare_data(config(v2, tmp_path / "data"))
    assert first.folder != second.folder and not second.reused
    for result, path, tag in ((first, v1, "one"), (second, v2, "two")):
        slug = result.folder.relative_to(tmp_path / "data").parts[:2]
        assert slug == ("local", f"train-{identity_hash([str(path)])}")
        assert {r["output"].split()[0] for f in SPLITS for r in read_jsonl(result.folder / f)} == {tag}
        meta = json.loads((result.folder / "manifest.json").read_text())
        assert meta["source"]["identity"] == [str(path)]
        assert meta["source"]["files"][0]["path"] == str(path) and "sha256" in meta["source"]["files"][0]
    kept = split_bytes(first.folder)
    # each is reused as it is; the first was not replaced by the second
    assert prepare_data(config(v1, tmp_path / "data")).reused and split_bytes(first.folder) == kept
    assert prepare_data(config(v2, tmp_path / "data")).reused
    # one relative path from two folders names two sources
    monkeypatch.chdir(tmp_path / "v1")
    here = prepared_data_dir(config("./train.jsonl", tmp_path / "data").data)
    monkeypatch.chdir(tmp_path / "v2")
    there = prepared_data_dir(config("./train.jsonl", tmp_path / "data").data)
    assert here == first.folder and there == second.folder
    # hub ids stay as they are
    assert dataset_slug("org/name") == Path("org/name") and source_identity("org/name") == ["org/name"]


def test_a_same_size_edit_with_the_old_mtime_is_prepared_again(tmp_path, caplog):
    source = write_rows(tmp_path / "train.jsonl", 20, "old")
    first = prepare_data(config(source, tmp_path / "data"))
    stat = source.stat()
    source.write_text(source.read_text().replace("old", "new"))  # same size
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime (cp -p, tar, rsync -t)
    with caplog.at_level("INFO", logger="ftpipe"):
        again = prepare_data(config(source, tmp_path / "data"))
    assert again.folder == first.folder and not again.reused
    assert "the source changed since it was prepared" in caplog.text
    assert {r["output"].split()[0] for r in read_jsonl(again.train_file)} == {"new"}


@pytest.mark.parametrize(
    ("dataset", "data_dir"),
    [
        ("raw", "raw"),
        ("raw", "raw/prepared"),
        ("raw/", "raw/a/b"),
        ("raw/**/*.jsonl", "raw"),
        ("raw/*/*/*/*/*/*.jsonl", "raw/prepared"),
        ("raw/a.jsonl,raw", "raw/prepared"),
    ],
)
def test_data_dir_inside_the_data_set_is_refused_before_anything_is_written(tmp_path, dataset, data_dir):
    write_rows(tmp_path / "raw" / "a.jsonl", 20, "raw")
    before = sorted(tmp_path.rglob("*"))
    cfg = config(",".join(str(tmp_path / item) for item in dataset.split(",")), tmp_path / data_dir)
    with pytest.raises(DataError) as err:
        prepare_data(cfg)
    message = str(err.value)
    assert message.startswith(f"data_dir: {tmp_path / data_dir} is inside the folder {tmp_path / 'raw'}")
    assert "dataset" in message and f"give data_dir a folder outside {tmp_path / 'raw'}" in message
    assert sorted(tmp_path.rglob("*")) == before


def test_a_mix_entry_whose_folder_holds_data_dir_is_named(tmp_path):
    write_rows(tmp_path / "raw" / "a.jsonl", 20, "raw")
    other = write_rows(tmp_path / "b.jsonl", 20, "b")
    datasets = [{"dataset": str(other)}, {"dataset": str(tmp_path / "raw")}]
    with pytest.raises(DataError, match=r"datasets\[1\]\.dataset"):
        prepare_data(config(other, tmp_path / "raw" / "d", datasets=datasets))


def test_globs_that_cannot_reach_data_dir_are_allowed(tmp_path):
    write_rows(tmp_path / "raw" / "a.jsonl", 20, "raw")
    write_rows(tmp_path / "raw" / "x1" / "b.jsonl", 20, "x")
    for pattern, data_dir in (
        ("raw/*.jsonl", "raw/prepared"),
        ("raw/*.jsonl", "raw"),
        ("raw/x*/*.jsonl", "raw/p"),
    ):
        result = prepare_data(config(tmp_path / pattern, tmp_path / data_dir))
        assert result.counts["train"] == 18 and not result.reused
    assert _glob_reaches(["**", "*.jsonl"], ("d",)) and _glob_reaches(["*", "*.jsonl"], ())
    assert not _glob_reaches(["*.jsonl"], ()) and not _glob_reaches(["x*", "*.jsonl"], ("d",))


def test_prepared_output_under_a_source_folder_is_never_read_as_source(tmp_path, caplog):
    own = write_rows(tmp_path / "raw" / "a.jsonl", 20, "raw")
    elsewhere = write_rows(tmp_path / "b.jsonl", 50, "b")
    inner = prepare_data(config(elsewhere, tmp_path / "raw" / "cache"))  # prepared output under raw/
    assert inner.folder.is_relative_to(tmp_path / "raw")
    with caplog.at_level("WARNING", logger="ftpipe"):
        for dataset in (tmp_path / "raw", tmp_path / "raw" / "**" / "*.jsonl"):
            result = prepare_data(config(dataset, tmp_path / "out"))
            meta = json.loads((result.folder / "manifest.json").read_text())
            assert [f["path"] for f in meta["source"]["files"]] == [str(own)]
            assert meta["rows_read"] == 20
    assert "skipped 3 files of ftpipe's prepared data" in caplog.text


def _full_disk_env() -> str | None:
    """Why a tmpfs cannot be mounted in a new mount namespace here (None when it can)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("mount") is None:
        return "needs root, unshare and mount"
    return None


@pytest.mark.timeout(300)
@pytest.mark.skipif(_full_disk_env() is not None, reason="needs root, unshare and mount (a real tmpfs)")
def test_a_full_disk_leaves_the_earlier_splits_whole_and_is_one_message(tmp_path):
    """Real processes on a real 512 KiB tmpfs: the second preparation fills it."""
    result = tmp_path / "result.json"
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            sys.executable,
            str(HERE / "full_disk_main.py"),
            str(tmp_path / "mnt"),
            str(tmp_path / "src.jsonl"),
            str(result),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")},
    )
    if proc.returncode == 3 or (proc.returncode and "unshare" in proc.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(result.read_text())
    assert seen["first"][0] == 0, seen["first"][1][-3000:]
    code, output = seen["second"]
    assert code == 2, output[-3000:]
    assert "Traceback" not in output and sum(" ERROR " in line for line in output.splitlines()) == 1
    error = next(line for line in output.splitlines() if " ERROR " in line)
    assert f"data_dir: {tmp_path / 'mnt' / 'd'} ran out of room while preparing" in error
    assert "no space left on device writing" in error and "are unchanged" in error
    assert str(tmp_path / "mnt" / "d" / "local") in error.split("writing", 1)[1]  # the file or folder
    assert seen["after"] == seen["before"]  # the earlier splits, manifest and marker byte-identical
    assert sum(name.endswith("training.jsonl") for name in seen["before"]) == 1
    assert not [e for e in seen["entries"] if ".tmp-" in e or ".old-" in e]  # no staging left behind


@pytest.mark.timeout(120)
def test_a_failed_write_keeps_the_earlier_splits_and_names_data_dir_and_the_file(
    tmp_path, monkeypatch, caplog
):
    """The same in this process (no tmpfs needed): the split writer fails with ENOSPC halfway."""
    source = write_rows(tmp_path / "train.jsonl", 20, "old")
    data_dir = tmp_path / "data"
    first = prepare_data(config(source, data_dir))
    kept = split_bytes(first.folder)
    write_rows(source, 40, "new")

    def full(ds, fh):
        fh.write('{"id": 0, "inp')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("ftpipe.data.build._write_split", full)
    with caplog.at_level("INFO", logger="ftpipe"), pytest.raises(SystemExit) as exit_:
        cli_main(["prepare", "--dataset", str(source), "--data_dir", str(data_dir)])
    assert exit_.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    staged = first.folder.parent / f".{first.folder.name}.tmp-{os.getpid()}" / "training.jsonl"
    assert errors[0].startswith(
        f"data_dir: {data_dir} ran out of room while preparing {first.folder.name}: no space left on device "
        f"writing {staged} (the earlier splits in {first.folder} are unchanged)"
    )
    assert split_bytes(first.folder) == kept
    assert sorted(p.name for p in first.folder.parent.iterdir()) == [
        f".{first.folder.name}.lock",
        first.folder.name,
    ]


def test_an_exception_while_preparing_again_keeps_the_earlier_splits(tmp_path, monkeypatch):
    source = write_rows(tmp_path / "train.jsonl", 20, "old")
    first = prepare_data(config(source, tmp_path / "data"))
    kept = split_bytes(first.folder)
    write_rows(source, 40, "new")
    monkeypatch.setattr("ftpipe.data.build.save_config", lambda *a: (_ for _ in ()).throw(KeyError("boom")))
    with pytest.raises(KeyError):
        prepare_data(config(source, tmp_path / "data"))
    assert split_bytes(first.folder) == kept
    assert not [p for p in first.folder.parent.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    again = prepare_data(config(source, tmp_path / "data"))
    assert not again.reused and again.counts["train"] == 36


def test_prepared_dir_with_raw_rows_is_refused_and_prepared_output_is_accepted(tmp_path, alpaca_demo):
    raw = tmp_path / "raw"
    for name in SPLITS:
        write_rows(raw / name, 5, "raw")
    with pytest.raises(DataError) as err:
        prepare_data(config(alpaca_demo, tmp_path / "d", prepared_dir=str(raw)))
    message = str(err.value)
    assert message.startswith(f"prepared_dir: {raw / 'training.jsonl'}: line 1 has the keys")
    assert "instruction not prepared fields" in message and "point `dataset` at it instead" in message
    (raw / "training.jsonl").write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"training\.jsonl: line 1 is a JSON list, not a prepared row"):
        prepare_data(config(alpaca_demo, tmp_path / "d", prepared_dir=str(raw)))
    prepared = prepare_data(config(alpaca_demo, tmp_path / "d"))
    given = prepare_data(config(alpaca_demo, tmp_path / "d", prepared_dir=str(prepared.folder)))
    assert given.counts == prepared.counts and given.reused


def test_prepared_chat_rows_are_accepted_as_prepared_dir(tmp_path):
    turns = [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"conversations": turns}) + "\n" for _ in range(20)))
    prepared = prepare_data(config(chat, tmp_path / "d"))
    assert all(set(r) == {"id", "source", "messages"} for r in read_jsonl(prepared.train_file))
    given = prepare_data(config(chat, tmp_path / "d", prepared_dir=str(prepared.folder)))
    assert given.counts == prepared.counts
    # the raw ShareGPT rows themselves are not prepared rows
    with pytest.raises(DataError, match=r"line 1 has the keys \['conversations'\]"):
        shutil.copy(chat, tmp_path / "training.jsonl")
        for name in SPLITS[1:]:
            shutil.copy(prepared.folder / name, tmp_path / name)
        prepare_data(config(chat, tmp_path / "d", prepared_dir=str(tmp_path)))
