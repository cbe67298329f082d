"""One optimizer step's accounting, owned by one object (:class:`OptimizerStep`).

The loss of an optimizer step is the mean over *all* label tokens of the step, across its
micro-batches and all ranks, so ``micro 4 x accumulation 1``, ``micro 1 x accumulation 4`` and
``2 ranks x micro 2`` give the same loss and the same gradients. Each micro-batch's backward runs on
the SUM of its token losses; Lightning divides it by ``accumulate_grad_batches`` (A) and DDP/FSDP
average the gradients over the W data-parallel ranks. Before the optimizer steps,
:meth:`OptimizerStep.rescale` all-reduces the step's counts (one collective) and multiplies the
gradients by ``A * W / N`` (N label tokens): the gradient of the token-mean loss. A shorter
accumulation window at the end of an epoch is handled too (N counts what was seen, A is what
Lightning divided by).

Then :meth:`OptimizerStep.check` takes the global gradient norm and decides whether the update is
skipped: the loss and the norm are the same on every rank, so every rank decides alike without
another collective (see ``NonFiniteGuard``). :meth:`OptimizerStep.just_completed` is the one step
boundary: the step's statistics at the micro-batch that completed it, None inside an accumulation
window. The module, the metrics, the stop-on-signal and the heartbeat callbacks all act on it; the
module creates the object and the callbacks receive it explicitly.
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
        loss: token-mean training loss.
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
    """The accounting of one optimizer step: label-token counts, the gradient rescale, the gradient
    norm, the skip decision and the boundary.

    Args:
        max_nonfinite_steps: non-finite steps in a row that stop training (``NonFiniteGuard``).
    """

    def __init__(self, max_nonfinite_steps: int) -> None:
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        #: The statistics of the last completed optimizer step (None before the first).
        self.last: StepStats | None = None
        # loss sum, label tokens, real tokens, padded positions of the current step (this rank)
        self._counts = torch.zeros(4, dtype=torch.float64)
        self._micro_batches = 0
        self._completed_at = -1

    def add(self, counts: torch.Tensor) -> None:
        """Count one micro-batch: ``[loss sum, label tokens, real tokens, padded positions]`` (float64)."""
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
        loss_sum, n_label, tokens, padded = (float(x) for x in totals.cpu())
        self._counts = torch.zeros_like(self._counts)
        scale = accumulate * world_size / max(n_label, 1.0)
        with torch.no_grad():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        self.last = StepStats(
            step=step,
            loss=loss_sum / n_label if n_label else float("nan"),
            label_tokens=int(n_label),
            tokens=int(tokens),
            padded_tokens=int(padded),
            lr=float(optimizer.param_groups[0]["lr"]),
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
        loss = stats.loss if stats.label_tokens else 0.0  # a step without label tokens has no loss to check
        stats.skipped = self.nonfinite.check(stats.step, loss, grad_norm if check_norm else None)
        stats.nonfinite_steps = self.nonfinite.total
        return stats.skipped

    def just_completed(self) -> StepStats | None:
        """The statistics of the optimizer step that the current micro-batch completed; None inside an
        accumulation window (and at its other micro-batches)."""
        return self.last if self.last is not None and self._completed_at == self._micro_batches else None
