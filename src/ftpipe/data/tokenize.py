"""Tokenization for supervised fine-tuning: prompt tokens are masked, only answers count in the loss.

Prepared rows come in two shapes: ``{"id", "input", "output"}`` (an alpaca prompt, template already
applied, and its answer) and ``{"id", "messages": [{"role", "content"}, ...]}`` (chat). The pure
functions here turn one row into token ids; ``encode_prompt`` is what evaluation uses, so a prompt is
built exactly as training built it. ``SFTDataset`` tokenizes a prepared JSONL file once, eagerly.

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
  turn, the conversation before it with ``add_generation_prompt=True`` (masked), then the turn itself
  (labelled). The pieces must add up to the full rendering; a template that renders earlier turns
  differently once later turns exist is refused with an error naming the row. Messages after the
  last assistant turn teach nothing and are left out.
* **Truncation to max_len.** The prompt (for chat: everything before the final assistant turn,
  oldest tokens first) is cut from the LEFT and the answer kept whole, as long as the answer leaves
  at least ``max_len // 4`` tokens (``MIN_PROMPT_FRACTION``; at least 1) for the prompt, or the whole
  prompt when it is shorter. A longer answer is cut from the RIGHT to fit after that much prompt, so
  the question is never reduced to nothing; a cut answer loses its EOS (it must not pretend to
  end). A leading BOS that the tokenizer adds itself is kept.
* **labels[0] is always -100**: position 0 predicts nothing in the shifted loss, so the count of
  labels != -100 is exactly the number of tokens in the loss. A sample with no such label is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from ftpipe.config.schema import DataConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = get_logger(__name__)

#: Label of positions that do not count in the loss (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100
#: Share of max_len that a prompt keeps (when it is that long) before the answer is cut instead.
MIN_PROMPT_FRACTION = 0.25
ROLES = ("system", "user", "assistant")


class ChatTemplateError(FtpipeError, ValueError):
    """The tokenizer has no chat template, or its template cannot be rendered turn by turn."""


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized sample: ``labels`` is ``input_ids`` with non-trained positions set to -100."""

    input_ids: list[int]
    labels: list[int]
    prompt_truncated: bool = False
    output_cut: bool = False


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

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# rows and chat templates


def is_chat_row(row: Mapping[str, Any]) -> bool:
    """True for a ``messages`` row, False for an ``input``/``output`` row."""
    return row.get("messages") is not None


def _model_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.name_or_path or type(tokenizer).__name__


def require_chat_template(tokenizer: PreTrainedTokenizerBase, reason: str) -> None:
    """Raise ChatTemplateError naming the model when ``tokenizer`` has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return
    raise ChatTemplateError(
        f"the tokenizer of {_model_name(tokenizer)} has no chat template, but {reason}. "
        "Set use_chat_template: false (plain prompts) and prepare the data in alpaca format "
        "(data_format: alpaca), use a model whose tokenizer has a chat template (an instruct model), "
        "or give the tokenizer one (tokenizer.chat_template = ...)."
    )


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


def check_chat_template_early(
    tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, files: Sequence[str | os.PathLike] = ()
) -> None:
    """Raise ChatTemplateError before any long work when the data needs a chat template the tokenizer lacks.

    ``use_chat_template`` needs one; so do chat rows, seen in the first row of each existing ``files``
    (prepared splits hold one kind of row). Cheap: the training stage calls it (through the data
    module) before the training processes start and before model weights load.
    """
    if data_cfg.use_chat_template:
        require_chat_template(tokenizer, "use_chat_template is true")
    for path in map(Path, files):
        row = _first_row(path) if path.is_file() else None
        if row is not None and is_chat_row(row):
            require_chat_template(tokenizer, f"the data has chat rows (messages), e.g. {path}")


def _row_name(row: Mapping[str, Any]) -> str:
    return f"row id {row['id']}" if row.get("id") is not None else "row"


def _clean_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The row's messages as plain dicts, keys holding None dropped (Arrow fills absent keys with None)."""
    messages = []
    for i, message in enumerate(row["messages"]):
        msg = {k: v for k, v in dict(message).items() if v is not None}
        if msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise ValueError(
                f"{_row_name(row)}: message {i} needs a role in {ROLES} and text content, got {message!r}"
            )
        messages.append(msg)
    _check_role_order(row, messages)
    return messages


def _check_role_order(row: Mapping[str, Any], messages: list[dict[str, str]]) -> None:
    """An optional first system turn, then user and assistant turns alternating from user.

    ``ftpipe prepare`` drops (or, with ``on_bad_row: fail``, reports) such rows; this catches them in
    data given as ``prepared_dir``. A trailing user turn is allowed (it is left out of training).
    """
    expected = "user"
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "system" and i == 0:
            continue
        if role != expected:
            raise ValueError(
                f"{_row_name(row)}: message {i} has role {role!r} where a {expected} turn belongs; turns must be an "
                "optional first system turn, then user and assistant alternating from user. Fix the row, or "
                "prepare the data with `ftpipe prepare` (it drops such rows and counts them)"
            )
        expected = "assistant" if role == "user" else "user"


def _with_system(messages: list[dict[str, str]], data_cfg: DataConfig) -> list[dict[str, str]]:
    """Prepend ``system_prompt`` when set and the conversation has no system message of its own."""
    if data_cfg.system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": data_cfg.system_prompt}, *messages]
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)


def chat_segments(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, row_name: str = "row"
) -> list[tuple[str, bool]]:
    """The chat rendering up to the last assistant turn as ``(text, is_assistant_turn)`` pieces.

    Each assistant turn is preceded by the rendering of the conversation before it with the
    generation prompt; the pieces concatenate to the full rendering of ``messages`` up to and including
    the last assistant turn, which is checked. No assistant turn: an empty list.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return []
    segments: list[tuple[str, bool]] = []
    done = ""
    for i in range(last + 1):
        if messages[i]["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation=True) if i else ""
        full = _render(tokenizer, messages[: i + 1], generation=False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise ChatTemplateError(
                f"{row_name}: the chat template of {_model_name(tokenizer)} is not prefix-consistent: "
                f"rendering the conversation up to message {i} does not extend the rendering of the "
                "turns before it (the template rewrites earlier turns, e.g. strips reasoning from "
                "earlier assistant turns). Train on single-turn rows, or give the tokenizer a template "
                "that renders each turn the same whatever follows it."
            )
        segments += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    if "".join(text for text, _ in segments) != done:  # pragma: no cover - implied by the checks above
        raise ChatTemplateError(f"{row_name}: chat pieces do not add up to the full rendering")
    return [(text, trained) for text, trained in segments if text]


# --------------------------------------------------------------------------------------------------
# token ids


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer puts BOS in front of plain text by itself (Llama style)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _plain_prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    ids = _text_ids(tokenizer, text)
    bos = tokenizer.bos_token_id
    if adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _require_text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{_row_name(row)}: field {key!r} is missing or not text ({value!r})")
    return value


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer of {_model_name(tokenizer)} has no EOS token, so answers cannot end; "
            "give it one (tokenizer.eos_token = ...)"
        )
    return tokenizer.eos_token_id


def _alpaca_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], data_cfg: DataConfig
) -> list[int]:
    text = _require_text(row, "input")
    if not data_cfg.use_chat_template:
        return _plain_prompt_ids(tokenizer, text)
    require_chat_template(tokenizer, "use_chat_template is true")
    messages = _with_system([{"role": "user", "content": text}], data_cfg)
    return _text_ids(tokenizer, _render(tokenizer, messages, generation=True))


def _chat_parts(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], data_cfg: DataConfig
) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(context ids, context labels, final answer ids, final answer labels); None without an assistant turn."""
    require_chat_template(tokenizer, "the data has chat rows (messages)")
    eos = _eos_id(tokenizer)
    segments = chat_segments(tokenizer, _with_system(_clean_messages(row), data_cfg), row_name=_row_name(row))
    if not segments:
        return None
    ctx_ids: list[int] = []
    ctx_labels: list[int] = []
    for text, trained in segments[:-1]:
        ids = _text_ids(tokenizer, text)
        ctx_ids += ids
        if trained and eos in ids:  # the turn up to its EOS is learned, the template's glue after is not
            end = len(ids) - ids[::-1].index(eos)
            ctx_labels += ids[:end] + [IGNORE_INDEX] * (len(ids) - end)
        else:
            ctx_labels += ids if trained else [IGNORE_INDEX] * len(ids)
    answer = _text_ids(tokenizer, segments[-1][0])
    answer = answer[: len(answer) - answer[::-1].index(eos)] if eos in answer else [*answer, eos]
    return ctx_ids, ctx_labels, answer, list(answer)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, row: Mapping[str, Any], data_cfg: DataConfig
) -> list[int]:
    """The generation prompt of ``row``, token for token as training builds it (not truncated).

    Alpaca rows: the ``input`` text (through the chat template when ``use_chat_template``). Chat rows:
    every turn before the last assistant turn, with the template's generation prompt.
    """
    if not is_chat_row(row):
        return _alpaca_prompt_ids(tokenizer, row, data_cfg)
    parts = _chat_parts(tokenizer, row, data_cfg)
    if parts is None:  # no answer in the row: the whole conversation is the prompt
        messages = _with_system(_clean_messages(row), data_cfg)
        return _text_ids(tokenizer, _render(tokenizer, messages, generation=True))
    return parts[0]


def reference_output(row: Mapping[str, Any]) -> str:
    """The answer a row teaches: ``output``, or the content of the last assistant turn."""
    if not is_chat_row(row):
        return _require_text(row, "output")
    answers = [m["content"] for m in row["messages"] if m.get("role") == "assistant"]
    return answers[-1] if answers else ""


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
    )


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    row: Mapping[str, Any],
    data_cfg: DataConfig,
    max_len: int | None = None,
) -> EncodedExample | None:
    """Token ids and labels of one row within ``max_len`` (default ``max_seq_length``); None when dropped."""
    max_len = data_cfg.max_seq_length if max_len is None else max_len
    if is_chat_row(row):
        parts = _chat_parts(tokenizer, row, data_cfg)
        if parts is None:
            return None
        ctx_ids, ctx_labels, answer_ids, answer_labels = parts
    else:
        eos = _eos_id(tokenizer)
        ctx_ids = _alpaca_prompt_ids(tokenizer, row, data_cfg)
        ctx_labels = [IGNORE_INDEX] * len(ctx_ids)
        answer_ids = _text_ids(tokenizer, _require_text(row, "output"))
        if not answer_ids or answer_ids[-1] != eos:
            answer_ids.append(eos)
        answer_labels = list(answer_ids)
    head = 1 if ctx_ids and adds_bos(tokenizer) and ctx_ids[0] == tokenizer.bos_token_id else 0
    return fit_to_length(ctx_ids, ctx_labels, answer_ids, answer_labels, max_len, keep_head=head)


# --------------------------------------------------------------------------------------------------
# the dataset


def _encode_for_map(
    row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig, max_len: int, **_: Any
) -> dict[str, Any]:
    example = encode_example(tokenizer, row, data_cfg, max_len)
    if example is None:
        return {
            "input_ids": [],
            "labels": [],
            "prompt_truncated": False,
            "output_cut": False,
            "dropped": True,
        }
    return {
        "input_ids": example.input_ids,
        "labels": example.labels,
        "prompt_truncated": example.prompt_truncated,
        "output_cut": example.output_cut,
        "dropped": False,
    }


def _warn_if_turns_lack_eos(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    try:
        segments = chat_segments(tokenizer, probe, row_name="probe")
    except Exception:  # the rows themselves report template problems, naming the row
        return
    if tokenizer.eos_token_id not in _text_ids(tokenizer, segments[-1][0]):
        log.warning(
            "%s: the chat template of %s does not end assistant turns with the EOS token %r; the final "
            "turn of each sample gets EOS appended, earlier turns are trained as the template renders them",
            name,
            _model_name(tokenizer),
            tokenizer.eos_token,
        )


def _load_rows(source: str | os.PathLike | datasets.Dataset, cache_dir: str | None) -> datasets.Dataset:
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prepared data file {path} does not exist; run the prepare stage first")
    with path.open(encoding="utf-8") as handle:
        if not any(line.strip() for line in handle):
            return datasets.Dataset.from_dict({"id": []})
    return datasets.Dataset.from_json(str(path), cache_dir=cache_dir)


def _features() -> datasets.Features:
    from datasets import Features, List, Value

    return Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "prompt_truncated": Value("bool"),
            "output_cut": Value("bool"),
            "dropped": Value("bool"),
        }
    )


def _empty() -> datasets.Dataset:
    import datasets

    features = _features()
    return datasets.Dataset.from_dict({name: [] for name in features}, features=features)


class SFTDataset(Dataset):
    """A prepared split tokenized once at construction (cached by ``datasets``; memory-mapped).

    Items are ``{"input_ids": list[int], "labels": list[int]}``, unpadded; ``stats`` says how many rows
    were truncated, cut or dropped.
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
    ) -> None:
        import pyarrow.compute as pc

        self.name = name or (Path(source).name if isinstance(source, (str, os.PathLike)) else "dataset")
        self.max_len = data_cfg.max_seq_length if max_len is None else max_len
        rows = _load_rows(source, cache_dir)
        # Fail before any long work: a missing chat template or EOS shows on the first row already.
        _eos_id(tokenizer)
        chat_rows = "messages" in rows.column_names
        if chat_rows or data_cfg.use_chat_template:
            reason = "the data has chat rows (messages)" if chat_rows else "use_chat_template is true"
            require_chat_template(tokenizer, reason)
            _warn_if_turns_lack_eos(tokenizer, self.name)
        code_digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
        try:
            encoded = (
                _empty()
                if len(rows) == 0
                else rows.map(
                    _encode_for_map,
                    fn_kwargs={
                        "tokenizer": tokenizer,
                        "data_cfg": data_cfg,
                        "max_len": self.max_len,
                        "code": code_digest,
                    },
                    remove_columns=rows.column_names,
                    features=_features(),
                    desc=f"tokenizing {self.name}",
                )
            )
        except ValueError as err:  # name the file: the message already names the row
            raise type(err)(f"{self.name}: {err}") from err
        table = encoded.data
        lengths = pc.list_value_length(table.column("input_ids"))
        label_flags = pc.not_equal(pc.list_flatten(table.column("labels")), IGNORE_INDEX)
        dropped = table.column("dropped").to_pylist()
        self.stats = TokenizationStats(
            rows=len(encoded),
            kept=len(encoded) - sum(dropped),
            truncated_prompts=int(pc.sum(table.column("prompt_truncated")).as_py() or 0),
            cut_outputs=int(pc.sum(table.column("output_cut")).as_py() or 0),
            dropped=sum(dropped),
            tokens=int(pc.sum(lengths).as_py() or 0),
            label_tokens=int(pc.sum(label_flags).as_py() or 0),
        )
        if self.stats.dropped:
            encoded = encoded.select([i for i, d in enumerate(dropped) if not d])
        self.data = encoded.select_columns(["input_ids", "labels"])
        self._log_stats()

    def _log_stats(self) -> None:
        s = self.stats
        level = "warning" if s.cut_outputs or s.dropped else "info"
        getattr(log, level)(
            "%s: %d rows -> %d samples, %d tokens (%d in the loss); max_seq_length %d: %d prompts truncated "
            "from the left, %d answers cut from the right, %d rows dropped with nothing to learn",
            self.name,
            s.rows,
            s.kept,
            s.tokens,
            s.label_tokens,
            self.max_len,
            s.truncated_prompts,
            s.cut_outputs,
            s.dropped,
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.data[index]

    @property
    def lengths(self) -> list[int]:
        """Tokens of every sample, in order (read from the Arrow table, no sample is decoded)."""
        import pyarrow.compute as pc

        return pc.list_value_length(self.data.data.column("input_ids")).to_pylist()
