"""Preference pairs (``objective: dpo``): raw rows of the usual preference layouts as one prepared pair
record, as pure functions (like :mod:`ftpipe.data.formats`).

Layouts, detected from a data set's columns (:func:`detect_layout`):

* ``explicit``: ``prompt``, ``chosen`` and ``rejected``. Either three texts, or messages: ``prompt`` a
  list of turns (system / user / assistant / tool: the conversation before the answer, in the OpenAI
  ``role``/``content`` or the ShareGPT ``from``/``value`` form) and ``chosen`` / ``rejected`` each a list
  of assistant turns (tool calls as chat rows have them; tool results after a call), one message object,
  or a text (one assistant turn). A side that is a whole conversation (it starts with a system or user
  turn) must start with the prompt, and the rest is its answer.
* ``implicit``: no ``prompt``; ``chosen`` and ``rejected`` are whole conversations. The prompt is their
  longest common prefix of turns; it must end with a user (or tool) turn, and each side's rest (its
  answer) must start with an assistant turn.
* ``sharegpt``: ``conversations`` (ShareGPT turns, normalised as SFT's ``sharegpt`` rows are) is the
  prompt; ``chosen`` / ``rejected`` are single ShareGPT messages (``{"from": "gpt", "value": ...}``) or
  lists of them (LLaMA-Factory's preference layout).
* ``alpaca``: the template columns (``instruction``, optional ``input``) render the prompt with the
  configured ``input_template`` / ``input_template_no_input`` / ``field_mapping`` / ``optional_fields``
  (``output_template`` is not applied); ``chosen`` / ``rejected`` are the answer texts.
* ``converter``: a configured converter returns a row of any layout above (its keys decide which) or None.

Every layout may add a ``tools`` column (function schemas, as SFT chat rows) and a ``system`` column (a
string: the first, system, turn of the prompt).

The prepared pair record (``ftpipe prepare`` adds ``id`` and ``source`` in front)::

    chat form: {"prompt": [turns], "chosen": [turns], "rejected": [turns], "tools": [...]}
    text form: {"prompt": "...", "chosen": "...", "rejected": "..."}

Turns are in the internal form of :mod:`ftpipe.data.chat`; ``tools`` is there only when the row has tools;
``prompt + chosen`` and ``prompt + rejected`` are each a conversation that passes
:func:`~ftpipe.data.chat.check_role_order` (ending with the assistant's answer). The text form is used for
rows whose prompt and answers are all texts, in a data set with neither a ``system`` nor a ``tools``
column; anything else is in the chat form.

Bad pairs (:class:`~ftpipe.data.errors.BadRow` reasons): ``missing:chosen`` / ``missing:rejected`` (absent
or null), ``missing:prompt`` / ``empty:prompt`` (with ``allow_empty_prompt`` an empty text prompt is kept, in the
text form),
``empty:chosen`` / ``empty:rejected`` (no text and no tool call), ``identical_pair`` (the two answers are
the same after normalisation), ``prompt_mismatch`` (no shared prompt ending with a user or tool turn, or a
whole-conversation side that does not start with the given prompt), the alpaca field reasons
(``missing:<field>``, ``empty:<field>``) and the chat normaliser's own (``chat_role_order``, ...).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ftpipe.config.schema import DataConfig
from ftpipe.data.chat import (
    MESSAGE_ROLES,
    SHAREGPT_ROLES,
    as_text,
    check_role_order,
    normalize_tools,
    normalize_turns,
    system_text,
    uses_tools,
)
from ftpipe.data.errors import BadRow
from ftpipe.data.formats import (
    AlpacaSpec,
    Converter,
    RowFormat,
    alpaca_prompt,
    alpaca_values,
    run_converter,
)

Row = Mapping[str, Any]
Record = dict[str, Any]
Turns = list[dict[str, Any]]

#: Objectives trained on preference pairs (their rows are prepared by this module).
PAIR_OBJECTIVES = ("dpo",)
SIDES = ("chosen", "rejected")
LAYOUTS = ("explicit", "implicit", "sharegpt", "alpaca")
#: The keys of a prepared pair record (``ftpipe prepare`` adds ``id`` and ``source``).
PAIR_KEYS = frozenset({"prompt", "chosen", "rejected", "tools"})
#: Columns that put every row of a data set in the chat form.
CHAT_COLUMNS = ("system", "tools")
LAYOUT_HELP = (
    "the preference layouts are: prompt + chosen + rejected (texts, or message lists); chosen + rejected "
    "as whole conversations that share their prompt; conversations + chosen + rejected (ShareGPT); "
    "instruction [+ input] + chosen + rejected (rendered with the alpaca templates); each may add a tools "
    "and a system column"
)
_SHAPES = (
    '{"prompt", "chosen", "rejected"}, {"chosen", "rejected"} (whole conversations), '
    '{"conversations", "chosen", "rejected"} or the template fields with "chosen" and "rejected", each '
    'optionally with "system" and "tools"'
)
_CHAT_NEEDS_PROMPT = (
    "in the chat form (message lists, or a system or tools column) a conversation starts with the user's "
    "turn, so a prompt is needed (allow_empty_prompt lets an empty text prompt through, in the text form only)"
)


def is_pair_record(record: Mapping[str, Any]) -> bool:
    """True for a prepared (or returned) record with a prompt and both answers."""
    return "prompt" in record and all(side in record for side in SIDES)


def pair_uses_tools(record: Mapping[str, Any]) -> bool:
    """True when a pair record has tool schemas, or tool calls or results in its prompt or answers."""
    if record.get("tools"):
        return True
    for key in ("prompt", *SIDES):
        turns = record.get(key)
        if isinstance(turns, list) and uses_tools({"messages": turns}):
            return True
    return False


def record_uses_tools(record: Mapping[str, Any]) -> bool:
    """:func:`~ftpipe.data.chat.uses_tools` for SFT records and pair records alike."""
    return pair_uses_tools(record) if is_pair_record(record) else uses_tools(record)


def prompt_spec(spec: AlpacaSpec) -> AlpacaSpec:
    """The alpaca spec without its output template: a pair's answers are ``chosen`` and ``rejected``."""
    return dataclasses.replace(spec, output_template="")


def template_columns(spec: AlpacaSpec | None) -> list[str]:
    """Columns of the prompt template's required (not optional) fields."""
    if spec is None:
        return []
    optional = set(spec.optional_fields)
    return list(
        dict.fromkeys(
            spec.field_mapping[name]
            for name in spec.used_fields
            if name not in optional and name in spec.field_mapping
        )
    )


def detect_layout(
    columns: Iterable[str], data_format: str = "auto", prompt_columns: Sequence[str] = ()
) -> str:
    """The preference layout of a data set with these columns (see the module notes).

    ``conversations`` -> ``sharegpt``; ``prompt`` (not a template column) -> ``explicit``; every column of
    the prompt template's required fields (``prompt_columns``) -> ``alpaca``; else ``implicit``. A set
    ``data_format`` picks the layout of its kind (``messages``: ``explicit`` with a ``prompt`` column,
    else ``implicit``).
    """
    names = set(columns)
    if data_format == "sharegpt" or (data_format == "auto" and "conversations" in names):
        return "sharegpt"
    if data_format == "alpaca":
        return "alpaca"
    if "prompt" in names and (data_format == "messages" or "prompt" not in prompt_columns):
        return "explicit"
    if data_format == "auto" and prompt_columns and all(c in names for c in prompt_columns):
        return "alpaca"
    return "implicit"


# -- turns -----------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    return "list" if isinstance(value, list) else type(value).__name__


def _prefixed(err: BadRow, where: str) -> BadRow:
    return BadRow(err.reason, f"{where}: {err.detail}", fatal=err.fatal)


def _is_text(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _sharegpt_turns(turns: list) -> bool:
    """Whether turns are ShareGPT's ``from``/``value`` (else OpenAI's ``role``/``content``)."""
    mappings = [t for t in turns if isinstance(t, Mapping)]
    return bool(mappings) and all("from" in t and "role" not in t for t in mappings)


def _blank(turns: list, sharegpt: bool) -> bool:
    """True when no turn has text or a tool call (an answer that says nothing)."""
    content_key = "value" if sharegpt else "content"
    for turn in turns:
        if not isinstance(turn, Mapping) or turn.get("tool_calls") or turn.get("function_call"):
            return False
        value = turn.get(content_key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        return False
    return True


def normalize_side(value: Any, where: str, notes: list[str]) -> Turns:
    """A prompt or an answer (a list of turns, one message object, or a text: one assistant turn) in the
    internal form; the turns are not checked for order here. An empty one is ``empty:<where>``."""
    if _is_text(value):
        text = as_text(value, where, notes, where)
        if text is None or not text.strip():
            raise BadRow(f"empty:{where}", f"{where} is empty")
        value = [{"role": "assistant", "content": text}]
    elif isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise BadRow(
            f"not_messages:{where}", f"{where} is a {_kind(value)}, not a text or a list of messages"
        )
    sharegpt = _sharegpt_turns(value)
    if not value or _blank(value, sharegpt):
        raise BadRow(f"empty:{where}", f"{where} has no text and no tool call")
    try:
        if sharegpt:
            return normalize_turns(
                value, role_key="from", content_key="value", role_names=SHAREGPT_ROLES, notes=notes
            )
        return normalize_turns(
            value, role_key="role", content_key="content", role_names=MESSAGE_ROLES, notes=notes
        )
    except BadRow as err:
        raise _prefixed(err, where) from None


def _canonical(turns: Turns) -> str:
    """Turns as comparable text: contents stripped, keys sorted."""
    return json.dumps(
        [{**t, "content": str(t.get("content") or "").strip()} for t in turns], sort_keys=True, default=str
    )


def _first_difference(a: Turns, b: Turns) -> int:
    n = 0
    while n < min(len(a), len(b)) and _canonical([a[n]]) == _canonical([b[n]]):
        n += 1
    return n


def _a_turn(role: str) -> str:
    return f"{'an' if role == 'assistant' else 'a'} {role} turn"


def _check_answer(answer: Turns, side: str, reason: str, why: str, *, empty: str | None = None) -> None:
    """An answer starts with an assistant turn and holds only assistant turns and tool results; no answer
    is ``empty`` (else ``reason``)."""
    if not answer:
        raise BadRow(empty or reason, f"{side} has no answer after the prompt ({why})")
    if answer[0]["role"] != "assistant":
        raise BadRow(
            reason, f"{side}'s answer starts with {_a_turn(answer[0]['role'])}, not the assistant's ({why})"
        )
    for i, turn in enumerate(answer):
        if turn["role"] not in ("assistant", "tool"):
            raise BadRow(
                reason,
                f"{side}'s answer holds {_a_turn(turn['role'])} (its turn {i}): an answer is the assistant's "
                f"turns (with tool results after its calls) only ({why})",
            )


def _split_whole(turns: Turns, prompts: list[Turns], side: str) -> Turns:
    """The answer of a side: the side itself, or, when it is a whole conversation (it starts with a system
    or user turn), what follows the prompt it must start with."""
    if turns[0]["role"] not in ("system", "user"):
        return turns
    for prompt in prompts:
        if prompt and _canonical(turns[: len(prompt)]) == _canonical(prompt):
            return turns[len(prompt) :]
    k = _first_difference(turns, prompts[0])
    raise BadRow(
        "prompt_mismatch",
        f"{side} is a whole conversation, but it does not start with the prompt (they differ at turn {k}); "
        f"give {side} as the answer only, or as the prompt's conversation followed by the answer",
    )


def _check_order(prompt: Turns, answer: Turns, side: str) -> None:
    if prompt[-1]["role"] not in ("user", "tool"):
        raise BadRow(
            "chat_role_order",
            f"the prompt ends with {_a_turn(prompt[-1]['role'])}; it must end with the user (or tool) turn "
            "the answers reply to",
        )
    try:
        check_role_order([*prompt, *answer])
    except BadRow as err:
        raise _prefixed(err, f"prompt + {side}") from None


def _with_system(prompt: Turns, system: str | None) -> Turns:
    if system is None or (prompt and prompt[0]["role"] == "system"):
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def _identical(chosen: Any, rejected: Any) -> None:
    same = (
        chosen.strip() == rejected.strip()
        if isinstance(chosen, str)
        else _canonical(chosen) == _canonical(rejected)
    )
    if same:
        raise BadRow("identical_pair", "chosen and rejected are the same answer: the pair prefers nothing")


# -- prompts ---------------------------------------------------------------------------------------


def _given_prompt(row: Row, column: str, allow_empty: bool, notes: list[str]) -> str | Turns:
    """An explicit prompt: a text, or turns; missing is ``missing:prompt``, empty ``empty:prompt`` (an
    empty text is allowed with ``allow_empty``; turns need the user's)."""
    value = row.get(column)
    if value is None:
        what = "prompt" if column == "prompt" else f"{column} (the prompt)"
        raise BadRow("missing:prompt", f"{what} is missing or null")
    empty = BadRow(
        "empty:prompt",
        f"{column} is empty (set allow_empty_prompt: true if answers without a prompt are meant)",
    )
    if _is_text(value):
        text = as_text(value, "prompt", notes, column)
        assert text is not None
        if not text.strip() and not allow_empty:
            raise empty
        return text
    try:
        turns = normalize_side(value, "prompt", notes)
    except BadRow as err:
        if err.reason != "empty:prompt":
            raise
        turns = []
    if not any(t["role"] in ("user", "tool") for t in turns):
        what = f"only {_a_turn(turns[0]['role'])}" if turns else "no turns"
        raise BadRow("empty:prompt", f"{column} has {what}; {_CHAT_NEEDS_PROMPT}")
    return turns


def _as_turns(prompt: str | Turns) -> Turns:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}] if prompt.strip() else []
    return prompt


# -- layouts ---------------------------------------------------------------------------------------


def _text_side(value: Any, side: str, notes: list[str]) -> str:
    text = as_text(value, side, notes, side)
    if text is None or not text.strip():
        raise BadRow(f"empty:{side}", f"{side} is empty")
    return text


def _explicit(
    row: Row, prompt: str | Turns, *, chat: bool, system: str | None, tools: list, notes: list[str]
) -> Record:
    """A pair with a given prompt (explicit, sharegpt and alpaca layouts)."""
    if not chat and isinstance(prompt, str) and all(_is_text(row[side]) for side in SIDES):
        chosen, rejected = (_text_side(row[side], side, notes) for side in SIDES)
        _identical(chosen, rejected)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    given = _as_turns(prompt)
    if not given:
        raise BadRow("empty:prompt", f"the prompt is empty; {_CHAT_NEEDS_PROMPT}")
    full = _with_system(given, system)
    answers = {}
    for side in SIDES:
        turns = normalize_side(row[side], side, notes)
        answers[side] = _split_whole(turns, [given, full] if full is not given else [given], side)
    _identical(answers["chosen"], answers["rejected"])
    for side in SIDES:
        _check_answer(
            answers[side], side, "chat_role_order", "put earlier turns in the prompt", empty=f"empty:{side}"
        )
        _check_order(full, answers[side], side)
    return _chat_record(full, answers, tools)


def _implicit(row: Row, *, system: str | None, tools: list, notes: list[str]) -> Record:
    """A pair of whole conversations: the prompt is their longest shared beginning."""
    sides = {}
    for side in SIDES:
        value = row[side]
        if not isinstance(value, list) and not (isinstance(value, str) and not value.strip()):
            raise BadRow(
                "missing:prompt",
                f"{side} is a {_kind(value)}, not a whole conversation, and the row has no prompt: give the "
                "prompt in a prompt column, or chosen and rejected as whole conversations (lists of turns) "
                "that share their prompt",
            )
        sides[side] = normalize_side(value, side, notes)
    chosen, rejected = sides["chosen"], sides["rejected"]
    _identical(chosen, rejected)
    n = _first_difference(chosen, rejected)

    def turn(turns: Turns) -> str:
        return _a_turn(turns[n]["role"]) if n < len(turns) else "no turn (it ends there)"

    where = f"they differ at turn {n} (chosen: {turn(chosen)}, rejected: {turn(rejected)})"
    if n == 0:
        raise BadRow("prompt_mismatch", f"chosen and rejected share no prompt: {where}")
    if chosen[n - 1]["role"] not in ("user", "tool"):
        raise BadRow(
            "prompt_mismatch",
            f"chosen and rejected share turns 0-{n - 1}, which end with {_a_turn(chosen[n - 1]['role'])}, and "
            f"{where}: the shared prompt must end with the user (or tool) turn the answers reply to",
        )
    prompt = _with_system(chosen[:n], system)
    answers = {"chosen": chosen[n:], "rejected": rejected[n:]}
    for side in SIDES:
        _check_answer(
            answers[side], side, "prompt_mismatch", f"{where}; a pair shares every turn before its answer"
        )
        _check_order(prompt, answers[side], side)
    return _chat_record(prompt, answers, tools)


def _chat_record(prompt: Turns, answers: dict[str, Turns], tools: list) -> Record:
    record: Record = {"prompt": prompt, "chosen": answers["chosen"], "rejected": answers["rejected"]}
    if tools:
        record["tools"] = tools
    return record


def normalize_pair(
    row: Row,
    layout: str,
    *,
    alpaca: AlpacaSpec | None = None,
    chat: bool = False,
    allow_empty_prompt: bool = False,
    notes: list[str] | None = None,
) -> Record:
    """One raw row of ``layout`` -> the prepared pair record (see the module notes), or a BadRow.

    ``alpaca`` is the prompt spec of the ``alpaca`` layout (:func:`prompt_spec`); ``chat`` puts text rows
    in the chat form too (their data set has a system or tools column); ``notes`` collects
    ``coerced:<field>`` for numbers and booleans taken as text.
    """
    notes = [] if notes is None else notes
    for side in SIDES:
        if row.get(side) is None:
            raise BadRow(f"missing:{side}", f"{side} is missing or null")
    tools = normalize_tools(row.get("tools"))
    system = system_text(row.get("system"), notes)  # text, or text parts / blocks joined
    system = system if system is not None and system.strip() else None
    chat = chat or bool(tools) or system is not None
    if layout == "implicit":
        return _implicit(row, system=system, tools=tools, notes=notes)
    if layout == "alpaca":
        if alpaca is None:
            raise ValueError("the alpaca layout needs its prompt spec")
        prompt: str | Turns = alpaca_prompt(alpaca_values(row, alpaca, notes), alpaca)
    elif layout == "sharegpt":
        prompt = _given_prompt(row, "conversations", allow_empty_prompt, notes)
        if isinstance(prompt, str):  # a text in place of the conversation: the user's turn
            chat = True
    else:
        prompt = _given_prompt(row, "prompt", allow_empty_prompt, notes)
    return _explicit(
        row, prompt, chat=chat or not isinstance(prompt, str), system=system, tools=tools, notes=notes
    )


# -- converters ------------------------------------------------------------------------------------


def _pair_text(record: Record) -> str:
    parts = []
    for key in ("prompt", *SIDES):
        value = record[key]
        if isinstance(value, str):
            parts.append(value)
        else:
            parts.extend(str(m.get("content") or "") for m in value)
    return "\n".join(parts)


def _layout_keys(layout: str, spec: AlpacaSpec | None) -> set[str]:
    own = {
        "explicit": {"prompt"},
        "implicit": set(),
        "sharegpt": {"conversations"},
        "alpaca": {spec.field_mapping[f] for f in spec.used_fields if f in spec.field_mapping}
        if spec
        else set(),
    }[layout]
    return {*own, *SIDES, *CHAT_COLUMNS}


def convert_pair(
    converter: Converter,
    row: Row,
    *,
    alpaca: AlpacaSpec | None = None,
    allow_empty_prompt: bool = False,
    notes: list[str] | None = None,
) -> Record:
    """Run a converter that returns a preference row (any layout: its keys decide which) or None.

    The result is normalised as a data set row of that layout is; anything else, or keys the layout
    does not use (their values would be lost), is ``converter_bad_result``. A row's text in a field the
    templates use that does not reach the record is noted (``converter_dropped:<field>``).
    """
    notes = [] if notes is None else notes
    result = run_converter(converter, row)
    keys = sorted(map(str, result)) if isinstance(result, Mapping) else None
    if keys is None or not set(SIDES) <= set(keys):
        what = f"keys {keys}" if keys is not None else f"a {type(result).__name__}"
        raise BadRow(
            "converter_bad_result",
            f"the converter {converter.name} returned {what}; with objective: dpo it must return a "
            f"preference pair ({_SHAPES}) or None",
        )
    assert isinstance(result, Mapping)
    layout = detect_layout(keys, "auto", template_columns(alpaca))
    extra = sorted(set(keys) - _layout_keys(layout, alpaca))
    if extra:
        raise BadRow(
            "converter_bad_result",
            f"the converter {converter.name} returned keys {keys}: {extra} are not part of a preference "
            f"pair ({_SHAPES}) and would be lost",
        )
    record = normalize_pair(result, layout, alpaca=alpaca, allow_empty_prompt=allow_empty_prompt, notes=notes)
    text = _pair_text(record)
    for field_name, column in converter.watched:
        value = row.get(column)
        if isinstance(value, str) and value.strip() and value.strip() not in text:
            notes.append(f"converter_dropped:{field_name}")
    return record


# -- the format of a data set ----------------------------------------------------------------------


@dataclass(frozen=True)
class PairFormat:
    """How to turn one raw row of a data set into a pair record: its layout and what that layout needs.

    ``chat``: the data set has a system or tools column, so every row is in the chat form.
    """

    layout: str
    chat: bool = False
    alpaca: AlpacaSpec | None = None
    converter: Converter | None = None
    allow_empty_prompt: bool = False

    @property
    def kind(self) -> str:
        """The format's name in the manifest: ``pairs:<layout>``."""
        return f"pairs:{self.layout}"

    def __call__(self, row: Row, notes: list[str] | None = None) -> Record:
        """The pair record of ``row``; ``notes`` collects what was changed on the way (``coerced:<field>``)."""
        if self.converter is not None:
            return convert_pair(
                self.converter,
                row,
                alpaca=self.alpaca,
                allow_empty_prompt=self.converter.allow_empty_prompt,
                notes=notes,
            )
        return normalize_pair(
            row,
            self.layout,
            alpaca=self.alpaca,
            chat=self.chat,
            allow_empty_prompt=self.allow_empty_prompt,
            notes=notes,
        )

    def required_columns(self) -> list[str]:
        """Columns that must exist in the data set for this layout."""
        own = {
            "explicit": ["prompt"],
            "sharegpt": ["conversations"],
            "alpaca": template_columns(self.alpaca),
        }.get(self.layout, [])
        return [] if self.layout == "converter" else [*own, *SIDES]


def pair_format(data: DataConfig, columns: Iterable[str], converter: Converter | None = None) -> PairFormat:
    """The preference layout of a data set with these columns under this configuration."""
    names = list(columns)
    spec = prompt_spec(AlpacaSpec.from_config(data))
    if converter is not None:
        watched = tuple((name, column) for name, column in converter.watched if column in names)
        return PairFormat("converter", alpaca=spec, converter=dataclasses.replace(converter, watched=watched))
    layout = detect_layout(names, data.data_format, template_columns(spec))
    return PairFormat(
        layout,
        chat=any(c in names for c in CHAT_COLUMNS),
        alpaca=spec if layout == "alpaca" else None,
        allow_empty_prompt=data.allow_empty_prompt,
    )


def pair_columns_problem(fmt: PairFormat, columns: Sequence[str]) -> str | None:
    """Why a data set with these columns cannot give pairs in ``fmt`` (a message saying what to do), or
    None."""
    if fmt.layout == "converter":
        return None
    names = set(columns)
    sides = [side for side in SIDES if side not in names]
    if sides:
        return (
            f"objective is 'dpo', but it has no {' or '.join(repr(s) for s in sides)} column (its columns are "
            f"{list(columns)}): preference tuning needs a chosen and a rejected answer per row, and {LAYOUT_HELP}. "
            "Give preference data, a converter that returns pairs, or set objective: sft for prompt/answer data"
        )
    missing = [c for c in fmt.required_columns() if c not in names]
    if not missing:
        return None
    if fmt.layout == "alpaca" and fmt.alpaca is not None:
        named = ", ".join(
            f"{c!r} (field_mapping {f}: {c})" for f, c in fmt.alpaca.field_mapping.items() if c in missing
        )
        fix = "map each template field to an existing column in field_mapping, or give a prompt column"
    else:
        named = ", ".join(repr(c) for c in missing)
        fix = f"set data_format to the layout of the data, or give a converter; {LAYOUT_HELP}"
    return (
        f"no column {named} for its preference layout {fmt.layout!r}; its columns are {list(columns)}. {fix}"
    )


def sft_columns_problem(fmt: RowFormat, columns: Sequence[str]) -> str | None:
    """Why a data set with these columns is preference data given to an SFT objective, or None."""
    names = set(columns)
    sides = [side for side in SIDES if side in names]
    if not sides or fmt.kind == "converter" or any(side in fmt.required_columns() for side in SIDES):
        return None
    answers = {"output", "messages"}
    if fmt.alpaca is not None and "output" in fmt.alpaca.field_mapping:
        answers.add(fmt.alpaca.field_mapping["output"])
    if answers & names:
        return None
    return (
        f"its rows hold {' and '.join(repr(s) for s in sides)} (preference pairs) but no 'output' or "
        f"'messages' column (its columns are {list(columns)}), and objective is 'sft'. Set objective: dpo to "
        "tune on the pairs, or give prompt/answer data (or a converter that returns prompt/answer records)"
    )
