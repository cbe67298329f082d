"""Batching: right padding to the longest sample, labels padded with -100, token counts for the loss.

Packed rows (items with ``position_ids``, see ``ftpipe.data.packing``) are batched without an
attention mask: the padding after a row is given positions of its own (0, 1, ...), so transformers
treats it as one more, label-less sequence that nothing real attends to. With ``flatten`` the rows of
a micro-batch become one row (flash-attention's varlen path needs a batch of one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from ftpipe.data.tokenize import IGNORE_INDEX


class SFTCollator:
    """Pad a list of ``{"input_ids", "labels"}`` samples into a batch of LongTensors.

    Returns ``input_ids``, ``labels`` and ``attention_mask`` of shape (batch, length), right-padded to
    the longest sample (rounded up to ``pad_to_multiple_of``), plus 0-d ``num_tokens`` (non-padding
    tokens) and ``num_label_tokens`` (labels that count in the loss). Padding never takes a label, so
    an EOS inside a sample keeps its label even when the pad token is EOS.

    Packed rows (samples with ``position_ids``) give ``position_ids`` instead of ``attention_mask``
    (see the module doc); ``flatten`` concatenates them into a batch of one row.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        label_pad_id: int = IGNORE_INDEX,
        *,
        flatten: bool = False,
    ) -> None:
        if pad_token_id is None:
            raise ValueError(
                "pad_token_id is None: load the tokenizer with ftpipe.model.tokenizer.load_tokenizer"
            )
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of: {pad_to_multiple_of} must be > 0")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id
        self.flatten = flatten

    def __call__(
        self, samples: Sequence[Mapping[str, Sequence[int] | torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        ids = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples]
        labels = [torch.as_tensor(s["labels"], dtype=torch.long) for s in samples]
        for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
            if x.ndim != 1 or x.shape != y.shape:
                raise ValueError(
                    f"sample {i} of the batch: input_ids {tuple(x.shape)} and labels {tuple(y.shape)} "
                    "must be 1-D and of equal length"
                )
        packed = "position_ids" in samples[0]
        if packed:
            positions = [torch.as_tensor(s["position_ids"], dtype=torch.long) for s in samples]
            if self.flatten:
                ids, labels, positions = [torch.cat(ids)], [torch.cat(labels)], [torch.cat(positions)]
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id, length),
            "labels": self._pad(labels, self.label_pad_id, length),
        }
        if packed:
            pad_positions = [torch.arange(length - len(p)) for p in positions]
            batch["position_ids"] = torch.stack(
                [torch.cat(x) for x in zip(positions, pad_positions, strict=True)]
            )
            batch["num_tokens"] = torch.tensor(sum(len(x) for x in ids))
        else:
            batch["attention_mask"] = self._pad([torch.ones_like(x) for x in ids], 0, length)
            batch["num_tokens"] = batch["attention_mask"].sum()
        batch["num_label_tokens"] = (batch["labels"] != self.label_pad_id).sum()
        return batch

    @staticmethod
    def _pad(rows: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
        padded = pad_sequence(rows, batch_first=True, padding_value=value)  # right padding
        if padded.shape[1] < length:
            padded = torch.nn.functional.pad(padded, (0, length - padded.shape[1]), value=value)
        return padded
