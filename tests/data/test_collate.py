"""Batch padding: exact tensors, multiple-of-8 shapes, masks and token counts."""

from __future__ import annotations

import pytest
import torch

from ftpipe.data.collate import SFTCollator

PAD = 2  # the embedded SmolLM2's pad == eos


@pytest.mark.timeout(30)
def test_pads_right_to_longest_with_masked_labels():
    batch = SFTCollator(pad_token_id=PAD)(
        [
            {"input_ids": [5, 6, 7, 2], "labels": [-100, -100, 7, 2]},
            {"input_ids": torch.tensor([8, 2]), "labels": torch.tensor([-100, 2])},
        ]
    )
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_tokens", "num_label_tokens"}
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 2], [8, 2, PAD, PAD]]))
    # the EOS (== pad id) inside a sample keeps its label; padding does not get one
    assert torch.equal(batch["labels"], torch.tensor([[-100, -100, 7, 2], [-100, 2, -100, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask"))
    assert batch["num_tokens"].ndim == 0 and batch["num_tokens"].item() == 6
    assert batch["num_label_tokens"].ndim == 0 and batch["num_label_tokens"].item() == 3


@pytest.mark.timeout(30)
def test_pad_to_multiple_of_eight():
    collate = SFTCollator(pad_token_id=0, pad_to_multiple_of=8)
    batch = collate(
        [{"input_ids": list(range(1, 10)), "labels": list(range(1, 10))}, {"input_ids": [4], "labels": [4]}]
    )
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["attention_mask"].sum(dim=1).tolist() == [9, 1]
    assert batch["input_ids"][0, 9:].eq(0).all() and batch["labels"][0, 9:].eq(-100).all()
    assert batch["num_tokens"].item() == 10 and batch["num_label_tokens"].item() == 10
    exact = collate([{"input_ids": list(range(8)), "labels": [-100] * 8}])
    assert exact["input_ids"].shape == (1, 8) and exact["num_label_tokens"].item() == 0


@pytest.mark.timeout(30)
def test_custom_label_pad_and_bad_samples():
    batch = SFTCollator(pad_token_id=0, label_pad_id=-1)(
        [{"input_ids": [3, 4], "labels": [-1, 4]}, {"input_ids": [3], "labels": [-1]}]
    )
    assert batch["labels"].tolist() == [[-1, 4], [-1, -1]] and batch["num_label_tokens"].item() == 1
    with pytest.raises(ValueError, match="sample 0 of the batch"):
        SFTCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        SFTCollator(pad_token_id=None)
