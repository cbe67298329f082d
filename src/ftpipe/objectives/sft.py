"""Supervised fine-tuning: the mean next-token cross-entropy over the answer tokens.

Records are ``{"input", "output"}`` or chat ``{"messages", "tools"}`` rows (``ftpipe.data.tokenize``);
samples are ``{"input_ids", "labels"}`` with the prompt masked, batched (and packed) by
``ftpipe.data.collate.SFTCollator``. The loss is the token-loss sum of the micro-batch over its label
tokens: the step divides by the label tokens of the whole optimizer step, over accumulation and ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ftpipe.data.collate import SFTCollator
from ftpipe.data.dataset import SFTDataset
from ftpipe.objectives.base import Batch, LossParts, Objective, PolicyModel, label_counts


class SFTObjective(Objective):
    """Next-token likelihood of the answers (the prompt is context)."""

    name = "sft"
    unit = "label token"
    sequences_per_sample = 1

    @property
    def supports_packing(self) -> bool:
        return True

    def dataset(self, source: Any, tokenizer: Any, **kwargs: Any) -> SFTDataset:
        return SFTDataset(source, tokenizer, self.cfg.data, **kwargs)

    def collator(self, pad_token_id: int, *, flatten: bool = False) -> Callable[[Sequence[Any]], dict]:
        return SFTCollator(pad_token_id, pad_to_multiple_of=self.cfg.data.pad_to_multiple_of, flatten=flatten)

    def loss(self, model: PolicyModel, batch: Batch) -> LossParts:
        loss_sum = model.token_loss_sum(batch)
        units = batch.get("num_label_tokens")
        if units is None:
            units = label_counts(batch["labels"]).sum()
        return LossParts(loss_sum, torch.as_tensor(units))
