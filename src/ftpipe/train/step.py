"""One optimizer step, read in one place: :meth:`OptimizerStep.add` per micro-batch and
:meth:`OptimizerStep.complete` before the update.

The loss of an optimizer step is the mean over *all* units of the step (label tokens for SFT, pairs
for DPO: the objective says, ``ftpipe.objectives``), across its micro-batches and all ranks, so
``micro 4 x accumulation 1``, ``micro 1 x accumulation 4`` and ``2 ranks x micro 2`` give the same
loss and the same gradients. Each micro-batch's backward runs on the SUM of its unit losses; Lightning
divides it by ``accumulate_grad_batches`` (A) and DDP/FSDP average the gradients over the W
data-parallel ranks. :meth:`OptimizerStep.complete` then

1. all-reduces the step's counts (one collective: loss sum, units, tokens, padding, label tokens and
   the objective's metric sums) and multiplies the gradients by ``A * W / N`` (N units): the gradient
   of the unit-mean loss. A shorter accumulation window at the end of an epoch is handled too (N counts
   what was seen, A is what Lightning divided by);
2. takes the global gradient norm over all shards and clips it to ``gradient_clip_val``;
3. decides whether the update is skipped: the loss and the norm are the same on every rank, so every
   rank decides alike without another collective (see ``NonFiniteGuard``); a skipped step's gradients
   are set to None, so AdamW changes neither the weights nor its moments.

:meth:`OptimizerStep.just_completed` is the one step boundary: the step's statistics at the
micro-batch that completed it, None inside an accumulation window. The module, the metrics, the
stop-on-signal and the heartbeat callbacks all act on it; the module creates the object and the
callbacks receive it explicitly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ftpipe.errors import FtpipeError
from ftpipe.utils.world import all_reduce


class NonFiniteError(FtpipeError):
    """``max_nonfinite_steps`` optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class StepStats:
    """Totals of one optimizer step over its micro-batches and all ranks.

    Attributes:
        step: optimizer step number (1-based).
        loss: unit-mean training loss (per label token for SFT, per pair for DPO).
        label_tokens: tokens that count in the loss (labels != -100).
        tokens: real (non-padding) input tokens.
        padded_tokens: input positions including padding.
        grad_norm: global gradient norm before clipping (None until clipping ran).
        lr: learning rate of the step.
        skipped: the loss or gradient norm was not finite; the optimizer update was skipped.
        nonfinite_steps: skipped steps of the run so far, this one included.
    """

    step: int
    loss: float
    label_tokens: int
    tokens: int
    padded_tokens: int
    grad_norm: float | None = None
    lr: float | None = None
    skipped: bool = False
    nonfinite_steps: int = 0
    units: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


#: Entries of a micro-batch's counts before the objective's metric sums.
COUNTS = ("loss_sum", "units", "tokens", "padded", "label_tokens")


def total_grad_norm_and_clip(
    root: torch.nn.Module | None, params: list[torch.nn.Parameter], max_norm: float | None
) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` over all shards (returned before clipping), and
    clipping to ``max_norm`` when it is set.

    FSDP1: ``FullyShardedDataParallel.clip_grad_norm_`` of the root (it all-reduces the shard norms).
    FSDP2: the gradients are DTensors; their norm is a partial DTensor, made full by an all-reduce.
    DDP and single device: the gradients are already complete on every rank.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(root, FSDP):
        return root.clip_grad_norm_(max_norm if max_norm else float("inf")).detach().float()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):  # DTensor
        total = total.full_tensor()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total.detach().float()


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps with a non-finite loss or gradient norm and stops after too many in a row.

    Attributes:
        max_in_a_row: this many non-finite steps in a row raise :class:`NonFiniteError`.
        total: non-finite steps so far.
        in_a_row: ``(step, loss, grad_norm)`` of the current run of non-finite steps.
    """

    max_in_a_row: int
    total: int = 0
    in_a_row: list[tuple[int, float, float | None]] = field(default_factory=list)

    def check(self, step: int, loss: float, grad_norm: float | None) -> bool:
        """True when ``step`` must be skipped (``grad_norm`` None: not checked); a finite step resets the
        run. Raises NonFiniteError at the ``max_in_a_row``-th non-finite step in a row."""
        if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
            self.in_a_row.clear()
            return False
        self.total += 1
        self.in_a_row.append((step, loss, grad_norm))
        if len(self.in_a_row) >= self.max_in_a_row:
            raise NonFiniteError(self.message())
        return True

    def message(self) -> str:
        """What went wrong at which steps, and what to do."""
        values = "; ".join(
            f"step {s}: loss {loss}, grad_norm {'n/a' if norm is None else norm}"
            for s, loss, norm in self.in_a_row
        )
        return (
            f"training stopped at step {self.in_a_row[-1][0]}: {len(self.in_a_row)} optimizer steps in a row "
            f"had a non-finite loss or gradient norm (max_nonfinite_steps {self.max_in_a_row}; {values}); "
            "their updates were skipped. Lower learning_rate (or raise warmup_steps), set gradient_clip_val, "
            "check the data for broken or extreme rows, and prefer bf16-mixed or 32-true precision over "
            "16-mixed; raise max_nonfinite_steps to tolerate longer runs of such steps."
        )

    def state(self) -> dict[str, Any]:
        return {"total": self.total, "in_a_row": [list(x) for x in self.in_a_row]}

    def load(self, state: dict[str, Any]) -> None:
        self.total = int(state.get("total", 0))
        self.in_a_row = [
            (int(s), float(loss), None if n is None else float(n)) for s, loss, n in state.get("in_a_row", [])
        ]


class OptimizerStep:
    """The accounting of one optimizer step: unit counts, the gradient rescale, the gradient norm and
    clipping, the skip decision and the boundary.

    Args:
        max_nonfinite_steps: non-finite steps in a row that stop training (``NonFiniteGuard``).
        metric_names: the objective's metrics (per-unit sums at the end of each micro-batch's counts).
    """

    def __init__(self, max_nonfinite_steps: int, metric_names: tuple[str, ...] = ()) -> None:
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.metric_names = tuple(metric_names)
        #: The statistics of the last completed optimizer step (None before the first).
        self.last: StepStats | None = None
        # COUNTS then the metric sums of the current step (this rank)
        self._counts = torch.zeros(len(COUNTS) + len(self.metric_names), dtype=torch.float64)
        self._micro_batches = 0
        self._completed_at = -1

    def add(self, counts: torch.Tensor) -> None:
        """Count one micro-batch: ``COUNTS`` then the metric sums (float64; see :func:`micro_batch_counts`)."""
        self._counts = self._counts.to(counts.device) + counts
        self._micro_batches += 1

    def starts_step(self) -> bool:
        """Whether the next micro-batch is the first of an optimizer step (call before ``add``)."""
        return self._micro_batches == 0 or self._completed_at == self._micro_batches

    def rescale(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        step: int,
        accumulate: int,
        world_size: int,
        device: torch.device,
    ) -> StepStats:
        """All-reduce the step's counts, turn the accumulated gradient of summed losses into the gradient
        of the token mean, and start the step's statistics (``step`` is 1-based)."""
        totals = all_reduce(self._counts.to(device))
        values = [float(x) for x in totals.cpu()]
        loss_sum, n_units, tokens, padded, n_label = values[: len(COUNTS)]
        self._counts = torch.zeros_like(self._counts)
        scale = accumulate * world_size / max(n_units, 1.0)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        self.last = StepStats(
            step=step,
            loss=loss_sum / n_units if n_units else float("nan"),
            label_tokens=int(n_label),
            tokens=int(tokens),
            padded_tokens=int(padded),
            lr=float(optimizer.param_groups[0]["lr"]),
            units=int(n_units),
            metrics={
                name: value / n_units if n_units else float("nan")
                for name, value in zip(self.metric_names, values[len(COUNTS) :], strict=True)
            },
        )
        self._completed_at = self._micro_batches
        return self.last

    def check(self, grad_norm: float, check_norm: bool = True) -> bool:
        """Record the gradient norm of the step and decide whether its update is skipped (a non-finite
        loss, or norm when ``check_norm``); raises NonFiniteError after too many such steps in a row."""
        stats = self.last
        if stats is None:
            return False
        stats.grad_norm = grad_norm
        loss = (
            stats.loss if stats.units else 0.0
        )  # a step without units (label tokens, pairs) has no loss to check
        stats.skipped = self.nonfinite.check(stats.step, loss, grad_norm if check_norm else None)
        stats.nonfinite_steps = self.nonfinite.total
        return stats.skipped

    def complete(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        step: int,
        accumulate: int,
        world_size: int,
        device: torch.device,
        root: torch.nn.Module | None,
        max_norm: float | None,
        check_norm: bool = True,
    ) -> StepStats:
        """The step's end before the update: rescale the gradients to the unit mean, take (and clip to
        ``max_norm``) the global gradient norm over ``root``'s shards, and skip the update (gradients to
        None) when the loss or, with ``check_norm``, the norm is not finite. Raises NonFiniteError after
        ``max_nonfinite_steps`` such steps in a row; the same decision on every rank."""
        stats = self.rescale(
            optimizer, step=step, accumulate=accumulate, world_size=world_size, device=device
        )
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = float(total_grad_norm_and_clip(root, params, max_norm))
        if self.check(norm, check_norm=check_norm):
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
        return stats

    def just_completed(self) -> StepStats | None:
        """The statistics of the optimizer step that the current micro-batch completed; None inside an
        accumulation window (and at its other micro-batches)."""
        return self.last if self.last is not None and self._completed_at == self._micro_batches else None


def micro_batch_counts(
    loss_sum: torch.Tensor,
    units: torch.Tensor,
    tokens: torch.Tensor,
    padded: int,
    label_tokens: torch.Tensor,
    metrics: list[torch.Tensor],
) -> torch.Tensor:
    """One micro-batch's ``COUNTS`` and metric sums as the float64 vector :meth:`OptimizerStep.add` takes."""
    parts = [loss_sum.detach(), units, tokens, padded, label_tokens, *metrics]
    return torch.stack([torch.as_tensor(x, device=loss_sum.device).to(torch.float64) for x in parts])
