"""The Lightning DataModule: prepared splits -> SFTDatasets -> padded batches.

Shuffling and distribution: the data module builds the samplers itself (the Trainer runs with
``use_distributed_sampler=False``). On one process the training loader shuffles with a generator
seeded with ``train.seed``; on several, every rank gets a ``DistributedSampler(shuffle=True,
seed=train.seed)`` for its share of the same permutation (Lightning calls ``set_epoch`` each epoch),
and validation a non-shuffling ``DistributedSampler``.

Resume: the training loader is torchdata's ``StatefulDataLoader``. Lightning stores its state (the
batches already taken in the current epoch) in every checkpoint and restores it on resume, and the
loader then skips exactly those batches of the same seeded permutation: a resumed run continues at
the sample where the interrupted one stopped, none seen twice, none skipped. (Lightning's own sampler
replacement would re-create the loader and lose its settings, hence the samplers here.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ftpipe.config.schema import PipelineConfig
from ftpipe.data.collate import SFTCollator
from ftpipe.data.tokenize import SFTDataset, check_chat_template_early
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = get_logger(__name__)

SPLITS = {"train": "train_file", "val": "val_file", "test": "test_file"}
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class SFTDataModule(pl.LightningDataModule):
    """Prepares the data (rank 0, in ``ftpipe.data.prepare``), tokenizes the splits and serves batches.

    Construction checks that the tokenizer can render the data (chat template), so that problem
    shows before ``trainer.fit`` starts the training processes.
    """

    def __init__(self, cfg: PipelineConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.collator = SFTCollator(tokenizer.pad_token_id, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
        self.prepared = None
        self.datasets: dict[str, SFTDataset] = {}
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        """A missing chat template fails here, before ``fit`` starts processes or loads weights.

        The training stage prepares the data before building the data module, so the prepared
        splits (when they exist yet) show whether the rows are chat rows.
        """
        from ftpipe.config.paths import prepared_data_dir
        from ftpipe.data.build import SPLIT_FILES

        folder = prepared_data_dir(self.cfg.data)
        check_chat_template_early(self.tokenizer, self.cfg.data, [folder / n for n in SPLIT_FILES.values()])

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

    def _ranks(self) -> tuple[int, int]:
        """(world size, global rank) of the attached Trainer; (1, 0) without one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, dataset: SFTDataset, stateful: bool = False, **kwargs) -> DataLoader:
        workers = self.cfg.data.num_workers
        loader_cls = StatefulDataLoader if stateful else DataLoader
        return loader_cls(
            dataset,
            batch_size=self.cfg.train.micro_batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=self.collator,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with ``train.seed`` (each rank its share); incomplete last batches are dropped so
        every step is full."""
        dataset = self.train_dataset
        world, rank = self._ranks()
        per_rank = -(-len(dataset) // world)
        if per_rank < self.cfg.train.micro_batch_size:
            raise ValueError(
                f"the training split has {len(dataset)} samples ({per_rank} per rank over {world} rank(s)), "
                f"fewer than micro_batch_size {self.cfg.train.micro_batch_size}: no full batch. Use more "
                "data (max_samples, train_ratio), a smaller micro_batch_size or fewer processes."
            )
        seed = self.cfg.train.seed
        if world > 1:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
            return self._loader(dataset, stateful=True, sampler=sampler, drop_last=True)
        generator = torch.Generator().manual_seed(seed)
        return self._loader(dataset, stateful=True, shuffle=True, generator=generator, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        world, rank = self._ranks()
        if world > 1:
            sampler = DistributedSampler(self.val_dataset, num_replicas=world, rank=rank, shuffle=False)
            return self._loader(self.val_dataset, sampler=sampler)
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)
