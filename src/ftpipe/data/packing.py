"""Sequence packing and length-grouped batching: fewer padding tokens per optimizer step.

Packing (``packing: true``) puts several tokenized samples into one row of at most ``max_seq_length``
tokens, chosen by best-fit decreasing bin packing once per run (deterministic: the same data gives the
same packs; the sampler shuffles the packs every epoch). A packed row carries ``position_ids`` that
restart at 0 at every sample and no ``attention_mask``: transformers then derives the sample
boundaries from the position ids, a block-diagonal causal mask with sdpa/eager/flex attention and
varlen kernels (``cu_seqlens``) with flash-attention, so no token attends across a sample boundary.
The first label of every sample is -100, so no sample learns to predict the next one's first token.
Each sample thus gets exactly the logits and loss it would get alone (tested).

Flash-attention detects packing only in a batch of one row, so with ``flash_attention_2`` the
collator concatenates the packed rows of a micro-batch into one row (``flatten``); other attention
implementations keep one row per pack, which keeps the (masked, dense) attention cost per row at
``max_seq_length`` squared.

Without packing, ``group_by_length: true`` batches samples of similar length: every epoch a seeded
permutation is cut into groups of many global batches (``micro_batch_size x world size`` samples),
each group is sorted by length and cut into global batches, the global batches are shuffled (the one
with the longest sample first, so an out-of-memory error shows at the first step), and each global
batch is dealt to the ranks in strides, so every rank gets samples of similar length too.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from ftpipe.data.tokenize import IGNORE_INDEX
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

#: Global batches per length-sorted group in length-grouped batching.
GROUP_BATCHES = 64


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into bins of at most ``capacity`` (best-fit decreasing).

    Samples are placed longest first, each into the open bin with the least room that still fits it
    (a new bin when none does); ties keep the original order, so the result is deterministic. Within a
    bin, samples keep ascending index order.
    """
    if capacity <= 0:
        raise ValueError(f"capacity {capacity} must be > 0")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        length = lengths[i]
        if length > capacity:
            raise ValueError(f"sample {i} has {length} tokens, more than the pack capacity {capacity}")
        at = bisect.bisect_left(rooms, (length, -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - length > 0:
            bisect.insort(rooms, (room - length, b))
    return [sorted(b) for b in bins]


@dataclass(frozen=True)
class PackingStats:
    """How well the samples filled the packs."""

    samples: int
    packs: int
    tokens: int
    capacity: int

    @property
    def fill(self) -> float:
        """Share of the packs' positions (packs x capacity) that hold tokens."""
        return self.tokens / (self.packs * self.capacity) if self.packs else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "fill": self.fill}


class PackedDataset(Dataset):
    """Rows of several samples of ``dataset`` (``{"input_ids", "labels"}`` items) up to ``capacity`` tokens.

    Items are ``{"input_ids", "labels", "position_ids"}`` lists: the samples concatenated, positions
    restarting at 0 per sample, the first label of every sample -100.
    """

    def __init__(self, dataset: Dataset, lengths: Sequence[int], capacity: int, name: str = "dataset"):
        if len(lengths) != len(dataset):
            raise ValueError(f"{name}: {len(lengths)} lengths for {len(dataset)} samples")
        self.dataset = dataset
        self.packs = pack_best_fit(lengths, capacity)
        self.stats = PackingStats(len(lengths), len(self.packs), int(sum(lengths)), capacity)
        log.info(
            "%s: %d samples packed into %d rows of up to %d tokens (%.1f%% of the positions filled)",
            name,
            self.stats.samples,
            self.stats.packs,
            capacity,
            100 * self.stats.fill,
        )

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return pack_samples([self.dataset[i] for i in self.packs[index]])


def pack_samples(samples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """Concatenate samples into one packed row (position ids restart, first label of each masked)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for sample in samples:
        ids, labs = list(sample["input_ids"]), list(sample["labels"])
        if not ids or len(ids) != len(labs):
            raise ValueError(f"cannot pack a sample with {len(ids)} input ids and {len(labs)} labels")
        input_ids += ids
        labels += [IGNORE_INDEX, *labs[1:]]
        position_ids += range(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of samples of similar length (see the module doc); seeded per epoch.

    Incomplete global batches are dropped, so every rank gets the same number of full micro-batches.
    Deterministic for a given seed and epoch, which is what a resumed stateful loader relies on.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_batches: int = GROUP_BATCHES,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch (a new permutation per epoch)."""
        self.epoch = epoch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        return len(self.lengths) // self.global_batch_size

    def global_batches(self) -> list[list[int]]:
        """All ranks' batches of this epoch, in order, each sorted longest first."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        size = self.global_batch_size
        usable = len(self) * size
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()[:usable]
        group = size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, usable, group):
            chunk = sorted(perm[start : start + group], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        if not batches:
            return []
        order = torch.randperm(len(batches), generator=generator).tolist()
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        order.remove(longest)
        return [batches[b] for b in [longest, *order]]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.num_replicas]
