"""The objective interface: what differs between training objectives, and nothing else.

An objective (``sft``, ``dpo``, ...) owns

* the records it accepts and how they become tensors: :meth:`Objective.dataset` (a prepared split,
  tokenized once) and :meth:`Objective.collator` (a list of samples -> one micro-batch);
* its loss, as a :class:`LossParts`: a differentiable SUM over the micro-batch's units, the number of
  units (label tokens for SFT, preference pairs for DPO) and per-unit metric sums. The generic step
  (``ftpipe.train.step.OptimizerStep``) adds units and sums over accumulation and ranks and divides once,
  so every objective is normalised exactly the same way whatever the batch layout;
* whether it needs reference log-probabilities and where they come from (:attr:`Objective.reference`);
* its cost: sequences per sample and model passes per token (memory estimate, FLOPs and MFU).

The model calls an objective may make are those of :class:`PolicyModel`, which the generic Lightning
module implements (chunked over labelled positions, FSDP/DDP-safe): the token-loss sum of SFT, the
per-sequence log-probabilities of the policy, and those of the reference. An objective never touches
the model, the optimizer, the strategy or checkpoints, so a new one (GRPO, KTO, a reward model) is a
module here and a line in :data:`ftpipe.objectives.OBJECTIVES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from ftpipe.config.schema import PipelineConfig

if TYPE_CHECKING:
    from torch.utils.data import Dataset

Batch = Mapping[str, torch.Tensor]


@dataclass
class LossParts:
    """One micro-batch's loss for the generic step.

    Attributes:
        loss_sum: the differentiable sum of the per-unit losses (the step divides by all units).
        units: 0-d count of the units the sum runs over (label tokens, pairs); all-reduced by the step.
        metrics: per-unit sums of logged quantities (detached 0-d tensors), in ``Objective.metric_names``
            order; the step reports each as its sum over the step divided by its units.
    """

    loss_sum: torch.Tensor
    units: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class PolicyModel(Protocol):
    """The forwards an objective can ask of the model being trained (``ftpipe.train.module``)."""

    def token_loss_sum(self, batch: Batch) -> torch.Tensor:
        """Sum of next-token cross-entropies over the labelled positions of ``batch`` (differentiable)."""

    def sequence_logps(self, batch: Batch) -> torch.Tensor:
        """Per row of ``batch``: the sum of the log-probabilities of its labelled tokens (fp32,
        differentiable), computed without materialising full-vocabulary logits."""

    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """:meth:`sequence_logps` of the reference model (no gradient): the cached values of the batch, the
        policy with its adapter disabled, or a frozen copy."""


def label_counts(labels: torch.Tensor) -> torch.Tensor:
    """Per row: the positions whose next-token label counts (``labels[:, 1:] != -100``)."""
    return (labels[:, 1:] != -100).sum(dim=1)


class Objective(ABC):
    """What one training objective decides (see the module doc). Subclasses set the class attributes.

    Attributes:
        name: the ``objective`` config value.
        unit: what the loss is a mean over (``label token``, ``pair``), for logs and docs.
        sequences_per_sample: sequences one sample puts through the model (2 for a pair).
        metric_names: the metrics :meth:`loss` returns, in a fixed order (the same on every rank).
        reference: ``adapter``, ``copy``, ``cached`` or None (no reference model).
    """

    name: ClassVar[str]
    unit: ClassVar[str]
    sequences_per_sample: ClassVar[int] = 1
    metric_names: tuple[str, ...] = ()
    reference: str | None = None

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def dataset(self, source: Any, tokenizer: Any, **kwargs: Any) -> Dataset:
        """A prepared split tokenized for this objective (keyword arguments as ``SFTDataset``'s)."""

    @abstractmethod
    def collator(self, pad_token_id: int, *, flatten: bool = False) -> Callable[[Sequence[Any]], dict]:
        """The collate function of micro-batches (``flatten``: packed rows into one row)."""

    @abstractmethod
    def loss(self, model: PolicyModel, batch: Batch) -> LossParts:
        """The micro-batch's loss parts."""

    @property
    def supports_packing(self) -> bool:
        return False

    @property
    def reference_passes(self) -> int:
        """Forward passes of a reference model per training sequence (0 when cached or not needed)."""
        return 1 if self.reference in ("adapter", "copy") else 0

    def describe(self) -> str:
        """One line for the log."""
        return f"objective {self.name} (loss per {self.unit})"
