"""Tokenization runs once: one process tokenizes, the others memory-map its cache (no collective waits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.config.schema import DataConfig
from ftpipe.data import dataset as dataset_module
from ftpipe.data.dataset import SFTDataset
from ftpipe.data.errors import DataError

ROWS = [{"id": i, "input": f"Say {i}.\n", "output": f"{i} said."} for i in range(30)]


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "training.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.mark.timeout(120)
def test_leader_tokenizes_and_a_follower_reads_its_cache(tmp_path, tokenizer, monkeypatch):
    path, cache = _write(tmp_path), str(tmp_path / "cache")
    calls = []
    encode = dataset_module._encode_batch
    monkeypatch.setattr(dataset_module, "_encode_batch", lambda *a, **k: calls.append(1) or encode(*a, **k))
    cfg = DataConfig(max_seq_length=32)
    leader = SFTDataset(path, tokenizer, cfg, role="leader", cache_dir=cache)
    assert calls and list(Path(cache).rglob(f"*{dataset_module.DONE_SUFFIX}"))
    calls.clear()
    follower = SFTDataset(path, tokenizer, cfg, role="follower", cache_dir=cache, wait_s=5)
    alone = SFTDataset(path, tokenizer, cfg, cache_dir=cache)  # one process: the same cache again
    assert calls == []  # neither tokenized
    assert [follower[i] for i in range(len(follower))] == [leader[i] for i in range(len(leader))]
    assert alone.stats == follower.stats == leader.stats
    # another setting is another cache, which the follower does not find
    with pytest.raises(DataError, match=r"did not finish tokenizing within 1 s \(prepare_timeout_s\)"):
        SFTDataset(path, tokenizer, DataConfig(max_seq_length=24), role="follower", cache_dir=cache, wait_s=1)


@pytest.mark.timeout(120)
def test_a_follower_stops_when_the_leader_failed(tmp_path, tokenizer):
    path, cache = _write(tmp_path), str(tmp_path / "cache")
    cfg = DataConfig(max_seq_length=32)
    rows = dataset_module.load_jsonl_rows(path, cache)
    tokenized = dataset_module._tokenized_cache(rows, tokenizer, cfg, 32, "code")
    assert tokenized is not None and tokenized.parent == Path(rows.cache_files[0]["filename"]).parent
    # the follower's own cache name: found the way SFTDataset finds it
    SFTDataset(path, tokenizer, cfg, role="leader", cache_dir=cache)
    done = next(Path(cache).rglob(f"*{dataset_module.DONE_SUFFIX}"))
    failed = Path(str(done).removesuffix(dataset_module.DONE_SUFFIX) + dataset_module.FAILED_SUFFIX)
    done.unlink()
    failed.write_text("ValueError: row 3 exploded")
    with pytest.raises(DataError, match="the process that tokenizes the data failed: ValueError: row 3"):
        SFTDataset(path, tokenizer, cfg, role="follower", cache_dir=cache, wait_s=5)


SCRIPT = """
import json, sys
import torch.distributed as dist
from ftpipe.config.schema import PipelineConfig
from ftpipe.data import dataset as dataset_module
from ftpipe.data.datamodule import SFTDataModule
from ftpipe.model.tokenizer import load_tokenizer

dist.init_process_group("gloo")
calls = []
encode = dataset_module._encode_batch
dataset_module._encode_batch = lambda *a, **k: calls.append(1) or encode(*a, **k)
cfg = PipelineConfig.from_flat(json.loads(sys.argv[1]))
dm = SFTDataModule(cfg, load_tokenizer(cfg.model))
dm.setup("fit")
out = {"rank": dist.get_rank(), "tokenized_batches": len(calls), "train": len(dm.train_dataset),
       "first": dm.train_dataset[0]["input_ids"]}
print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_tokenize_once(tmp_path, alpaca_demo, embedded_model_path):
    script = tmp_path / "setup_data.py"
    script.write_text(SCRIPT, encoding="utf-8")
    flat = {
        "hf_model_id": "embedded",
        "dataset": str(alpaca_demo),
        "data_dir": str(tmp_path / "data"),
        "max_samples": 200,
        "max_seq_length": 128,
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "hf_cache")
    env.pop("PYTEST_CURRENT_TEST", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), json.dumps(flat)], env=env, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = sorted(
        (json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line),
        key=lambda r: r["rank"],
    )
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["tokenized_batches"] > 0 and results[1]["tokenized_batches"] == 0
    assert results[0]["train"] == results[1]["train"] == 180 and results[0]["first"] == results[1]["first"]


@pytest.mark.timeout(180)
def test_a_large_split_is_tokenized_by_several_processes_and_read_back_whole(
    tmp_path, tokenizer, monkeypatch
):
    path = _write(tmp_path)
    cfg = DataConfig(max_seq_length=32)
    one = SFTDataset(path, tokenizer, cfg, cache_dir=str(tmp_path / "one"))
    monkeypatch.setattr(dataset_module, "ROWS_PER_PROC", 10)  # 30 rows: 2 processes on 2 cores
    monkeypatch.setattr(dataset_module.os, "cpu_count", lambda: 2)
    cache = str(tmp_path / "many")
    leader = SFTDataset(path, tokenizer, cfg, role="leader", cache_dir=cache)
    assert len(leader.samples.cache_files) == 2  # one file per process
    follower = SFTDataset(path, tokenizer, cfg, role="follower", cache_dir=cache, wait_s=5)
    expected = [one[i] for i in range(len(one))]
    assert [leader[i] for i in range(len(leader))] == expected
    assert [follower[i] for i in range(len(follower))] == expected


@pytest.mark.timeout(120)
def test_the_cache_key_follows_what_the_fields_declare(tmp_path, tokenizer):
    """Data fields declared PREPARED or TOKENIZED move the key, the others leave it; the tokenizer's own
    fields (TOKENIZER: model id, chat template) reach it through the tokenizer."""
    import copy
    import dataclasses

    from ftpipe.config.schema import PREPARED, TOKENIZED, fields_affecting

    rows = dataset_module.load_jsonl_rows(_write(tmp_path), str(tmp_path / "cache"))
    base = DataConfig(max_seq_length=32)

    def key(tok=tokenizer, **changes):
        return dataset_module._tokenized_cache(rows, tok, dataclasses.replace(base, **changes), 32, "code")

    keyed = fields_affecting(DataConfig, PREPARED, TOKENIZED)
    assert {"max_seq_length", "system_prompt", "use_chat_template", "reasoning", "split_seed"} <= set(keyed)
    moved = {
        "system_prompt": "Be brief.",
        "use_chat_template": True,
        "reasoning": "drop",
        "max_seq_length": 64,
        "split_seed": 7,
        "dataset_split": "validation",
    }
    kept = {"packing": True, "num_workers": 0, "pad_to_multiple_of": 8, "group_by_length": True}
    assert all(key(**{name: value}) != key() for name, value in moved.items())
    assert all(key(**{name: value}) == key() for name, value in kept.items())
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{{ messages }}"
    renamed = copy.deepcopy(tokenizer)
    renamed.name_or_path = "org/another-model"
    assert key(templated) != key() and key(renamed) != key() and key(copy.deepcopy(tokenizer)) == key()
