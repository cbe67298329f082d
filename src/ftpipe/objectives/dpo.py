"""Preference tuning, the DPO family: the policy learns to rank the chosen answer of a pair above the rejected.

Records are pairs (``ftpipe.data.preference`` normalises the layouts, ``ftpipe.data.pairs`` encodes
them: the prompt once, each answer after it, both cut to the same length when they must be). A
micro-batch of B pairs is ONE forward of 2B rows, chosen rows first (``PairCollator``); the model
returns each row's summed answer log-probability ``log pi(y|x)`` through the chunked loss head.

Losses (``dpo_loss``), with ``h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]``:

* ``sigmoid`` (DPO): ``-log sigmoid(beta h)``; with ``dpo_label_smoothing`` e the conservative
  ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``.
* ``ipo``: ``(h - 1 / (2 beta))^2`` on length-averaged log-probabilities (as TRL computes it).
* ``simpo`` (no reference): ``h = avg log pi(y_w|x) - avg log pi(y_l|x) - gamma / beta`` on
  length-averaged log-probabilities, then the sigmoid loss.

``rpo_alpha`` adds ``alpha`` times the chosen answer's mean token NLL to each pair's loss. The loss of
a step is the mean over ALL its pairs, across accumulation and ranks (the generic step divides the
summed pair losses by the pairs it counted), so ``micro 4``, ``micro 1 x accumulation 4`` and
``2 ranks x micro 2`` give the same loss and gradients. Pairs that only pad a rank's share of the
validation split (``pair_mask`` 0) count nowhere.

Metrics, per pair (TRL's names): ``rewards/chosen`` and ``rewards/rejected`` (``beta`` times each
side's log-ratio to the reference; SimPO: ``beta`` times the average log-probability),
``rewards/margins``, ``rewards/accuracies`` (chosen reward above rejected), ``logps/chosen``,
``logps/rejected`` and ``nll/chosen``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ftpipe.config.errors import ConfigError
from ftpipe.config.schema import PipelineConfig
from ftpipe.data.pairs import PairCollator, PairDataset
from ftpipe.objectives.base import Batch, LossParts, Objective, PolicyModel, label_counts
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll/chosen",
)


def resolve_reference(cfg: PipelineConfig) -> str | None:
    """Where the reference log-probabilities come from (see ``reference`` in the configuration)."""
    ob = cfg.objective
    if ob.dpo_loss == "simpo":
        return None
    if ob.reference != "auto":
        return ob.reference
    if cfg.model.finetuning == "lora":
        return "cached" if ob.init_adapter else "adapter"
    # full fine-tuning: FSDP1 wraps every submodule of the training module, a copy would train with it
    return "cached" if cfg.dist.strategy == "fsdp1" else "copy"


def resolve_share_prompt(cfg: PipelineConfig) -> bool | str:
    """``share_prompt`` as the collator takes it (True, ``"auto"`` or False; see the configuration):
    off where the attention takes no custom mask or a sliding window is shorter than the rows."""
    setting = cfg.objective.share_prompt
    if setting is False:
        return False
    from ftpipe.runtime import accelerator_name, select_attn_implementation

    longest = cfg.data.max_seq_length * (2 if setting is True else 1)
    attn = select_attn_implementation(cfg, accelerator_name(cfg))
    problem = None
    if attn not in ("sdpa", "eager"):
        problem = f"attention {attn} takes no custom attention mask"
    else:
        window = _sliding_window(cfg)
        if window is not None and window < longest:
            problem = f"the model's sliding window ({window} tokens) is shorter than a shared row ({longest})"
    if problem is None:
        return setting
    if setting is True:
        raise ConfigError(
            [f"objective.share_prompt: true cannot be used: {problem}; set it to auto or false"]
        )
    log.info("share_prompt auto: off, pairs batched as two rows (%s)", problem)
    return False


def _sliding_window(cfg: PipelineConfig) -> int | None:
    """The model's attention window when it uses one (None: full attention, or the config is unreadable)."""
    from ftpipe.model.load import load_model_config

    try:
        config = load_model_config(cfg)
    except Exception:  # the model load reports an unreadable config itself
        return None
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def preference_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards (detached), from summed log-probabilities.

    ``chosen``/``rejected``: per-pair sums of the answer's token log-probabilities under the policy;
    ``ref_*`` the same under the reference (None for SimPO); ``*_tokens`` the answers' token counts.
    """
    if loss_type == "simpo":
        avg_chosen = chosen / chosen_tokens.clamp_min(1)
        avg_rejected = rejected / rejected_tokens.clamp_min(1)
        logits = avg_chosen - avg_rejected - gamma / beta
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
        return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"dpo_loss {loss_type!r} needs reference log-probabilities")
    chosen_ratio = chosen - ref_chosen
    rejected_ratio = rejected - ref_rejected
    if loss_type == "sigmoid":
        logits = chosen_ratio - rejected_ratio
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "ipo":
        logits = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss {loss_type!r}: allowed sigmoid, ipo, simpo")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPOObjective(Objective):
    """DPO, IPO and SimPO on preference pairs (one concatenated forward per micro-batch)."""

    name = "dpo"
    unit = "pair"
    sequences_per_sample = 2
    metric_names = METRICS

    def __init__(self, cfg: PipelineConfig) -> None:
        super().__init__(cfg)
        self.reference = resolve_reference(cfg)

    @functools.cached_property
    def share_prompt(self) -> bool | str:
        """Whether pairs are batched as one shared-prompt row (``resolve_share_prompt``)."""
        return resolve_share_prompt(self.cfg)

    def dataset(self, source: Any, tokenizer: Any, **kwargs: Any) -> PairDataset:
        return PairDataset(source, tokenizer, self.cfg.data, **kwargs)

    def collator(self, pad_token_id: int, *, flatten: bool = False) -> Callable[[Sequence[Any]], dict]:
        return PairCollator(
            pad_token_id,
            pad_to_multiple_of=self.cfg.data.pad_to_multiple_of,
            share_prompt=self.share_prompt,
            max_len=self.cfg.data.max_seq_length,
        )

    def loss(self, model: PolicyModel, batch: Batch) -> LossParts:
        ob = self.cfg.objective
        pairs = batch["labels"].shape[0] // 2  # label rows: chosen then rejected (one or two input rows)
        tokens = label_counts(batch["labels"]).to(torch.float32)
        mask = batch.get("pair_mask")
        mask = torch.ones(pairs) if mask is None else mask
        ref = None
        if self.reference is not None:
            ref = batch["ref_logps"] if "ref_logps" in batch else model.reference_logps(batch)
            ref = ref.detach().float()
        logps = model.sequence_logps(batch).float()
        mask = mask.to(logps.device, torch.float32)
        tokens = tokens.to(logps.device)
        losses, rewards_chosen, rewards_rejected = preference_losses(
            logps[:pairs],
            logps[pairs:],
            None if ref is None else ref[:pairs],
            None if ref is None else ref[pairs:],
            tokens[:pairs],
            tokens[pairs:],
            loss_type=ob.dpo_loss,
            beta=ob.dpo_beta,
            label_smoothing=ob.dpo_label_smoothing,
            gamma=ob.simpo_gamma,
        )
        nll = -logps[:pairs] / tokens[:pairs].clamp_min(1)
        if ob.rpo_alpha:
            losses = losses + ob.rpo_alpha * nll
        detached = logps.detach()
        per_pair = {
            "rewards/chosen": rewards_chosen,
            "rewards/rejected": rewards_rejected,
            "rewards/margins": rewards_chosen - rewards_rejected,
            "rewards/accuracies": (rewards_chosen > rewards_rejected).float(),
            "logps/chosen": detached[:pairs],
            "logps/rejected": detached[pairs:],
            "nll/chosen": nll.detach(),
        }
        metrics = {name: (per_pair[name] * mask).sum() for name in METRICS}
        return LossParts((losses * mask).sum(), mask.sum(), metrics)

    def describe(self) -> str:
        ob = self.cfg.objective
        ref = {None: "none (reference-free)", "adapter": "the policy with its adapter disabled"}.get(
            self.reference, f"{self.reference}"
        )
        extra = f", rpo_alpha {ob.rpo_alpha:g}" if ob.rpo_alpha else ""
        shared = {True: "always", "auto": "where the row fits max_seq_length", False: "no"}[self.share_prompt]
        return (
            f"objective dpo (dpo_loss {ob.dpo_loss}, beta {ob.dpo_beta:g}{extra}; reference: {ref}; "
            f"prompt batched once per pair: {shared}; loss per pair)"
        )
