"""Preference pairs (``objective: dpo``): a prompt with a chosen and a rejected answer, tokenized once
and batched for one forward over both answers.

Prepared pair records come in two forms (extra keys such as ``source`` are bookkeeping):

* chat: ``{"id", "prompt": [messages], "chosen": [assistant message(s)], "rejected": [...], "tools"?}``,
  the messages in the internal form of :mod:`ftpipe.data.chat`; prompt + chosen and prompt + rejected
  are each a conversation ending in an assistant turn;
* text: ``{"id", "prompt": str, "chosen": str, "rejected": str, "system"?: str}``.

Choices:

* **One encoding with SFT.** Each side is encoded exactly as :mod:`ftpipe.data.tokenize` encodes the
  SFT sample of the prompt followed by that answer: chat sides through the same template pieces (tools,
  reasoning policy, the EOS and turn-end rules, BOS at most once), so an answer's tokens are those that
  generation after the prompt's generation prompt produces; text sides as alpaca rows (the prompt
  through the chat template only with ``use_chat_template``, as one user turn after the record's
  ``system``, else ``system_prompt``; otherwise the plain prompt, where ``system`` has no place and is
  not used; the answer is its text and EOS). Untruncated, the chosen side has the ids of the SFT sample
  of prompt + chosen. (With a template that rewrites history, an answer of several assistant turns is
  trained on its last turn, its earlier turns rendered as history, as SFT trains that turn.)
* **Only the answer is trained.** Labels are -100 on every prompt position (its assistant turns are
  context) and on position 0; in an answer of several turns (a tool call, its result, the reply) the
  assistant turns are labelled as SFT labels them, the tool results are not.
* **One prompt.** DPO compares two answers to the same prompt, so the prompt ids must be identical on
  both sides; a chat template that renders the prompt differently depending on what follows it is a
  DataError naming the row.
* **Truncation keeps the answers comparable.** When prompt + longer answer exceeds ``max_len``, the
  prompt is cut from the LEFT first (a BOS the tokenizer adds itself stays), keeping at least
  ``min(len(prompt), max(1 + head, int(max_len * MIN_PROMPT_FRACTION)))`` tokens; then both answers are
  cut from the right to the same budget, ``max_len`` minus the kept prompt (a cut answer loses its EOS).
* **Drops** (``PairEncoding.drop``): ``empty_answer`` (a side has no label left), ``too_long`` (the
  kept answers are identical: what told them apart was cut away), ``identical`` (the answers are the
  same uncut: nothing to prefer). Dropped pairs are counted per reason and never batched.
* **Batches** (:class:`PairCollator`): the B chosen sides, then the B rejected sides, as 2B rows of one
  right-padded batch, so the policy (and a reference) run a single forward over both answers.
* **The prompt once** (``share_prompt``): a pair can instead be ONE row, the prompt followed by both
  answers, each answer block restarting its positions where the prompt ends and attending to the
  prompt and itself only (a block mask built from ``pair_segments``). Each block starts with the
  prompt's last token again, so every answer token is predicted from exactly the states it would see
  in its own row: the same log-probabilities (up to float rounding) for ``P - 1`` fewer positions per
  pair, ``P`` the prompt's length. Labels stay 2B rows (chosen, then rejected) over the B rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ftpipe.config.schema import DataConfig
from ftpipe.data.chat import uses_tools
from ftpipe.data.collate import SFTCollator
from ftpipe.data.dataset import (
    _load_rows,
    _rows_use_tools,
    _tokenized_cache,
    _warn_if_turns_lack_eos,
    code_digest,
    encode_split,
)
from ftpipe.data.errors import DataError
from ftpipe.data.jsonscan import RAW_COLUMN
from ftpipe.data.render import (
    ChatTemplateError,
    chat_pieces,
    check_tool_template,
    render,
    require_chat_template,
    template_name,
)
from ftpipe.data.tokenize import (
    IGNORE_INDEX,
    MIN_PROMPT_FRACTION,
    _pieces_to_parts,
    _render_args,
    _require_text,
    _row_name,
    _text_answer_ids,
    _text_prompt_ids,
    adds_bos,
    eos_id,
    is_chat_pair,
    text_ids,
)
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = get_logger(__name__)

SIDES = ("chosen", "rejected")
#: Why a pair is dropped (see the module notes).
DROP_REASONS = ("empty_answer", "too_long", "identical")
#: The columns of a pair item.
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
_PAIR_KEYS = ("prompt", "chosen", "rejected")

#: (answer ids, answer labels) of one side, before fitting.
Answer = tuple[list[int], list[int]]


@dataclass(frozen=True)
class PairEncoding:
    """One tokenized pair: each side is the shared prompt and its answer, labelled on the answer only.

    ``prompt_length``: prompt tokens kept (the first ``prompt_length`` ids of both sides, identical);
    ``full_length``: prompt + longer answer before truncation; ``drop``: why the pair cannot be used
    (one of :data:`DROP_REASONS`) or None; a dropped pair keeps its cut ids for inspection.
    """

    chosen_input_ids: list[int]
    chosen_labels: list[int]
    rejected_input_ids: list[int]
    rejected_labels: list[int]
    prompt_length: int = 0
    prompt_truncated: bool = False
    answers_cut: bool = False
    full_length: int = 0
    drop: str | None = None


@dataclass(frozen=True)
class PairStats:
    """What tokenizing one split of pairs did (logged once when the dataset is built).

    ``truncated_prompts``, ``cut_answers``, ``tokens`` and ``label_tokens`` count the kept pairs,
    tokens and labels over both sides.
    """

    rows: int = 0
    kept: int = 0
    dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    truncated_prompts: int = 0
    cut_answers: int = 0
    tokens: int = 0
    label_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# records


def is_pair(row: Mapping[str, Any]) -> bool:
    """True for a preference pair record (``prompt``, ``chosen`` and ``rejected``)."""
    return all(key in row for key in _PAIR_KEYS)


def pair_uses_tools(record: Mapping[str, Any]) -> bool:
    """True when a chat pair has tool schemas, tool calls or tool results (prompt or answers)."""
    if not isinstance(record.get("prompt"), list):
        return False
    messages = [
        m
        for key in _PAIR_KEYS
        if isinstance(record.get(key), list)
        for m in record[key]
        if isinstance(m, Mapping)
    ]
    return uses_tools({"tools": record.get("tools"), "messages": messages})


def _not_a_pair(record: Mapping[str, Any]) -> DataError:
    keys = sorted(k for k in record if isinstance(k, str))
    return DataError(
        f"{_row_name(record)}: not a preference pair (keys {keys}); objective dpo needs records with "
        "prompt, chosen and rejected: messages (chat) or text, as the prepare stage writes them for "
        "objective: dpo. Prepare the data again with objective: dpo, or train it with objective: sft"
    )


# --------------------------------------------------------------------------------------------------
# encoding


def _boundary(
    pieces: list[tuple[str, bool]], offset: int, name: str, tokenizer: PreTrainedTokenizerBase
) -> int:
    """The index of the first piece that starts at character ``offset`` of the pieces' joined text."""
    position = 0
    for k, (text, _) in enumerate(pieces):
        if position == offset:
            return k
        position += len(text)
    if position == offset:
        return len(pieces)
    raise ChatTemplateError(
        f"{name}: {template_name(tokenizer)} renders the prompt, with its generation prompt, so that it is "
        "not the start of the conversation with the answer; give chat_template a template whose generation "
        "prompt is how its assistant turns begin"
    )


def _pieces_ids(tokenizer: PreTrainedTokenizerBase, pieces: Sequence[tuple[str, bool]]) -> list[int]:
    return [token for text, _ in pieces for token in text_ids(tokenizer, text)]


def _chat_side(
    tokenizer: PreTrainedTokenizerBase, record: Mapping[str, Any], side: str, data_cfg: DataConfig, eos: int
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer ids, answer labels) of the conversation prompt + ``side``, as SFT renders it."""
    answer = record.get(side)
    if not isinstance(answer, list) or not answer or not all(isinstance(m, Mapping) for m in answer):
        raise DataError(
            f"{_row_name(record)}: {side!r} must be a non-empty list of messages (the answer's assistant "
            f"turns), got {answer!r}"
        )
    roles = [m.get("role") for m in answer]
    if roles[0] != "assistant" or roles[-1] != "assistant":
        raise DataError(
            f"{_row_name(record)}: the {side} answer must begin and end with an assistant turn (its roles: "
            f"{roles}); the prompt holds everything before the answer"
        )
    # the row as SFT sees it; its id names the side, so every message below names the conversation
    label = f"{record['id']} (prompt + {side})" if record.get("id") is not None else None
    row = {"id": label, "messages": [*record["prompt"], *answer], "tools": record.get("tools")}
    name = _row_name(row)
    messages, args = _render_args(tokenizer, row, data_cfg)
    n_prompt = len(messages) - len(answer)
    pieces = chat_pieces(tokenizer, messages, row_name=name, **args)
    try:
        prompt_text = render(tokenizer, messages[:n_prompt], generation=True, **args)
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{name}: {err}") from err.__cause__
    if not pieces.per_turn:
        flat = pieces.samples[0]
        k = _boundary(flat, len(prompt_text), name, tokenizer)
        prompt_pieces, answer_pieces = flat[:k], flat[k:]
    else:  # the template rewrites history: the last turn's sample, as SFT trains it
        sample = pieces.samples[-1]
        has_context = bool(sample) and not sample[0][1]
        context, turn = (sample[0][0], sample[1:]) if has_context else ("", sample)
        if not context.startswith(prompt_text):
            raise DataError(
                f"{name}: {template_name(tokenizer)} renders the prompt differently once the answer's turns "
                "follow it, so the answer would not be compared on the prompt the model sees; use a "
                "chat_template that renders earlier turns the same whatever follows them"
            )
        answer_pieces = [p for p in [(context[len(prompt_text) :], False), *turn] if p[0]]
        first = (
            pieces
            if len(answer) == 1
            else chat_pieces(tokenizer, messages[: n_prompt + 1], row_name=name, **args)
        )
        if first.per_turn:
            prompt_pieces = [(prompt_text, False)]
        else:
            prompt_pieces = first.samples[0][: _boundary(first.samples[0], len(prompt_text), name, tokenizer)]
    ctx_ids, ctx_labels, ans_ids, ans_labels = _pieces_to_parts(tokenizer, answer_pieces or [("", True)], eos)
    return _pieces_ids(tokenizer, prompt_pieces), ctx_ids + ans_ids, ctx_labels + ans_labels


def _chat_pair(
    tokenizer: PreTrainedTokenizerBase, record: Mapping[str, Any], data_cfg: DataConfig, eos: int
) -> tuple[list[int], dict[str, Answer]]:
    require_chat_template(tokenizer, "the data has chat pairs (prompt messages)")
    prompt = record["prompt"]
    if not prompt or not all(isinstance(m, Mapping) for m in prompt):
        raise DataError(
            f"{_row_name(record)}: 'prompt' must be a non-empty list of messages (objects with role and "
            f"content), got {prompt!r}"
        )
    sides = {side: _chat_side(tokenizer, record, side, data_cfg, eos) for side in SIDES}
    prompts = {side: ids for side, (ids, _, _) in sides.items()}
    if prompts["chosen"] != prompts["rejected"]:
        raise DataError(
            f"{_row_name(record)}: {template_name(tokenizer)} renders the prompt differently depending on "
            f"the answer ({len(prompts['chosen'])} tokens before the chosen answer, "
            f"{len(prompts['rejected'])} before the rejected one), so the answers would not be compared on "
            "one prompt; use a chat_template that renders earlier turns the same whatever follows them"
        )
    return prompts["chosen"], {side: (ids, labels) for side, (_, ids, labels) in sides.items()}


def _text_pair(
    tokenizer: PreTrainedTokenizerBase, record: Mapping[str, Any], data_cfg: DataConfig, eos: int
) -> tuple[list[int], dict[str, Answer]]:
    texts = {key: _require_text(record, key) for key in _PAIR_KEYS}
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{_row_name(record)}: field 'system' is not text ({system!r})")
    prompt_ids = _text_prompt_ids(tokenizer, texts["prompt"], data_cfg, system or None)
    answers = {}
    for side in SIDES:
        ids = _text_answer_ids(tokenizer, texts[side], eos)
        answers[side] = (ids, list(ids))
    return prompt_ids, answers


def fit_pair(
    prompt_ids: Sequence[int],
    chosen: tuple[Sequence[int], Sequence[int]],
    rejected: tuple[Sequence[int], Sequence[int]],
    max_len: int,
    keep_head: int = 0,
) -> PairEncoding:
    """Join the prompt with each ``(answer ids, answer labels)`` within ``max_len`` (see the module notes).

    ``keep_head`` leading prompt tokens (a BOS) survive left truncation.
    """
    n_prompt = len(prompt_ids)
    n_long = max(len(chosen[0]), len(rejected[0]))
    keep_head = min(keep_head, n_prompt)
    if n_prompt + n_long <= max_len:
        n_keep, budget = n_prompt, n_long
    else:
        min_prompt = min(n_prompt, max(keep_head + 1, int(max_len * MIN_PROMPT_FRACTION)))
        n_keep = min(max(min_prompt, max_len - n_long), max_len)
        budget = max_len - n_keep
    head = min(keep_head, n_keep)
    kept = [*prompt_ids[:head], *prompt_ids[n_prompt - (n_keep - head) :]]
    sides = []
    for ids, labels in (chosen, rejected):
        side_labels = [IGNORE_INDEX] * n_keep + list(labels[:budget])
        if side_labels:
            side_labels[0] = IGNORE_INDEX
        sides.append((kept + list(ids[:budget]), side_labels))
    cut = len(chosen[0]) > budget or len(rejected[0]) > budget
    drop = None
    if any(all(label == IGNORE_INDEX for label in labels) for _, labels in sides):
        drop = "empty_answer"
    elif sides[0] == sides[1]:
        drop = "too_long" if cut else "identical"
    return PairEncoding(
        chosen_input_ids=sides[0][0],
        chosen_labels=sides[0][1],
        rejected_input_ids=sides[1][0],
        rejected_labels=sides[1][1],
        prompt_length=n_keep,
        prompt_truncated=n_keep < n_prompt,
        answers_cut=cut,
        full_length=n_prompt + n_long,
        drop=drop,
    )


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    record: Mapping[str, Any],
    data_cfg: DataConfig,
    max_len: int | None = None,
) -> PairEncoding:
    """One pair record within ``max_len`` (default ``max_seq_length``) tokens per side.

    A record that is not a usable pair (wrong fields, messages out of order) is a DataError naming the
    row; a pair with nothing to prefer after truncation is returned with ``drop`` set.
    """
    max_len = data_cfg.max_seq_length if max_len is None else max_len
    if not is_pair(record):
        raise _not_a_pair(record)
    eos = eos_id(tokenizer)
    if is_chat_pair(record):
        prompt_ids, answers = _chat_pair(tokenizer, record, data_cfg, eos)
    elif isinstance(record["prompt"], str):
        prompt_ids, answers = _text_pair(tokenizer, record, data_cfg, eos)
    else:
        raise DataError(
            f"{_row_name(record)}: 'prompt' must be a list of messages (chat) or text, got "
            f"{type(record['prompt']).__name__}"
        )
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    head = 1 if prompt_ids and bos is not None and prompt_ids[0] == bos else 0
    return fit_pair(prompt_ids, answers["chosen"], answers["rejected"], max_len, keep_head=head)


# --------------------------------------------------------------------------------------------------
# the dataset


def pair_features() -> datasets.Features:
    """The columns of a tokenized split of pairs."""
    from datasets import Features, List, Value

    return Features(
        {
            **{column: List(Value("int32")) for column in PAIR_COLUMNS},
            "prompt_length": Value("int32"),
            "prompt_truncated": Value("bool"),
            "answers_cut": Value("bool"),
            "full_length": Value("int32"),
            # labelled tokens per side: the statistics sum these instead of reading every label
            "chosen_label_count": Value("int32"),
            "rejected_label_count": Value("int32"),
            "drop": Value("string"),
            "row_id": Value("int64"),
            "source": Value("string"),
        }
    )


def _encode_pair_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    data_cfg: DataConfig,
    max_len: int,
    **_: Any,
) -> dict[str, list]:
    """Pair records -> one encoded pair each (a dropped pair with empty ids, so every row is counted)."""
    out: dict[str, list] = {name: [] for name in pair_features()}
    count = len(next(iter(batch.values()))) if batch else 0
    for j in range(count):
        row = json.loads(batch[RAW_COLUMN][j]) if RAW_COLUMN in batch else {c: batch[c][j] for c in batch}
        item = dataclasses.asdict(encode_pair(tokenizer, row, data_cfg, max_len))
        for side in SIDES:
            if item["drop"] is not None:
                item[f"{side}_input_ids"], item[f"{side}_labels"] = [], []
            item[f"{side}_label_count"] = sum(1 for label in item[f"{side}_labels"] if label != IGNORE_INDEX)
        item["row_id"] = row.get("id") if isinstance(row.get("id"), int) else None
        item["source"] = row.get("source") if isinstance(row.get("source"), str) else None
        for key, value in item.items():
            out[key].append(value)
    return out


def _first_record(rows: datasets.Dataset) -> Mapping[str, Any] | None:
    if len(rows) == 0:
        return None
    first = rows[0]
    return json.loads(first[RAW_COLUMN]) if RAW_COLUMN in first else first


class PairDataset(Dataset):
    """A prepared split of preference pairs tokenized once at construction (cached on disk; memory-mapped).

    The same contract as :class:`ftpipe.data.dataset.SFTDataset`: ``role`` ``leader`` tokenizes and
    marks the cache done, ``follower`` waits for it (at most ``wait_s`` seconds), ``alone`` tokenizes or
    reuses the cache; the cache is keyed by the prepared file, the tokenizer, the data settings, the
    length and the encoding code (this module's included).

    Items are ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}``
    (unpadded lists); dropped pairs are left out and counted in ``stats``. ``lengths`` are chosen +
    rejected tokens per pair; ``samples`` holds every column of the kept pairs (what ``ftpipe inspect``
    shows).
    """

    def __init__(
        self,
        source: str | os.PathLike | datasets.Dataset,
        tokenizer: PreTrainedTokenizerBase,
        data_cfg: DataConfig,
        *,
        name: str | None = None,
        max_len: int | None = None,
        cache_dir: str | None = None,
        role: Literal["alone", "leader", "follower"] = "alone",
        wait_s: float = 3600.0,
    ) -> None:
        import pyarrow.compute as pc

        self.name = name or (Path(source).name if isinstance(source, (str, os.PathLike)) else "dataset")
        self.max_len = data_cfg.max_seq_length if max_len is None else max_len
        try:
            rows = _load_rows(source, cache_dir)
        except ValueError as err:
            raise type(err)(f"{self.name}: {err}") from err
        # Fail before any long work: SFT rows, a missing chat template or EOS show on the first row.
        eos_id(tokenizer)
        first = _first_record(rows)
        if first is not None and not is_pair(first):
            raise DataError(f"{self.name}: {_not_a_pair(first)}")
        chat = first is not None and is_chat_pair(first)
        if chat or data_cfg.use_chat_template:
            reason = "the data has chat pairs (prompt messages)" if chat else "use_chat_template is true"
            require_chat_template(tokenizer, reason)
            if chat:
                _warn_if_turns_lack_eos(tokenizer, self.name)
        if chat and _rows_use_tools(rows, uses=pair_uses_tools, column="prompt"):
            check_tool_template(tokenizer, f"{self.name}: the data uses tools")
        code = code_digest(__file__)
        fn_kwargs = {"tokenizer": tokenizer, "data_cfg": data_cfg, "max_len": self.max_len, "code": code}
        cache = _tokenized_cache(rows, tokenizer, data_cfg, self.max_len, code)
        encoded = encode_split(
            rows,
            fn_kwargs,
            name=self.name,
            cache=cache,
            role=role,
            wait_s=wait_s,
            encode=_encode_pair_batch,
            features=pair_features(),
        )
        table = encoded.data
        keep = pc.is_null(table.column("drop"))
        kept = [i for i, k in enumerate(keep.to_pylist()) if k]
        reasons = pc.value_counts(pc.drop_null(table.column("drop"))).to_pylist()

        def kept_sum(values: Any) -> int:
            return int(pc.sum(pc.filter(values, keep)).as_py() or 0)

        # per pair, chosen + rejected tokens (the offsets are read, no sample is decoded)
        self._lengths = pc.filter(
            pc.add(*(pc.list_value_length(table.column(f"{side}_input_ids")) for side in SIDES)), keep
        )
        self.stats = PairStats(
            rows=len(table),
            kept=len(kept),
            dropped=len(table) - len(kept),
            dropped_by_reason={r["values"]: r["counts"] for r in sorted(reasons, key=lambda r: r["values"])},
            truncated_prompts=kept_sum(table.column("prompt_truncated")),
            cut_answers=kept_sum(table.column("answers_cut")),
            tokens=int(pc.sum(self._lengths).as_py() or 0),
            label_tokens=sum(kept_sum(table.column(f"{side}_label_count")) for side in SIDES),
        )
        if len(kept) < len(table):
            encoded = encoded.select(kept)
        self.samples = encoded
        self.data = encoded.select_columns(list(PAIR_COLUMNS))
        self._log_stats()

    def _log_stats(self) -> None:
        s = self.stats
        reasons = ", ".join(f"{reason} {count}" for reason, count in s.dropped_by_reason.items())
        level = "warning" if s.cut_answers or s.dropped else "info"
        getattr(log, level)(
            "%s: %d pairs -> %d kept, %d tokens (%d in the loss, both sides); max_seq_length %d: %d prompts "
            "truncated from the left, %d pairs with answers cut from the right, %d pairs dropped%s",
            self.name,
            s.rows,
            s.kept,
            s.tokens,
            s.label_tokens,
            self.max_len,
            s.truncated_prompts,
            s.cut_answers,
            s.dropped,
            f" ({reasons})" if reasons else "",
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.data[index]

    @property
    def lengths(self) -> list[int]:
        """Chosen + rejected tokens of every pair, in order (counted once from the Arrow offsets)."""
        return self._lengths.to_pylist()


# --------------------------------------------------------------------------------------------------
# batches


class PairCollator:
    """Pair items -> one batch for a single forward over both answers.

    For B pairs: ``input_ids``, ``labels`` and ``attention_mask`` of shape (2B, L), rows 0..B-1 the
    chosen sides and rows B..2B-1 the rejected sides (pair i in rows i and B + i), right-padded to the
    longest of all 2B (rounded up to ``pad_to_multiple_of``), labels padded with -100; 0-d
    ``num_tokens`` (real tokens) and ``num_label_tokens`` (labels != -100, both sides); 0-d
    ``num_pairs`` and (B,) float32 ``pair_mask``: the pairs with at least one label on the chosen side
    (label-free padding copies count 0). Items with ``ref_chosen_logps`` and ``ref_rejected_logps``
    (cached reference log-probabilities) add (2B,) float32 ``ref_logps`` in the same row order.

    ``share_prompt`` (see the module notes): ``True`` batches each pair as one row, prompt then both
    answer blocks: ``input_ids``, ``position_ids`` and int8 ``pair_segments`` (0 prompt, 1 chosen
    block, 2 rejected block, -1 padding) of shape (B, L), ``labels`` still (2B, L) over those rows and
    ``num_tokens`` the real positions computed. ``"auto"`` does so for a batch whose shared rows fit in
    ``max_len`` (a longer row would cost more attention than the prompt saves, and exceed the length
    the memory estimate assumed); ``False`` never.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        *,
        share_prompt: bool | Literal["auto"] = False,
        max_len: int | None = None,
    ) -> None:
        self._pad = SFTCollator(pad_token_id, pad_to_multiple_of)  # checks both arguments
        self.pad_token_id = self._pad.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        if share_prompt == "auto" and not max_len:
            raise ValueError("share_prompt 'auto' needs max_len (the longest row a batch may have)")
        self.share_prompt = share_prompt
        self.max_len = max_len

    def __call__(self, pairs: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not pairs:
            raise ValueError("cannot collate an empty batch")
        rows: dict[str, list[dict[str, torch.Tensor]]] = {side: [] for side in SIDES}
        for i, pair in enumerate(pairs):
            for side in SIDES:
                missing = [k for k in (f"{side}_input_ids", f"{side}_labels") if k not in pair]
                if missing:
                    raise ValueError(
                        f"pair {i} of the batch has no {', '.join(missing)}: items must come from PairDataset"
                    )
                ids = torch.as_tensor(pair[f"{side}_input_ids"], dtype=torch.long)
                labels = torch.as_tensor(pair[f"{side}_labels"], dtype=torch.long)
                if ids.ndim != 1 or ids.shape != labels.shape:
                    raise ValueError(
                        f"pair {i} of the batch: {side}_input_ids {tuple(ids.shape)} and {side}_labels "
                        f"{tuple(labels.shape)} must be 1-D and of equal length"
                    )
                rows[side].append({"input_ids": ids, "labels": labels})
        shared = self._shared_layout(rows) if self.share_prompt else None
        batch = self._pad(rows["chosen"] + rows["rejected"]) if shared is None else shared
        has_label = (batch["labels"][: len(pairs)] != IGNORE_INDEX).any(dim=1)
        batch["num_pairs"] = has_label.sum()
        batch["pair_mask"] = has_label.to(torch.float32)
        refs = [("ref_chosen_logps" in p, "ref_rejected_logps" in p) for p in pairs]
        if any(any(r) for r in refs):
            incomplete = next((i for i, r in enumerate(refs) if not all(r)), None)
            if incomplete is not None:
                raise ValueError(
                    f"pair {incomplete} of the batch lacks ref_chosen_logps or ref_rejected_logps while "
                    "other pairs have them: the cached reference log-probabilities must cover every pair"
                )
            values = [float(p[f"ref_{side}_logps"]) for side in SIDES for p in pairs]
            bad = next((j for j, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                side = SIDES[bad // len(pairs)]
                raise ValueError(
                    f"pair {bad % len(pairs)} of the batch: ref_{side}_logps is {values[bad]}, not a finite "
                    "log-probability; compute the reference log-probabilities again"
                )
            batch["ref_logps"] = torch.tensor(values, dtype=torch.float32)
        return batch

    def _shared_layout(
        self, rows: dict[str, list[dict[str, torch.Tensor]]]
    ) -> dict[str, torch.Tensor] | None:
        """The batch with one row per pair (prompt, chosen block, rejected block), or None where
        ``share_prompt`` is ``"auto"`` and a row would be longer than ``max_len``."""
        built = [_shared_row(c, r) for c, r in zip(rows["chosen"], rows["rejected"], strict=True)]
        length = max(len(ids) for ids, *_ in built)
        if self.share_prompt == "auto" and self.max_len is not None and length > self.max_len:
            return None
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(parts: list[torch.Tensor], value: int) -> torch.Tensor:
            return torch.stack([F.pad(x, (0, length - len(x)), value=value) for x in parts])

        ids, positions, segments, chosen, rejected = (list(part) for part in zip(*built, strict=True))
        batch = {
            "input_ids": pad(ids, self.pad_token_id),
            "labels": pad(chosen + rejected, IGNORE_INDEX),
            "position_ids": pad(positions, 0),
            "pair_segments": pad(segments, -1).to(torch.int8),
            "num_tokens": torch.tensor(sum(len(x) for x in ids)),
        }
        batch["num_label_tokens"] = (batch["labels"] != IGNORE_INDEX).sum()
        return batch


def shared_prefix_length(chosen: Mapping[str, torch.Tensor], rejected: Mapping[str, torch.Tensor]) -> int:
    """Leading tokens both sides share and neither trains on (at least 1: position 0 is never labelled)."""
    a, b = chosen["input_ids"], rejected["input_ids"]
    n = min(len(a), len(b))
    same = (a[:n] == b[:n]).long().cumprod(0).sum()
    limit = [int(same)]
    for side in (chosen, rejected):
        labelled = (side["labels"] != IGNORE_INDEX).nonzero()
        limit.append(int(labelled[0]) if len(labelled) else len(side["labels"]))
    return max(1, min(limit))


def _shared_row(
    chosen: Mapping[str, torch.Tensor], rejected: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """One pair as one row: ``(input_ids, position_ids, segments, chosen labels, rejected labels)``.

    With ``s`` shared tokens the row is the chosen side, then the rejected side from token ``s - 1``
    on (the prompt's last token again, then the rejected answer); both answer blocks continue the
    positions of the first ``s - 1`` tokens. Each side's labels cover its own block only.
    """
    s = shared_prefix_length(chosen, rejected)
    c_ids, r_ids = chosen["input_ids"], rejected["input_ids"][s - 1 :]
    n_c, n_r = len(c_ids), len(r_ids)
    ids = torch.cat([c_ids, r_ids])
    positions = torch.cat([torch.arange(n_c), torch.arange(s - 1, s - 1 + n_r)])
    segments = torch.cat(
        [
            torch.zeros(s - 1, dtype=torch.long),
            torch.ones(n_c - s + 1, dtype=torch.long),
            torch.full((n_r,), 2),
        ]
    )
    chosen_labels = torch.cat([chosen["labels"], torch.full((n_r,), IGNORE_INDEX)])
    rejected_labels = torch.cat([torch.full((n_c,), IGNORE_INDEX), rejected["labels"][s - 1 :]])
    return ids, positions, segments, chosen_labels, rejected_labels


def pair_block_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (B, 1, L, L) attention mask of shared-prompt rows (``pair_segments``): a position attends to
    earlier positions of its own block and of the prompt, padding to itself only (no empty row).

    Boolean (True: attend; ``sdpa``) or, with ``dtype``, additive (0 or the dtype's lowest; ``eager``).
    """
    seg = segments.long()
    length = seg.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
    query, key = seg[:, :, None], seg[:, None, :]
    allowed = causal & (key >= 0) & ((key == 0) | (key == query))
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=seg.device)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
