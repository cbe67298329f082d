"""The Lightning DataModule of every objective: prepared splits -> tokenized datasets -> padded batches.

The objective (``ftpipe.objectives``; handed in by the training stage, SFT when none is) decides the
dataset of a split and the collate function; everything else here is the same for all objectives.

Shuffling and distribution: the data module builds the samplers itself (the Trainer runs with
``use_distributed_sampler=False``). On one process the training loader shuffles with a generator
seeded with ``train.seed``; on several, every rank gets a ``DistributedSampler(shuffle=True,
seed=train.seed)`` for its share of the same permutation (Lightning calls ``set_epoch`` each epoch),
and validation a non-shuffling ``DistributedSampler``.

Fewer padding tokens (``ftpipe.data.packing``): with ``packing`` the training split is served as
packed rows (through the same samplers); with ``group_by_length`` a length-grouped batch sampler
replaces the sampler. Validation and test batches are never packed.

Resume: the training loader is torchdata's ``StatefulDataLoader``. Lightning stores its state (the
batches already taken in the current epoch) in every checkpoint and restores it on resume, and the
loader then skips exactly those batches of the same seeded permutation: a resumed run continues at
the sample where the interrupted one stopped, none seen twice, none skipped. (Lightning's own sampler
replacement would re-create the loader and lose its settings, hence the samplers here.)

Stop signals: the loaders' worker processes ignore SIGTERM and SIGINT (``LoaderWorkerInit``). A
scheduler signals the whole process group (``docker stop``, Kubernetes, SLURM, Ctrl-C in a terminal);
the training process alone decides to stop (``ftpipe.train.stop``) and shuts its workers down when
it is done. A worker still leaves when its loader shuts down or its process dies (PyTorch's done
event and parent watchdog).
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ftpipe.config.schema import PipelineConfig
from ftpipe.data.collate import SFTCollator
from ftpipe.data.dataset import SFTDataset
from ftpipe.data.errors import DataError
from ftpipe.data.packing import LengthGroupedBatchSampler, PackedDataset
from ftpipe.data.tokenize import IGNORE_INDEX, check_chat_template_early
from ftpipe.utils.logging import get_logger
from ftpipe.utils.world import distributed, local_rank

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ftpipe.data.prepare import PreparedData

log = get_logger(__name__)

SPLITS = {"train": "train_file", "val": "val_file", "test": "test_file"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # the loader workers ignore them: the trainer stops
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class SFTDataModule(pl.LightningDataModule):
    """Prepares the data (rank 0, in ``ftpipe.data.prepare``), tokenizes the splits and serves batches.

    Construction checks that the tokenizer can render the data (chat template), so that problem
    shows before ``trainer.fit`` starts the training processes.

    Args:
        cfg: the pipeline configuration.
        tokenizer: the model's tokenizer (``ftpipe.model.tokenizer.load_tokenizer``).
        objective: the training objective (``ftpipe.objectives.Objective``): its ``dataset`` and
            ``collator``; None: supervised fine-tuning (``SFTDataset``, ``SFTCollator``).
        prepared: the prepared data of ``cfg`` when the caller prepared it already (the training stage
            does); None: ``setup`` prepares it.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        tokenizer: PreTrainedTokenizerBase,
        objective: Any = None,
        prepared: PreparedData | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.objective = objective
        self.collator = self._collator(flatten=False)
        self.train_collator = self.collator
        if cfg.data.packing:
            self.train_collator = self._collator(flatten=_flash_attention(cfg))
        self.prepared = prepared
        self.datasets: dict[str, SFTDataset] = {}
        self._packed_train: PackedDataset | None = None
        self._check_tokenizer()

    def _collator(self, flatten: bool) -> Any:
        if self.objective is not None:
            return self.objective.collator(self.tokenizer.pad_token_id, flatten=flatten)
        return SFTCollator(
            self.tokenizer.pad_token_id, pad_to_multiple_of=self.cfg.data.pad_to_multiple_of, flatten=flatten
        )

    def _check_tokenizer(self) -> None:
        """A missing chat template fails here, before ``fit`` starts processes or loads weights.

        The training stage prepares the data before building the data module, so the prepared
        splits (when they exist yet) show whether the rows are chat rows.
        """
        from ftpipe.config.paths import prepared_data_dir
        from ftpipe.data.build import SPLIT_FILES

        folder = prepared_data_dir(self.cfg.data, self.cfg.objective.objective)
        check_chat_template_early(self.tokenizer, self.cfg.data, [folder / n for n in SPLIT_FILES.values()])

    def setup(self, stage: str | None = None) -> None:
        """Prepare the data once unless it was handed over (idempotent), and tokenize the splits ``stage``
        needs (all when None)."""
        if self.prepared is None:
            from ftpipe.data.prepare import prepare_data

            self.prepared = prepare_data(self.cfg)
        needed = STAGE_SPLITS.get(stage, tuple(SPLITS)) if stage else tuple(SPLITS)
        # With several processes the first of each node tokenizes; the others read its cache.
        role = "alone" if not distributed() else ("leader" if local_rank() == 0 else "follower")
        for split in needed:
            if split not in self.datasets:
                path = getattr(self.prepared, SPLITS[split])
                kwargs = {
                    "name": f"{split} ({path})",
                    "role": role,
                    "wait_s": self.cfg.data.prepare_timeout_s,
                }
                if self.objective is not None:
                    self.datasets[split] = self.objective.dataset(path, self.tokenizer, **kwargs)
                else:
                    self.datasets[split] = SFTDataset(path, self.tokenizer, self.cfg.data, **kwargs)

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

    @property
    def packed_train_dataset(self) -> PackedDataset:
        """The training split packed into rows of up to ``max_seq_length`` tokens (built once)."""
        if self._packed_train is None:
            dataset = self.train_dataset
            self._packed_train = PackedDataset(
                dataset, dataset.lengths, self.cfg.data.max_seq_length, name=dataset.name
            )
        return self._packed_train

    def _loader(self, dataset, stateful: bool = False, collate_fn=None, **kwargs) -> DataLoader:
        workers = self.cfg.data.num_workers
        loader_cls = StatefulDataLoader if stateful else DataLoader
        if "batch_sampler" not in kwargs:
            kwargs["batch_size"] = self.cfg.train.micro_batch_size
        return loader_cls(
            dataset,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_fn or self.collator,
            worker_init_fn=LoaderWorkerInit(self._ranks()[1]) if workers > 0 else None,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled with ``train.seed`` (each rank its share); incomplete last batches are dropped so
        every step is full. Packed rows with ``packing``, length-grouped batches with ``group_by_length``."""
        packing = self.cfg.data.packing
        dataset = self.packed_train_dataset if packing else self.train_dataset
        world, rank = self._ranks()
        micro = self.cfg.train.micro_batch_size
        per_rank = -(-len(dataset) // world)
        if per_rank < micro:
            what = f"{len(dataset)} packed rows" if packing else f"{len(dataset)} samples"
            raise DataError(
                f"the training split has {what} ({per_rank} per rank over {world} rank(s)), "
                f"fewer than micro_batch_size {micro}: no full batch. Use more "
                "data (max_samples, train_ratio), a smaller micro_batch_size or fewer processes."
            )
        seed = self.cfg.train.seed
        collate = self.train_collator
        if self.cfg.data.group_by_length and not packing:
            batches = LengthGroupedBatchSampler(
                dataset.lengths, micro, num_replicas=world, rank=rank, seed=seed
            )
            return self._loader(dataset, stateful=True, collate_fn=collate, batch_sampler=batches)
        if world > 1:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
            return self._loader(dataset, stateful=True, collate_fn=collate, sampler=sampler, drop_last=True)
        generator = torch.Generator().manual_seed(seed)
        return self._loader(
            dataset, stateful=True, collate_fn=collate, shuffle=True, generator=generator, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        """Every rank its share of the split; the ranks' counts are evened out with label-less copies, so
        every rank runs the same number of batches and val_loss counts each sample exactly once."""
        world, rank = self._ranks()
        if world > 1:
            padded = LabelFreePadding(self.val_dataset, world)
            sampler = DistributedSampler(padded, num_replicas=world, rank=rank, shuffle=False)
            return self._loader(padded, sampler=sampler)
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)


class LoaderWorkerInit:
    """A data loader worker's start: SIGTERM and SIGINT ignored, then Lightning's worker seeding.

    A stop signal sent to the process group would otherwise kill the workers, and the training
    process would fail on its next batch instead of stopping after its step with a checkpoint. The
    worker still exits when its loader shuts down or the training process dies. Lightning adds its
    seeding (``seed_everything(workers=True)``) only to loaders without a ``worker_init_fn``, so it
    is called here.

    Args:
        rank: the global rank of the process that owns the loader (Lightning's worker seeds use it).
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if int(os.environ.get("PL_SEED_WORKERS", "0")):
            from lightning.fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id, rank=self.rank)


class LabelFreePadding(Dataset):
    """A split padded to a multiple of ``world`` samples: the extra samples are copies of the first ones
    with every label -100 (every ``*labels`` field: both sides of a pair), so they take a batch slot on
    their rank but count in no loss.

    (``DistributedSampler`` would pad with the same copies, labels and all, and count them twice.)
    """

    def __init__(self, dataset: Dataset, world: int) -> None:
        self.dataset = dataset
        self.size = len(dataset)  # type: ignore[arg-type]
        self.padded = -(-self.size // world) * world if self.size else 0

    def __len__(self) -> int:
        return self.padded

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < self.size:
            return self.dataset[index]
        item = dict(self.dataset[index % self.size])
        for key in [k for k in item if k.endswith("labels")]:
            item[key] = [IGNORE_INDEX] * len(item[key])
        return item


def _flash_attention(cfg: PipelineConfig) -> bool:
    """True when training will use flash-attention (packed rows are then flattened into one row)."""
    from ftpipe.runtime import accelerator_name, select_attn_implementation

    return select_attn_implementation(cfg, accelerator_name(cfg)) == "flash_attention_2"
