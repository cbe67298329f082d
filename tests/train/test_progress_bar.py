"""The training progress bar counts optimizer steps against ``max_steps``, across epochs and accumulation,
in a real (tiny) Lightning run."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ftpipe.train.trainer import StepProgressBar


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.layer(x).pow(2).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(
    tmp_path, max_steps: int, accumulate: int, batches_per_epoch: int, refresh_rate: int
) -> StepProgressBar:
    bar = StepProgressBar(refresh_rate=refresh_rate)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    data = DataLoader(TensorDataset(torch.randn(batches_per_epoch, 4)), batch_size=1)
    trainer.fit(_Tiny(), train_dataloaders=data)
    assert trainer.global_step == max_steps
    return bar


def _counts(text: str) -> list[tuple[int, str]]:
    """Every ``n/total`` the bar printed (``?`` for an unknown total)."""
    return [(int(n), total) for n, total in re.findall(r"training: .*?\| (\d+)/(\d+|\?) ", text)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("max_steps", "accumulate", "batches_per_epoch"),
    [(2, 4, 100), (3, 4, 5)],  # one epoch; several epochs of a batch count not a multiple of 4
    ids=["one-epoch", "across-epochs"],
)
def test_the_bar_counts_optimizer_steps_against_max_steps(
    tmp_path, capsys, max_steps, accumulate, batches_per_epoch
):
    bar = _fit(tmp_path, max_steps, accumulate, batches_per_epoch, refresh_rate=1)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (max_steps, max_steps)
    counts = _counts(capsys.readouterr().out)
    assert counts, "the bar printed nothing"
    assert {total for _, total in counts} == {str(max_steps)}  # a known total from the start, in steps
    shown = [n for n, _ in counts]
    assert shown == sorted(shown) and max(shown) == max_steps  # never back to 0 at an epoch's start
    assert set(range(1, max_steps + 1)) <= set(shown)


@pytest.mark.timeout(120)
def test_a_sparse_refresh_still_ends_at_the_last_step(tmp_path, capsys):
    bar = _fit(tmp_path, max_steps=5, accumulate=2, batches_per_epoch=40, refresh_rate=4)
    assert bar.train_progress_bar.n == 5
    shown = [n for n, _ in _counts(capsys.readouterr().out)]
    assert 5 in shown and 4 in shown and not {1, 2, 3} & set(shown[1:])
