"""Packing (best-fit decreasing, packed batches) and length-grouped distributed batching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftpipe.config.schema import PipelineConfig
from ftpipe.data.datamodule import SFTDataModule
from ftpipe.data.packing import LengthGroupedBatchSampler, pack_best_fit


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=64), min_size=0, max_size=80),
    capacity=st.integers(min_value=64, max_value=200),
)
def test_best_fit_packs_every_sample_once_within_capacity(lengths, capacity):
    bins = pack_best_fit(lengths, capacity)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b == sorted(b) and b for b in bins)
    # no two bins could be merged: best fit never leaves that much room twice
    fills = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(fills) < 2 or fills[0] + fills[1] > capacity
    assert pack_best_fit(lengths, capacity) == bins  # deterministic


def test_best_fit_refuses_a_sample_longer_than_the_capacity():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        pack_best_fit([3, 9], 8)


def _demo_cfg(alpaca_demo, tmp_path, **overrides) -> PipelineConfig:
    flat = {
        "hf_model_id": "embedded",
        "dataset": str(alpaca_demo),
        "dataset_subset": None,
        "data_dir": str(tmp_path / "datasets"),
        "input_template": "{instruction}\n\n{input}",
        "input_template_no_input": "{instruction}",
        "use_chat_template": True,
        "max_seq_length": 256,
        "micro_batch_size": 2,
        "num_workers": 0,
        "seed": 42,
    }
    return PipelineConfig.from_flat({**flat, **overrides})


def _padding_share(batches) -> float:
    positions = sum(b["input_ids"].numel() for b in batches)
    return 1 - sum(int(b["num_tokens"]) for b in batches) / positions


@pytest.fixture(scope="module")
def demo_datasets(alpaca_demo, tokenizer, tmp_path_factory):
    """The whole alpaca demo file prepared and tokenized as the demo does (256 tokens, chat template)."""
    import datasets

    tmp = tmp_path_factory.mktemp("packing")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp / "hf_cache"))
        dm = SFTDataModule(_demo_cfg(alpaca_demo, tmp), tokenizer)
        dm.setup("fit")
        yield dm, tmp


@pytest.mark.timeout(300)
def test_packing_the_alpaca_demo_data_leaves_under_5_percent_padding(demo_datasets, alpaca_demo, tokenizer):
    dm, tmp = demo_datasets
    plain = list(dm.train_dataloader())
    packed_dm = SFTDataModule(_demo_cfg(alpaca_demo, tmp, packing=True), tokenizer)
    packed_dm.datasets, packed_dm.prepared = dm.datasets, dm.prepared  # same tokenized split
    packed = list(packed_dm.train_dataloader())
    packs = packed_dm.packed_train_dataset
    assert sorted(i for p in packs.packs for i in p) == list(range(len(dm.train_dataset)))
    assert all(
        set(b) >= {"position_ids", "labels", "num_tokens"} and "attention_mask" not in b for b in packed
    )
    assert all(b["input_ids"].shape[1] <= 256 for b in packed)
    # every training token is in some packed batch (drop_last may leave out one incomplete batch)
    assert sum(int(b["num_tokens"]) for b in packed) >= sum(dm.train_dataset.lengths) - 2 * 256
    share, plain_share = _padding_share(packed), _padding_share(plain)
    assert share < 0.05 < plain_share, (share, plain_share)
    assert packs.stats.fill > 0.95


@pytest.mark.timeout(120)
def test_packed_rows_are_flattened_for_flash_attention(demo_datasets, alpaca_demo, tokenizer, monkeypatch):
    import ftpipe.runtime as runtime

    dm, tmp = demo_datasets
    monkeypatch.setattr(runtime, "select_attn_implementation", lambda cfg, device: "flash_attention_2")
    flash = SFTDataModule(_demo_cfg(alpaca_demo, tmp, packing=True), tokenizer)
    flash.datasets, flash.prepared = dm.datasets, dm.prepared
    batch = next(iter(flash.train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].shape[1] > 256
    starts = int((batch["position_ids"][0] == 0).sum())
    assert starts >= 2  # several samples, each starting at position 0


@pytest.mark.timeout(300)
def test_length_grouped_batches_cover_the_data_once_over_ranks_with_less_padding(demo_datasets, tokenizer):
    dm, _ = demo_datasets
    lengths = dm.train_dataset.lengths
    world, micro = 2, 4
    samplers = [
        LengthGroupedBatchSampler(lengths, micro, num_replicas=world, rank=r, seed=42) for r in range(world)
    ]
    per_rank = [list(s) for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1]) == len(lengths) // (micro * world) == len(samplers[0])
    seen = [i for batches in per_rank for b in batches for i in b]
    assert len(seen) == len(set(seen)) == len(per_rank[0]) * micro * world
    # the longest sample of the epoch is in the first global batch (an out-of-memory error shows at once)
    assert max(lengths) in {lengths[i] for r in range(world) for i in per_rank[r][0]}

    def padding(batches: list[list[int]]) -> float:
        positions = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths[i] for b in batches for i in b) / positions

    grouped = padding(per_rank[0] + per_rank[1])
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    random_batches = [shuffled[i : i + micro] for i in range(0, len(seen), micro)]
    assert grouped < 0.05 < padding(random_batches)
    # the ranks of one step get similar lengths (balanced step times)
    for a, b in zip(*per_rank, strict=True):
        assert abs(max(lengths[i] for i in a) - max(lengths[i] for i in b)) <= 16
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]


@pytest.mark.timeout(120)
def test_length_grouped_loader_resumes_at_the_same_batch(demo_datasets, alpaca_demo, tokenizer):
    """The stateful loader's state after 3 batches gives exactly the remaining batches of the epoch."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    dm, tmp = demo_datasets
    grouped = SFTDataModule(_demo_cfg(alpaca_demo, tmp, group_by_length=True), tokenizer)
    grouped.datasets, grouped.prepared = dm.datasets, dm.prepared
    loader = grouped.train_dataloader()
    assert isinstance(loader, StatefulDataLoader)
    assert isinstance(loader.batch_sampler, LengthGroupedBatchSampler)
    full = [b["input_ids"] for b in loader]
    interrupted = grouped.train_dataloader()
    it = iter(interrupted)
    for _ in range(3):
        next(it)
    state = interrupted.state_dict()
    resumed = grouped.train_dataloader()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:], strict=True))
