"""The one object that owns an optimizer step's accounting: counts, rescale, norm, skip, boundary."""

from __future__ import annotations

import math

import pytest
import torch

from ftpipe.train.step import NonFiniteError, OptimizerStep


def _counts(loss_sum: float, labels: int, tokens: int, padded: int) -> torch.Tensor:
    """SFT's counts: the units of the loss are its label tokens."""
    return torch.tensor([loss_sum, labels, tokens, padded, labels], dtype=torch.float64)


@pytest.mark.timeout(30)
def test_step_boundary_rescale_and_statistics_over_an_accumulation_window():
    layer = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    steps = OptimizerStep(max_nonfinite_steps=3)
    assert steps.starts_step() and steps.just_completed() is None

    steps.add(_counts(6.0, 2, 5, 8))
    assert not steps.starts_step() and steps.just_completed() is None  # inside the window
    steps.add(_counts(3.0, 1, 3, 8))
    layer.weight.grad = torch.ones_like(layer.weight)
    stats = steps.rescale(optimizer, step=1, accumulate=2, world_size=1, device=torch.device("cpu"))
    # accumulate * world / label tokens = 2 / 3: the gradient of the token mean
    assert torch.allclose(layer.weight.grad, torch.full_like(layer.weight, 2 / 3))
    assert (stats.step, stats.loss, stats.label_tokens, stats.tokens, stats.padded_tokens) == (
        1,
        3.0,
        3,
        8,
        16,
    )
    assert stats.lr == 0.5
    assert steps.just_completed() is stats and steps.starts_step()  # the boundary, once

    assert steps.check(grad_norm=1.5) is False and stats.grad_norm == 1.5 and stats.nonfinite_steps == 0
    steps.add(_counts(1.0, 1, 1, 1))
    assert steps.just_completed() is None and not steps.starts_step()  # the next window started


@pytest.mark.timeout(30)
def test_non_finite_steps_are_skipped_then_stop_training():
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    steps = OptimizerStep(max_nonfinite_steps=2)
    for step, norm in ((1, math.nan), (2, 1.0), (3, math.inf)):
        steps.add(_counts(1.0, 1, 1, 1))
        steps.rescale(optimizer, step=step, accumulate=1, world_size=1, device=torch.device("cpu"))
        assert steps.check(norm) is (not math.isfinite(norm))
    assert steps.last.nonfinite_steps == 2  # two in total, one in a row
    steps.add(_counts(math.nan, 1, 1, 1))  # a NaN loss counts even with a finite norm
    steps.rescale(optimizer, step=4, accumulate=1, world_size=1, device=torch.device("cpu"))
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        steps.check(1.0)
    # a step with no label tokens has no loss to check
    empty = OptimizerStep(max_nonfinite_steps=1)
    empty.add(_counts(0.0, 0, 4, 4))
    empty.rescale(optimizer, step=1, accumulate=1, world_size=1, device=torch.device("cpu"))
    assert math.isnan(empty.last.loss) and empty.check(1.0) is False


@pytest.mark.timeout(30)
def test_units_and_objective_metrics_are_step_means():
    """A DPO-like step: the loss and every metric are divided by the step's pairs, not its tokens."""
    layer = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    steps = OptimizerStep(max_nonfinite_steps=3, metric_names=("rewards/accuracies", "rewards/margins"))
    # loss sum, pairs, tokens, padded, label tokens, accuracy sum, margin sum
    steps.add(torch.tensor([1.2, 2, 40, 48, 10, 1.0, 0.5], dtype=torch.float64))
    steps.add(torch.tensor([0.6, 1, 20, 24, 6, 1.0, 0.7], dtype=torch.float64))
    layer.weight.grad = torch.ones_like(layer.weight)
    stats = steps.complete(
        optimizer,
        step=1,
        accumulate=2,
        world_size=1,
        device=torch.device("cpu"),
        root=None,
        max_norm=None,
    )
    assert stats.units == 3 and stats.label_tokens == 16 and stats.tokens == 60
    assert stats.loss == pytest.approx(0.6)
    assert stats.metrics == pytest.approx({"rewards/accuracies": 2 / 3, "rewards/margins": 0.4})
    assert torch.allclose(layer.weight.grad, torch.full_like(layer.weight, 2 / 3))  # A * W / pairs
    assert stats.grad_norm == pytest.approx(2 / 3 * 2**0.5)
