"""SFTDataModule end to end on a small prepared folder laid out by hand (prepare_data monkeypatched)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from ftpipe.config.schema import PipelineConfig
from ftpipe.data.collate import SFTCollator
from ftpipe.data.datamodule import SFTDataModule


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """A prepared folder (10 train, 3 validation alpaca rows; 2 chat test rows) and a stub prepare_data."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "prepared"
    folder.mkdir()
    alpaca = [{"id": i, "input": f"Question {i}:\n", "output": f"Answer {i}."} for i in range(13)]
    chat = [
        {
            "id": 20 + i,
            "messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello"}],
        }
        for i in range(2)
    ]
    files = {
        "train_file": write_jsonl(folder / "training.jsonl", alpaca[:10]),
        "val_file": write_jsonl(folder / "validation.jsonl", alpaca[10:]),
        "test_file": write_jsonl(folder / "test.jsonl", chat),
    }
    (folder / ".data_ready").write_text("ok\n", encoding="utf-8")
    calls = []

    def prepare_data(cfg):
        calls.append(cfg)
        return types.SimpleNamespace(folder=folder, counts={}, reused=True, **files)

    stub = types.ModuleType("ftpipe.data.prepare")
    stub.prepare_data = prepare_data
    monkeypatch.setitem(sys.modules, "ftpipe.data.prepare", stub)
    return calls


def make_cfg(**overrides) -> PipelineConfig:
    flat = {
        "hf_model_id": "embedded",
        "max_seq_length": 64,
        "micro_batch_size": 2,
        "num_workers": 0,
        "seed": 42,
    }
    return PipelineConfig.from_flat({**flat, **overrides})


def question_numbers(tokenizer, batches) -> list[int]:
    numbers = []
    for batch in batches:
        for ids in batch["input_ids"]:
            numbers.append(int(tokenizer.decode(ids).split("Question ")[1].split(":")[0]))
    return numbers


@pytest.mark.timeout(60)
def test_datamodule_fit_and_test_loaders(prepared, tokenizer):
    dm = SFTDataModule(make_cfg(), tokenizer)
    dm.setup("fit")
    dm.setup("fit")
    assert len(prepared) == 1 and set(dm.datasets) == {"train", "val"}
    train = dm.train_dataloader()
    assert isinstance(train.collate_fn, SFTCollator) and train.drop_last and len(train) == 5
    batches = list(train)
    assert all(
        b["input_ids"].shape[0] == 2 and b["attention_mask"].shape == b["labels"].shape for b in batches
    )
    order = question_numbers(tokenizer, batches)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert question_numbers(tokenizer, SFTDataModule(make_cfg(), tokenizer).train_dataloader()) == order
    assert question_numbers(tokenizer, SFTDataModule(make_cfg(seed=7), tokenizer).train_dataloader()) != order

    val = list(dm.val_dataloader())
    assert [b["input_ids"].shape[0] for b in val] == [2, 1] and question_numbers(tokenizer, val) == [
        10,
        11,
        12,
    ]
    first = dm.val_dataset[0]
    assert tokenizer.decode(
        [t for t, lab in zip(first["input_ids"], first["labels"], strict=True) if lab != -100]
    ) == ("Answer 10.<|im_end|>")

    dm.setup("test")
    (batch,) = list(dm.test_dataloader())
    assert batch["num_label_tokens"].item() == 4  # "Hello<|im_end|>" twice
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]).endswith(
        "<|im_start|>user\nHi 0<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>"
    )


@pytest.mark.timeout(60)
def test_distributed_loaders_shard_one_seeded_permutation(prepared, tokenizer):
    """Under a distributed Trainer each rank's stateful loader takes its share of one permutation."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    dm = SFTDataModule(make_cfg(), tokenizer)
    shards = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        sampler = loader.sampler
        assert isinstance(loader, StatefulDataLoader) and isinstance(sampler, DistributedSampler)
        assert (sampler.seed, sampler.shuffle, sampler.rank, sampler.num_replicas) == (42, True, rank, 2)
        assert loader.collate_fn is dm.collator and loader.drop_last and loader.batch_size == 2
        shards.append(question_numbers(tokenizer, loader))
        val = dm.val_dataloader().sampler
        assert isinstance(val, DistributedSampler) and not val.shuffle and val.rank == rank
    # DistributedSampler(seed=42) at epoch 0: one permutation of the 10 samples, every other index per rank;
    # drop_last keeps 2 full batches of 2 per rank
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(42)).tolist()
    assert shards == [permutation[0::2][:4], permutation[1::2][:4]]
    assert not set(shards[0]) & set(shards[1])


@pytest.mark.timeout(60)
def test_too_small_training_split_is_a_clear_error(prepared, tokenizer):
    dm = SFTDataModule(make_cfg(micro_batch_size=16), tokenizer)
    with pytest.raises(ValueError, match=r"10 samples .* fewer than micro_batch_size 16"):
        dm.train_dataloader()


@pytest.mark.timeout(120)
def test_datamodule_with_real_prepare(alpaca_demo, tokenizer, tmp_path, monkeypatch):
    """prepare_data on 40 demo rows, chat template, one loader worker: batches and train/eval prompt parity."""
    import datasets

    from ftpipe.data.prepare import read_jsonl
    from ftpipe.data.tokenize import encode_example, encode_prompt

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    cfg = make_cfg(
        dataset=str(alpaca_demo),
        dataset_subset=None,
        data_dir=str(tmp_path / "datasets"),
        max_samples=40,
        input_template="{instruction}\n\n{input}",
        input_template_no_input="{instruction}",
        use_chat_template=True,
        max_seq_length=128,
        micro_batch_size=4,
        num_workers=1,
        pad_to_multiple_of=8,
    )
    dm = SFTDataModule(cfg, tokenizer)
    dm.setup("fit")
    prepared = dm.prepared
    assert dm.train_dataset.stats.rows == prepared.counts.get("train", len(read_jsonl(prepared.train_file)))
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataset) // 4
    for batch in batches:
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 8 == 0
        assert batch["input_ids"].shape[1] <= 128 and batch["num_label_tokens"] > 0
    # evaluation prompts are exactly the training prefix (rows kept in file order, none dropped here)
    rows = read_jsonl(prepared.train_file)
    checked = 0
    for i, row in enumerate(rows):
        prompt, sample = encode_prompt(tokenizer, row, cfg.data), dm.train_dataset[i]
        if encode_example(tokenizer, row, cfg.data).prompt_truncated:  # the prompt lost its start
            continue
        assert sample["input_ids"][: len(prompt)] == prompt and set(sample["labels"][: len(prompt)]) == {-100}
        assert sample["labels"][len(prompt)] != -100
        assert tokenizer.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
        checked += 1
    assert checked >= 5


@pytest.mark.timeout(60)
def test_validation_over_ranks_counts_every_sample_once(prepared, tokenizer):
    """3 validation samples on 2 ranks: the ranks run as many batches, and the padding copy has no label,
    so the label tokens over both ranks are those of the split, each sample once."""
    from types import SimpleNamespace

    dm = SFTDataModule(make_cfg(micro_batch_size=1), tokenizer)
    split_labels = sum(sum(label != -100 for label in dm.val_dataset[i]["labels"]) for i in range(3))
    batches, labels = [], 0
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        rank_batches = list(dm.val_dataloader())
        batches.append(len(rank_batches))
        labels += sum(int(b["num_label_tokens"]) for b in rank_batches)
    assert batches == [2, 2]  # the same number of forward passes on both ranks
    assert labels == split_labels
