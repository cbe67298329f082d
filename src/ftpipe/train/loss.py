"""The training loss without full-vocabulary logits of the whole batch, and a check of the model's numerics.

A causal LM's output layer turns every position into ``vocab_size`` logits. With SmolLM2's 49,152
tokens, a micro-batch of 2 x 256 positions holds 100 MB of fp32 logits, as much again for their
gradient and more for the softmax: the largest activations of the step, mostly spent on prompt
positions whose label is -100. ``ChunkedLossHead`` computes the loss inside the model's forward
instead: it replaces the ``forward`` of the model's output-embedding module (``lm_head``; a LoRA
wrapper of it as well), keeps only the hidden states of positions that have a label, and runs the
output layer and a sum-reduced cross-entropy over ``loss_chunk_size`` of them at a time, each chunk
under non-reentrant activation checkpointing, so a chunk's logits are freed at once and recomputed
in the backward pass. Only one chunk's logits ever exist.

Why inside the forward: under FSDP the output layer's weight (tied to the input embedding in many
models) belongs to the root's parameter group, which is gathered only while the root module runs;
and the loss must be part of the root's output so that FSDP's backward hooks fire. The loss is
therefore returned in place of the logits, as a ``(1, 1, 1)`` tensor; ``SFTModule`` reads it from
``output.logits``. Without targets set the module behaves as before (generation, export).

A model that post-processes its logits after the output layer (soft-capping, scaling) would get a
different loss this way; ``check_model_numerics`` compares, on a short random sequence at the first
forward, the chunked loss with the cross-entropy of the model's own logits, and falls back to the
full-logit loss (with a warning) when they differ. With ``packing`` it also checks that packed
sequences do not see each other: a sequence's logits with another one packed in front of it (position
ids restarting, no attention mask) must equal its logits alone, or training stops with an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftpipe.data.pairs import PairCollator, pair_block_mask
from ftpipe.data.tokenize import IGNORE_INDEX
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


class PackingIsolationError(FtpipeError):
    """Packed sequences attend to each other with this model and attention implementation."""


class SharedPromptError(FtpipeError):
    """A pair's answers, batched after one shared prompt, do not score as they do in rows of their own."""


def pair_attention_mask(model: torch.nn.Module, segments: torch.Tensor) -> torch.Tensor:
    """The block mask of shared-prompt pair rows in the form ``model``'s attention takes: boolean for
    ``sdpa``, additive fp32 for ``eager`` (a 4-D mask reaches the attention as it is)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return pair_block_mask(segments)
    if impl == "eager":
        return pair_block_mask(segments, torch.float32)
    raise SharedPromptError(
        f"pairs batched with one shared prompt need a custom attention mask, which attention {impl!r} does "
        "not take: set share_prompt: false (or attn_implementation: sdpa)"
    )


def shifted_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32) over the positions whose label is not -100."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_loss_sum(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """``shifted_token_loss_sum(head(hidden), labels)`` computed ``chunk_size`` labelled positions at a time.

    Only positions whose next-token label is not -100 go through ``head``; with gradients enabled each
    chunk runs under activation checkpointing, so its logits do not outlive it.
    """
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    states = hidden[:, :-1][keep]
    targets = targets[keep]
    total = states.sum().float() * 0.0  # keeps the graph connected when no position has a label
    for start in range(0, targets.numel(), chunk_size):
        h, y = states[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            part = _chunk_loss(head, h, y)
        total = total + part
    return total


def _chunk_loss(
    head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="sum")


def _chunk_token_logps(
    head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return -F.cross_entropy(head(h).float(), y, reduction="none")


def _label_rows(rows: int, labels: torch.Tensor) -> int:
    """How many label rows each input row has (labels may cover a row several times: shared prompts)."""
    if rows == 0 or labels.shape[0] % rows:
        raise ValueError(f"{labels.shape[0]} label rows for {rows} input rows: must be a multiple")
    return labels.shape[0] // rows


def sequence_logps_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per label row: the sum of the next-token log-probabilities (fp32) of the positions whose label is
    not -100. ``labels`` may have k times the rows of ``logits``: label row ``j`` scores logits row
    ``j % rows`` (several answers over one shared-prompt row)."""
    k = _label_rows(logits.shape[0], labels)
    log_probs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    if k > 1:
        log_probs = log_probs.repeat(k, 1, 1)
    shift_labels = labels[:, 1:].to(log_probs.device)
    keep = shift_labels != IGNORE_INDEX
    token_logps = log_probs.gather(-1, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * keep).sum(dim=1)


def chunked_sequence_logps(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """``sequence_logps_from_logits(head(hidden), labels)`` computed ``chunk_size`` labelled positions at
    a time (as :func:`chunked_token_loss_sum`): one fp32 value per label row."""
    k = _label_rows(hidden.shape[0], labels)
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    states = hidden[:, :-1][keep] if k == 1 else hidden[rows % hidden.shape[0], cols]
    targets = targets[keep]
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    total = total + states.sum().float() * 0.0  # keeps the graph connected when no position has a label
    for start in range(0, targets.numel(), chunk_size):
        h, y = states[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_token_logps, head, h, y, use_reentrant=False)
        else:
            part = _chunk_token_logps(head, h, y)
        total = total.index_add(0, rows[start : start + chunk_size], part)
    return total


class ChunkedLossHead:
    """The output-embedding module of ``model`` made to return the chunked loss while targets are set.

    Args:
        model: a transformers causal LM (or a PEFT model of one) with ``get_output_embeddings()``.
        chunk_size: labelled positions per chunk.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int) -> None:
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings())")
        self.module = head
        self.chunk_size = chunk_size
        self._forward = head.forward  # the module's own (bound) forward
        self._labels: torch.Tensor | None = None
        self._per_sequence = False
        head.forward = self._patched_forward

    def remove(self) -> None:
        """Give the module its own forward back."""
        if self.module.__dict__.get("forward") == self._patched_forward:
            del self.module.forward

    @contextmanager
    def targets(
        self, labels: torch.Tensor, chunk_size: int | None = None, *, per_sequence: bool = False
    ) -> Iterator[None]:
        """Within this block the next call of the module returns the loss sum for ``labels`` as a
        ``(1, 1, 1)`` tensor, or with ``per_sequence`` each row's summed label log-probability as a
        ``(rows, 1, 1)`` tensor."""
        saved = self.chunk_size
        self._labels = labels
        self._per_sequence = per_sequence
        self.chunk_size = chunk_size or saved
        try:
            yield
        finally:
            self._labels = None
            self._per_sequence = False
            self.chunk_size = saved

    def _patched_forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        labels, self._labels = self._labels, None  # used once per forward
        if labels is None:
            return self._forward(hidden, *args, **kwargs)
        rows_ok = labels.shape[0] == hidden.shape[0] or (
            self._per_sequence and labels.shape[0] % hidden.shape[0] == 0
        )
        if not rows_ok or hidden.shape[1] != labels.shape[1]:
            raise ValueError(
                f"the output layer got hidden states of shape {tuple(hidden.shape)} for labels of shape "
                f"{tuple(labels.shape)}: the model sliced its positions (logits_to_keep?); set loss_chunk_size: 0"
            )
        if self._per_sequence:
            logps = chunked_sequence_logps(self._forward, hidden, labels, self.chunk_size)
            return logps.reshape(-1, 1, 1)
        loss = chunked_token_loss_sum(self._forward, hidden, labels, self.chunk_size)
        return loss.reshape(1, 1, 1)


@dataclass(frozen=True)
class NumericsReport:
    """What ``check_model_numerics`` found (relative differences; None: not checked)."""

    chunked_loss_ok: bool | None
    loss_rel_diff: float | None
    packing_rel_diff: float | None
    packing_cross_rel_diff: float | None
    shared_prompt_rel_diff: float | None = None


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


@torch.no_grad()
def check_model_numerics(
    model: torch.nn.Module,
    head: ChunkedLossHead | None,
    *,
    packing: bool,
    device: torch.device,
    length: int = 24,
    per_sequence: bool = False,
    shared_prompt: bool = False,
) -> NumericsReport:
    """Check the chunked loss against the model's own logits, and (``packing``) packed-sequence isolation.

    With ``per_sequence`` the per-row log-probabilities (preference objectives) are checked as well;
    with ``shared_prompt`` a pair batched as one shared-prompt row must score both answers as their own
    rows do, or SharedPromptError says to turn ``share_prompt`` off.
    Runs a few forwards of a ``length``-token random sequence in eval mode (no dropout); every rank
    runs the same ones, so under FSDP the collectives match. Raises PackingIsolationError when a
    packed sequence's logits depend on the sequence before it. Returns what was measured; the caller
    turns the chunked loss off when ``chunked_loss_ok`` is False.
    """
    was_training = model.training
    model.eval()
    try:
        vocab = int(model.config.vocab_size)
        generator = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, vocab, (1, length), generator=generator).to(device)
        labels = ids.clone()
        labels[:, : length // 3] = IGNORE_INDEX
        full = model(input_ids=ids, use_cache=False).logits
        tol = _tolerance(full.dtype)
        ok, loss_diff = None, None
        if head is not None:
            reference = shifted_token_loss_sum(full, labels)
            with head.targets(labels, chunk_size=5):  # several chunks, a short last one
                chunked = model(input_ids=ids, use_cache=False).logits.reshape(()).float()
            loss_diff = float((chunked - reference).abs() / reference.abs().clamp_min(1e-6))
            if per_sequence:  # the per-row log-probabilities of preference objectives, two rows
                rows_ids, rows_labels = ids.repeat(2, 1), labels.repeat(2, 1)
                rows_labels[1, : 2 * length // 3] = IGNORE_INDEX
                full_rows = sequence_logps_from_logits(
                    model(input_ids=rows_ids, use_cache=False).logits, rows_labels
                )
                with head.targets(rows_labels, chunk_size=5, per_sequence=True):
                    chunked_rows = model(input_ids=rows_ids, use_cache=False).logits.reshape(-1).float()
                row_diff = float(((chunked_rows - full_rows).abs() / full_rows.abs().clamp_min(1e-6)).max())
                loss_diff = max(loss_diff, row_diff)
            ok = loss_diff <= tol
        pack_diff = cross_diff = None
        if packing:
            split = length // 3
            positions = torch.cat([torch.arange(split), torch.arange(length - split)]).to(device)[None]
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, split:].float()
            alone = model(input_ids=ids[:, split:], use_cache=False).logits.float()
            scale = alone.abs().mean().clamp_min(1e-6)
            pack_diff = float((packed - alone).abs().mean() / scale)
            cross_diff = float((full[:, split:].float() - alone).abs().mean() / scale)
            if not pack_diff <= tol:
                raise PackingIsolationError(
                    f"packing: sequences packed into one row see each other with {type(model).__name__} and "
                    f"attention {getattr(model.config, '_attn_implementation', '?')}: a sequence's logits "
                    f"differ by {pack_diff:.3g} (relative mean) from its logits alone (tolerance {tol:g}; "
                    f"{cross_diff:.3g} with a plain causal mask). Training would leak between samples. Set "
                    "packing: false (group_by_length: true also saves most padding), or use "
                    "attn_implementation sdpa/eager/flash_attention_2 with a transformers model that builds "
                    "its masks from position ids."
                )
        shared_diff = None
        if shared_prompt:
            shared_diff = _shared_prompt_diff(model, head, ids[0], length // 3)
            if not shared_diff <= tol:
                raise SharedPromptError(
                    f"share_prompt: a pair batched as one row (the prompt once, each answer after it) scores "
                    f"its answers differently from rows of their own with {type(model).__name__} and "
                    f"attention {getattr(model.config, '_attn_implementation', '?')} (relative difference "
                    f"{shared_diff:.3g}, tolerance {tol:g}): the model does not take a custom attention mask "
                    "as given. Set share_prompt: false."
                )
        return NumericsReport(ok, loss_diff, pack_diff, cross_diff, shared_diff)
    finally:
        model.train(was_training)


def _shared_prompt_diff(
    model: torch.nn.Module, head: ChunkedLossHead | None, ids: torch.Tensor, prompt: int
) -> float:
    """Largest relative difference between both answers' log-probabilities in rows of their own and in
    one shared-prompt row (``ids``: prompt, then two answers of equal length)."""
    answer = (len(ids) - prompt) // 2
    sides = []
    for start in (prompt, prompt + answer):
        side_ids = torch.cat([ids[:prompt], ids[start : start + answer]]).cpu()
        labels = side_ids.clone()
        labels[:prompt] = IGNORE_INDEX
        sides.append({"chosen_input_ids": side_ids, "chosen_labels": labels})
    pair = {
        "chosen_input_ids": sides[0]["chosen_input_ids"],
        "chosen_labels": sides[0]["chosen_labels"],
        "rejected_input_ids": sides[1]["chosen_input_ids"],
        "rejected_labels": sides[1]["chosen_labels"],
    }
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    rows = PairCollator(pad, share_prompt=False)([pair])
    shared = PairCollator(pad, share_prompt=True)([pair])
    rows = {k: v.to(ids.device) for k, v in rows.items()}
    shared = {k: v.to(ids.device) for k, v in shared.items()}
    alone = sequence_logps_from_logits(
        model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False).logits,
        rows["labels"],
    )
    inputs = {
        "input_ids": shared["input_ids"],
        "position_ids": shared["position_ids"],
        "attention_mask": pair_attention_mask(model, shared["pair_segments"]),
        "use_cache": False,
    }
    if head is not None:
        with head.targets(shared["labels"], chunk_size=5, per_sequence=True):
            together = model(**inputs).logits.reshape(-1).float()
    else:
        together = sequence_logps_from_logits(model(**inputs).logits, shared["labels"])
    return float(((together - alone).abs() / alone.abs().clamp_min(1e-6)).max())
