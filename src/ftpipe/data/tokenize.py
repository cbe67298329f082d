"""Tokenization for supervised fine-tuning: prompt tokens are masked, only answers count in the loss.

Prepared rows come in two shapes: ``{"id", "input", "output"}`` (an alpaca prompt, template already
applied, and its answer) and ``{"id", "messages": [...], "tools": [...]}`` (chat, in the internal form
of :mod:`ftpipe.data.chat`; rendering with tools and reasoning traces is in :mod:`ftpipe.data.render`).
The pure functions here turn one row into token ids; ``encode_prompt`` is what evaluation uses, so a
prompt is built exactly as training built it. ``ftpipe.data.dataset`` reads prepared files line by line
(values keep their types) and tokenizes them with these functions into the training ``SFTDataset``.

Choices:

* **Separate tokenization.** The prompt and the answer are tokenized separately and their ids
  concatenated, so the label boundary is exact (tokenizing the joined text may merge tokens across
  it). Evaluation tokenizes prompts the same way, so its prompt ids are exactly the ids training saw
  before the answer.
* **Special tokens, BOS at most once.** Chat-template text already holds the template's special
  tokens (its BOS included, when the template writes one), so it is tokenized without adding any.
  A plain prompt gets BOS only when the tokenizer adds BOS to plain text by itself (Llama style) and
  the text does not already start with it; answers never get BOS.
* **EOS.** Every sample ends with the tokenizer's EOS, labelled, so the model learns to stop: alpaca
  answers get EOS appended unless their last token already is EOS (SmolLM2's ``<|im_end|>`` is both
  its end of turn and its EOS, so it is never doubled); in chat rows each assistant turn is labelled
  up to and including the EOS its template writes, the template's glue after it (a newline) is
  masked context, and after the final turn it is left out. Labels are never derived from the pad
  id, so EOS keeps its label when pad == EOS.
* **Chat rows** are rendered with the tokenizer's chat template incrementally: for each assistant
  turn (tool calls included), the conversation before it with ``add_generation_prompt=True`` (masked:
  system, user and tool turns), then the turn itself (labelled). The pieces must add up to the full
  rendering; a template that renders earlier turns differently once later turns exist (one that
  strips reasoning from history) trains each assistant turn as its own sample instead, its history
  rendered as at inference. Messages after the last assistant turn teach nothing and are left out.
* **Truncation to max_len.** The prompt (for chat: everything before the final assistant turn,
  oldest tokens first) is cut from the LEFT and the answer kept whole, as long as the answer leaves
  at least ``max_len // 4`` tokens (``MIN_PROMPT_FRACTION``; at least 1) for the prompt, or the whole
  prompt when it is shorter. A longer answer is cut from the RIGHT to fit after that much prompt, so
  the question is never reduced to nothing; a cut answer loses its EOS (it must not pretend to
  end). A leading BOS that the tokenizer adds itself is kept.
* **labels[0] is always -100**: position 0 predicts nothing in the shifted loss, so the count of
  labels != -100 is exactly the number of tokens in the loss. A sample with no such label is dropped.

Preference pairs (:mod:`ftpipe.data.pairs`) are built from the same pieces: a pair's answer is
tokenized exactly as the SFT sample of its prompt plus that answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftpipe.config.schema import DataConfig
from ftpipe.data.chat import ROLES, check_role_order
from ftpipe.data.errors import BadRow, DataError
from ftpipe.data.render import (  # ChatTemplateError: re-exported, part of this module's interface
    ChatTemplateError,
    apply_reasoning,
    chat_pieces,
    check_tool_template,
    model_name,
    render,
    renders_reasoning,
    require_chat_template,
    template_kwargs,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: Label of positions that do not count in the loss (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100
#: Share of max_len that a prompt keeps (when it is that long) before the answer is cut instead.
MIN_PROMPT_FRACTION = 0.25


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized sample: ``labels`` is ``input_ids`` with non-trained positions set to -100.

    ``full_length`` is the sample's length before it was fitted to ``max_len``.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool = False
    output_cut: bool = False
    full_length: int = 0


@dataclass(frozen=True)
class TokenizationStats:
    """What tokenizing one split did (logged once when the dataset is built)."""

    rows: int = 0
    kept: int = 0
    truncated_prompts: int = 0
    cut_outputs: int = 0
    dropped: int = 0
    tokens: int = 0
    label_tokens: int = 0
    #: conversations trained one assistant turn per sample (their template rewrites the history).
    per_turn_rows: int = 0
    per_turn_samples: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# rows and chat templates


def is_chat_row(row: Mapping[str, Any]) -> bool:
    """True for a ``messages`` row, False for an ``input``/``output`` row."""
    return row.get("messages") is not None


def is_chat_pair(row: Mapping[str, Any]) -> bool:
    """True for a preference pair whose ``prompt`` is messages (see :mod:`ftpipe.data.pairs`)."""
    return isinstance(row.get("prompt"), list)


def _first_row(path: Path) -> Mapping[str, Any] | None:
    """The first row of a JSONL file; None when it is missing, empty or unreadable (the dataset reports that)."""
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    return row if isinstance(row, Mapping) else None
    except (OSError, ValueError):
        return None
    return None


def _manifest_tools(folder: Path) -> int:
    """Rows with tools according to a prepared folder's manifest (0 when unknown)."""
    from ftpipe.data.manifest import read_manifest

    count = (read_manifest(folder) or {}).get("rows_with_tools", 0)
    return count if isinstance(count, int) else 0


def check_chat_template_early(
    tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, files: Sequence[str | os.PathLike] = ()
) -> None:
    """Raise ChatTemplateError before any long work when the data needs a chat template the tokenizer lacks.

    ``use_chat_template`` needs one; so do chat rows (and chat preference pairs), seen in the first row
    of each existing ``files`` (prepared splits hold one kind of row); rows with tools (the prepared
    folder's manifest says how many) need a template that renders them. Cheap: the training stage calls it (through the data
    module) before the training processes start and before model weights load.
    """
    if data_cfg.use_chat_template:
        require_chat_template(tokenizer, "use_chat_template is true")
    for path in map(Path, files):
        row = _first_row(path) if path.is_file() else None
        if row is not None and is_chat_row(row):
            require_chat_template(tokenizer, f"the data has chat rows (messages), e.g. {path}")
        elif row is not None and is_chat_pair(row):
            require_chat_template(tokenizer, f"the data has chat pairs (prompt messages), e.g. {path}")
    folders = {Path(f).parent for f in files}
    with_tools = sum(_manifest_tools(folder) for folder in folders)
    if with_tools:
        check_tool_template(tokenizer, f"the data uses tools ({with_tools} rows)")


def _row_name(row: Mapping[str, Any]) -> str:
    return f"row id {row['id']}" if row.get("id") is not None else "row"


def _clean_messages(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row's messages as plain dicts (keys holding None dropped), checked by the one role-order rule.

    ``ftpipe prepare`` drops (or, with ``on_bad_row: fail``, reports) rows out of order; this catches them
    in data given as ``prepared_dir``. Trailing user or tool turns are allowed (left out of training).
    """
    messages = []
    for i, message in enumerate(row["messages"]):
        msg = {k: v for k, v in dict(message).items() if v is not None}
        role, content = msg.get("role"), msg.get("content", "" if msg.get("tool_calls") else None)
        if role not in ROLES or not isinstance(content, str):
            raise DataError(
                f"{_row_name(row)}: message {i} needs a role in {ROLES} and text content, got {message!r}"
            )
        msg["content"] = content
        messages.append(msg)
    try:
        check_role_order(messages, final_answer=False)
    except BadRow as err:
        raise DataError(
            f"{_row_name(row)}: {err.detail}. Fix the row, or prepare the data with `ftpipe prepare` (it "
            "drops such rows and counts them)"
        ) from None
    return messages


def _with_system(messages: list[dict[str, Any]], data_cfg: DataConfig) -> list[dict[str, Any]]:
    """Prepend ``system_prompt`` when set and the conversation has no system message of its own."""
    if data_cfg.system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": data_cfg.system_prompt}, *messages]
    return messages


def _render_args(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], data_cfg: DataConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages ready for the template, keyword arguments of ``render``) of a chat row."""
    messages = _with_system(_clean_messages(row), data_cfg)
    messages = apply_reasoning(messages, data_cfg, renders_reasoning(tokenizer))
    return messages, {"tools": row.get("tools") or None, "kwargs": template_kwargs(data_cfg)}


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, row_name: str = "row"
) -> list[tuple[str, bool]]:
    """The pieces of a conversation that trains in one sample (see :func:`ftpipe.data.render.chat_pieces`)."""
    pieces = chat_pieces(tokenizer, messages, row_name=row_name)
    return pieces.samples[0] if pieces.samples else []


# --------------------------------------------------------------------------------------------------
# token ids


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids of ``text`` without any special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer puts BOS in front of plain text by itself (Llama style)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _plain_prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = text_ids(tokenizer, text)
    bos = tokenizer.bos_token_id
    if adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _require_text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(f"{_row_name(row)}: field {key!r} is missing or not text ({value!r})")
    return value


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's EOS id; a ChatTemplateError naming the model when it has none."""
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError(
            f"the tokenizer of {model_name(tokenizer)} has no EOS token, so answers cannot end; "
            "give it one (tokenizer.eos_token = ...)"
        )
    return tokenizer.eos_token_id


def _text_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, data_cfg: DataConfig, system: str | None = None
) -> list[int]:
    """A text prompt's ids: the text itself (BOS rules above), or with ``use_chat_template`` one user turn
    through the chat template with the generation prompt, after the ``system`` message when given, else
    ``system_prompt`` (else the template's default). ``system`` only counts with the chat template."""
    if not data_cfg.use_chat_template:
        return _plain_prompt_ids(tokenizer, text)
    require_chat_template(tokenizer, "use_chat_template is true")
    user = [{"role": "user", "content": text}]
    messages = [{"role": "system", "content": system}, *user] if system else _with_system(user, data_cfg)
    return text_ids(tokenizer, render(tokenizer, messages, generation=True, kwargs=template_kwargs(data_cfg)))


def _text_answer_ids(tokenizer: PreTrainedTokenizerBase, text: str, eos: int) -> list[int]:
    """A plain-text answer's ids, ending with one EOS (appended unless the text already ends with it)."""
    ids = text_ids(tokenizer, text)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids


def _alpaca_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], data_cfg: DataConfig
) -> list[int]:
    return _text_prompt_ids(tokenizer, _require_text(row, "input"), data_cfg)


#: (context ids, context labels, answer ids, answer labels) of one sample before fitting.
Parts = tuple[list[int], list[int], list[int], list[int]]


def _pieces_to_parts(tokenizer: PreTrainedTokenizerBase, pieces: list[tuple[str, bool]], eos: int) -> Parts:
    ctx_ids: list[int] = []
    ctx_labels: list[int] = []
    for text, trained in pieces[:-1]:
        ids = text_ids(tokenizer, text)
        ctx_ids += ids
        if trained and eos in ids:  # the turn up to its EOS is learned, the template's glue after is not
            end = len(ids) - ids[::-1].index(eos)
            ctx_labels += ids[:end] + [IGNORE_INDEX] * (len(ids) - end)
        else:
            ctx_labels += ids if trained else [IGNORE_INDEX] * len(ids)
    answer = text_ids(tokenizer, pieces[-1][0])
    answer = answer[: len(answer) - answer[::-1].index(eos)] if eos in answer else [*answer, eos]
    return ctx_ids, ctx_labels, answer, list(answer)


def _chat_samples(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], data_cfg: DataConfig
) -> tuple[list[Parts], bool]:
    """The samples of a chat row (one, or one per assistant turn for a history-rewriting template), and
    whether the row was split per turn; no samples without an assistant turn."""
    require_chat_template(tokenizer, "the data has chat rows (messages)")
    eos = eos_id(tokenizer)
    messages, args = _render_args(tokenizer, row, data_cfg)
    pieces = chat_pieces(tokenizer, messages, row_name=_row_name(row), **args)
    return [_pieces_to_parts(tokenizer, p, eos) for p in pieces.samples], pieces.per_turn


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], data_cfg: DataConfig
) -> list[int]:
    """The generation prompt of ``row``, token for token as training builds it (not truncated).

    Alpaca rows: the ``input`` text (through the chat template when ``use_chat_template``). Chat rows:
    every turn before the last assistant turn, with the row's tools and the template's generation prompt.
    """
    if not is_chat_row(row):
        return _alpaca_prompt_ids(tokenizer, row, data_cfg)
    samples, _ = _chat_samples(tokenizer, row, data_cfg)
    if not samples:  # no answer in the row: the whole conversation is the prompt
        messages, args = _render_args(tokenizer, row, data_cfg)
        return text_ids(tokenizer, render(tokenizer, messages, generation=True, **args))
    return samples[-1][0]


def final_assistant(row: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The last assistant message of a chat row (None without one)."""
    answers = [m for m in row.get("messages") or () if m.get("role") == "assistant"]
    return answers[-1] if answers else None


def reference_tool_calls(row: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """``[{"name", "arguments"}]`` of the final assistant turn's tool calls; None when it calls none."""
    answer = final_assistant(row) if is_chat_row(row) else None
    calls = (answer or {}).get("tool_calls")
    if not calls:
        return None
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]


def reference_output(row: Mapping[str, Any]) -> str:
    """The answer a row teaches: ``output``, or the content of the last assistant turn followed by its
    tool calls, one ``{"name": ..., "arguments": ...}`` JSON object per line (the trace left out)."""
    if not is_chat_row(row):
        return _require_text(row, "output")
    answer = final_assistant(row) or {}
    calls = [json.dumps(c, ensure_ascii=False) for c in reference_tool_calls(row) or []]
    return "\n".join([t for t in [answer.get("content") or ""] if t] + calls)


def fit_to_length(
    context_ids: Sequence[int],
    context_labels: Sequence[int],
    answer_ids: Sequence[int],
    answer_labels: Sequence[int],
    max_len: int,
    keep_head: int = 0,
) -> EncodedExample | None:
    """Join context and answer within ``max_len`` tokens (see the module notes); None when nothing is learned.

    ``keep_head`` leading context tokens (a BOS) survive left truncation. The context keeps at least
    ``max(keep_head + 1, int(max_len * MIN_PROMPT_FRACTION))`` tokens (all of it when shorter).
    """
    n_ctx, n_ans = len(context_ids), len(answer_ids)
    keep_head = min(keep_head, n_ctx)
    min_ctx = min(n_ctx, max(keep_head + 1, int(max_len * MIN_PROMPT_FRACTION)))
    if n_ctx + n_ans <= max_len:
        n_keep_ctx, n_keep_ans = n_ctx, n_ans
    elif n_ans <= max_len - min_ctx:
        n_keep_ctx, n_keep_ans = max_len - n_ans, n_ans
    else:
        n_keep_ctx, n_keep_ans = min(min_ctx, max_len), max(max_len - min_ctx, 0)
    tail = range(n_ctx - (n_keep_ctx - min(keep_head, n_keep_ctx)), n_ctx)
    kept = [*range(min(keep_head, n_keep_ctx)), *tail]
    input_ids = [context_ids[i] for i in kept] + list(answer_ids[:n_keep_ans])
    labels = [context_labels[i] for i in kept] + list(answer_labels[:n_keep_ans])
    if labels:
        labels[0] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedExample(
        input_ids=input_ids,
        labels=labels,
        prompt_truncated=n_keep_ctx < n_ctx,
        output_cut=n_keep_ans < n_ans,
        full_length=n_ctx + n_ans,
    )


def _alpaca_parts(tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], data_cfg: DataConfig) -> Parts:
    eos = eos_id(tokenizer)
    ctx_ids = _alpaca_prompt_ids(tokenizer, row, data_cfg)
    answer_ids = _text_answer_ids(tokenizer, _require_text(row, "output"), eos)
    return ctx_ids, [IGNORE_INDEX] * len(ctx_ids), answer_ids, list(answer_ids)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    row: Mapping[str, Any],
    data_cfg: DataConfig,
    max_len: int | None = None,
) -> tuple[list[EncodedExample], bool]:
    """Every sample of one row within ``max_len`` (default ``max_seq_length``), and whether the row was
    split per assistant turn. One sample per row, except conversations whose template rewrites earlier
    turns (one per assistant turn); samples with nothing to learn are left out."""
    max_len = data_cfg.max_seq_length if max_len is None else max_len
    if is_chat_row(row):
        samples, per_turn = _chat_samples(tokenizer, row, data_cfg)
    else:
        samples, per_turn = [_alpaca_parts(tokenizer, row, data_cfg)], False
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    out = []
    for ctx_ids, ctx_labels, answer_ids, answer_labels in samples:
        head = 1 if ctx_ids and bos is not None and ctx_ids[0] == bos else 0
        example = fit_to_length(ctx_ids, ctx_labels, answer_ids, answer_labels, max_len, keep_head=head)
        if example is not None:
            out.append(example)
    return out, per_turn


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    row: Mapping[str, Any],
    data_cfg: DataConfig,
    max_len: int | None = None,
) -> EncodedExample | None:
    """The sample of a row's final answer within ``max_len`` (default ``max_seq_length``); None when dropped."""
    examples, _ = encode_examples(tokenizer, row, data_cfg, max_len)
    return examples[-1] if examples else None
