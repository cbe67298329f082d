"""``reference: cached``: the reference log-probabilities of every pair, computed once before training.

The reference of a preference objective is the model training starts from. Instead of a second forward
per step (the adapter-disabled policy, or a frozen copy), the policy computes both sides' summed answer
log-probabilities of every training and validation pair once, in eval mode and without gradients,
before its first update (``FineTuneModule.on_fit_start``). The ranks share the work (rank r takes pairs
r, r + W, ...; one all-reduce puts the values together), and rank 0 stores them beside the prepared
data (``reference-<split>-<key>.pt``), keyed by the model, the adapter it continues, the precision,
``max_seq_length`` and the split file's identity: a resumed or repeated run reads them instead of
computing them again. Batches then carry ``ref_logps`` (``PairCollator``).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ftpipe.utils.logging import get_logger
from ftpipe.utils.world import all_reduce

log = get_logger(__name__)


class WithReference(Dataset):
    """A pair dataset whose items also carry ``ref_chosen_logps`` and ``ref_rejected_logps``.

    Args:
        dataset: the pair dataset (``ftpipe.data.pairs.PairDataset``).
        values: float tensor ``(len(dataset), 2)``: chosen, rejected.
    """

    def __init__(self, dataset: Dataset, values: torch.Tensor) -> None:
        if values.shape != (len(dataset), 2):  # type: ignore[arg-type]
            raise ValueError(f"reference values of shape {tuple(values.shape)} for {len(dataset)} pairs")  # type: ignore[arg-type]
        self.dataset = dataset
        self.values = values.to(torch.float32).tolist()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["ref_chosen_logps"], item["ref_rejected_logps"] = self.values[index]
        return item

    def __getattr__(self, name: str) -> Any:  # lengths, stats, name, samples of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def samples_identity(dataset: Any) -> str:
    """What the tokenized pairs are: the name of their tokenization cache file (a hash of the rows' file, the
    tokenizer, every setting that changes tokenized samples and the encoding code), else the in-memory
    dataset's fingerprint; and how many pairs are kept."""
    data = getattr(dataset, "data", None)
    files = [Path(f["filename"]).name for f in getattr(data, "cache_files", None) or []]
    identity = "|".join(files) or str(getattr(data, "_fingerprint", None) or id(dataset))
    return f"{identity}|{len(dataset)}"


def cache_key(cfg: Any, split_file: Path, dataset: Any = None) -> str:
    """What decides the reference values of a split: the model, the adapter it continues, the numerics, the
    split file's identity and the tokenized samples (:func:`samples_identity`: tokenizer, template and
    tokenization settings included)."""
    stat = split_file.stat()
    adapter = cfg.objective.init_adapter
    adapter_stamp = None
    if adapter and Path(adapter).exists():
        adapter_stamp = Path(adapter).stat().st_mtime_ns
    parts = [
        cfg.model.hf_model_id,
        adapter,
        adapter_stamp,
        cfg.model.precision,
        cfg.model.attn_implementation,
        cfg.data.max_seq_length,
        str(split_file.resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        samples_identity(dataset) if dataset is not None else None,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_reference(module: Any, dataset: Dataset, collate: Any, batch_size: int) -> torch.Tensor:
    """``(len(dataset), 2)`` summed answer log-probabilities (chosen, rejected) under the module's model as
    it is now, the ranks sharing the pairs; the same tensor on every rank."""
    trainer = module.trainer
    world, rank = int(trainer.world_size), int(trainer.global_rank)
    size = len(dataset)  # type: ignore[arg-type]
    per_rank = -(-size // world)
    mine = [rank + k * world for k in range(per_rank)]  # past the end: repeats that are not recorded
    values = torch.zeros(size, 2, dtype=torch.float64, device=module.device)
    gather = _full_params(trainer)
    was_training = module.model.training
    module.model.eval()
    try:
        with gather:
            for start in range(0, per_rank, batch_size):
                indices = mine[start : start + batch_size]
                batch = collate([dataset[i % size] for i in indices])
                batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                logps = module.sequence_logps(batch).double()
                pairs = len(indices)
                for j, index in enumerate(indices):
                    if index < size:
                        values[index, 0] = logps[j]
                        values[index, 1] = logps[pairs + j]
    finally:
        module.model.train(was_training)
    return all_reduce(values).cpu().to(torch.float32)


def _full_params(trainer: Any) -> Any:
    """FSDP1 gathers the root's parameters only inside the root's forward: the reference pass, which
    runs outside it, sees the full parameters (one full copy per rank, for this pass only)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    root = trainer.strategy.model
    if isinstance(root, FSDP):
        return FSDP.summon_full_params(root, recurse=True, writeback=False)
    return nullcontext()


def attach_cached_reference(module: Any, datamodule: Any) -> None:
    """Give the training and validation pair datasets their reference log-probabilities (computed once,
    or read from beside the prepared data)."""
    cfg = module.cfg
    folder = Path(datamodule.prepared.folder)
    for split, attr in (("train", "train_file"), ("val", "val_file")):
        dataset = datamodule.datasets.get(split)
        if dataset is None or isinstance(dataset, WithReference) or len(dataset) == 0:
            continue
        split_file = Path(getattr(datamodule.prepared, attr))
        path = folder / f"reference-{split}-{cache_key(cfg, split_file, dataset)}.pt"
        values = None
        if path.is_file():
            try:
                values = torch.load(path, weights_only=True)
            except Exception:  # a damaged file: computed again below
                values = None
            if values is not None and tuple(values.shape) != (len(dataset), 2):
                values = None
        if values is None:
            values = compute_reference(module, dataset, datamodule.collator, cfg.train.micro_batch_size)
            if module.trainer.is_global_zero:
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                torch.save(values, tmp)
                os.replace(tmp, path)
                log.info(
                    "reference log-probabilities of %d %s pairs computed and cached in %s",
                    len(dataset),
                    split,
                    path,
                )
        elif module.trainer.is_global_zero:
            log.info("reference log-probabilities of the %s pairs read from %s", split, path)
        datamodule.datasets[split] = WithReference(dataset, values)
