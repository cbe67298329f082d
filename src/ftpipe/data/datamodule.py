"""The Lightning DataModule: prepared splits -> SFTDatasets -> padded batches.

Shuffling and distribution: the training loader is built with ``shuffle=True`` and a generator seeded
with ``train.seed``, which orders a single-process run. Under a distributed strategy Lightning 2.6
(``use_distributed_sampler=True``, the default) replaces the sampler with
``DistributedSampler(dataset, shuffle=True, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))`` and calls
``set_epoch`` every epoch: the seed comes from the environment variable that
``lightning.seed_everything(train.seed)`` sets, so the training stage must call it before ``fit``
(a warning says so when it was not). Every rank then draws the same permutation and takes its own
share. The loaders are plain DataLoaders over a map-style dataset, so a stateful sampler for exact
resume can replace the sampler later without changing this interface.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ftpipe.config.schema import PipelineConfig
from ftpipe.data.collate import SFTCollator
from ftpipe.data.tokenize import SFTDataset
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = get_logger(__name__)

SPLITS = {"train": "train_file", "val": "val_file", "test": "test_file"}
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class SFTDataModule(pl.LightningDataModule):
    """Prepares the data (rank 0, in ``ftpipe.data.prepare``), tokenizes the splits and serves batches."""

    def __init__(self, cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.collator = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
        self.prepared = None
        self.datasets: dict[str, SFTDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Prepare the data once (idempotent) and tokenize the splits ``stage`` needs (all when None)."""
        if self.prepared is None:
            from ftpipe.data.prepare import prepare_data

            self.prepared = prepare_data(self.cfg)
        needed = STAGE_SPLITS.get(stage, tuple(SPLITS)) if stage else tuple(SPLITS)
        for split in needed:
            if split not in self.datasets:
                path = getattr(self.prepared, SPLITS[split])
                self.datasets[split] = SFTDataset(
                    path, self.tokenizer, self.cfg.data, name=f"{split} ({path})"
                )

    def _dataset(self, split: str) -> SFTDataset:
        if split not in self.datasets:
            self.setup(None)
        return self.datasets[split]

    @property
    def train_dataset(self) -> SFTDataset:
        return self._dataset("train")

    @property
    def val_dataset(self) -> SFTDataset:
        return self._dataset("val")

    @property
    def test_dataset(self) -> SFTDataset:
        return self._dataset("test")

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _loader(self, dataset: SFTDataset, **kwargs) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.train.micro_batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=self.collator,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with ``train.seed``; incomplete last batches are dropped so every step is full."""
        dataset, world = self.train_dataset, self._world_size()
        per_rank = -(-len(dataset) // world)
        if per_rank < self.cfg.train.micro_batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} samples ({per_rank} per rank over {world} rank(s)), "
                f"fewer than micro_batch_size {self.cfg.train.micro_batch_size}: no full batch. Use more "
                "data (max_samples, train_ratio), a smaller micro_batch_size or fewer processes."
            )
        if world > 1 and os.environ.get("PL_GLOBAL_SEED") != str(self.cfg.train.seed):
            log.warning(
                "PL_GLOBAL_SEED is %r, not seed %d: Lightning's DistributedSampler shuffles with that "
                "environment variable; call lightning.seed_everything(seed) before fit",
                os.environ.get("PL_GLOBAL_SEED"),
                self.cfg.train.seed,
            )
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        return self._loader(dataset, shuffle=True, generator=generator, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)
