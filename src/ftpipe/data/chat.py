"""Chat rows in one internal form: OpenAI-style messages and ShareGPT conversations, with tool calls,
tool results and reasoning traces.

The internal form of a conversation (what ``ftpipe prepare`` writes and the tokenizer renders)::

    {"messages": [
        {"role": "system", "content": "..."},                      # optional, first
        {"role": "user", "content": "..."},
        {"role": "assistant", "content": "...",                    # "" when the turn only calls tools
         "reasoning_content": "...",                               # only when the turn has a trace
         "tool_calls": [{"type": "function",                       # only when the turn calls tools
                         "function": {"name": "...", "arguments": {...}}, "id": "..."}]},
        {"role": "tool", "content": "...", "name": "...", "tool_call_id": "..."},   # name / id optional
        ...],
     "tools": [{"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}]}

Layouts read:

* **OpenAI messages** (``messages``): roles system / user / assistant / tool; assistant ``tool_calls``
  (``arguments`` an object or a JSON string; ``content`` empty or null), the legacy ``function_call``
  field and ``function`` role; ``reasoning_content`` or ``thinking`` beside ``content``.
* **ShareGPT** (``conversations`` of ``from`` / ``value``): system, human, gpt, ``function_call`` (the
  assistant calling tools: a JSON object ``{"name", "arguments"}`` or a list of them) and ``observation``
  (the tool's result); a top-level ``system`` string.
* **Content parts** (:func:`read_content`): a message's content may be a list of parts (or one part
  object) instead of a string: OpenAI chat completions ``text`` parts, the Responses API's
  ``input_text`` / ``output_text`` parts and ``refusal`` parts (the assistant's words, trained like
  text), and Anthropic Messages blocks: ``text``; ``thinking`` (the assistant's reasoning trace);
  ``tool_use`` (a tool call, ``input`` its arguments); ``tool_result`` in a user message (a tool
  turn linked by ``tool_use_id``; its ``content`` text or text blocks; ``is_error`` is not kept, the
  result's text says what failed). The text parts of one message are joined with one newline
  (:data:`PART_JOIN`), as vLLM flattens text parts for a template that takes text content, so the
  trained text is what an OpenAI-compatible server shows the model at inference. A user message's
  tool results become tool turns before its text, which follows as a user turn (Anthropic requires
  the results first). A part ftpipe cannot train on (images, audio, files, documents, redacted
  thinking, an unknown type) is a bad row ``unsupported_part:<type>``; a part in a role the API does
  not put it in (a ``tool_use`` in a user message) is ``misplaced_part:<type>``.
* Both: a ``tools`` column (a list of function schemas, Anthropic's ``input_schema`` taken as
  ``parameters``, or a JSON string of one), a top-level ``system`` (text or text parts; ShareGPT and
  Anthropic keep the system prompt outside the turns) used when the turns have no system turn, and a
  reasoning trace as ``<think>...</think>`` at the start of an assistant's content. ``developer`` (the
  newer OpenAI name) is a system turn.

One rule for the order of turns (:func:`check_role_order`): an optional first system turn, then user
and assistant alternating from user, where an assistant turn that calls tools is followed by one or
more tool results and then by the assistant again (or by the user, who may speak before the answer).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ftpipe.data.errors import BadRow
from ftpipe.data.jsonscan import MAX_DEPTH, too_deep

ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT ``from`` values -> internal roles (``function_call`` is an assistant turn that calls tools).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
#: OpenAI ``role`` values -> internal roles (``developer`` is the newer name of ``system``, ``function``
#: the legacy tool-result role).
MESSAGE_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_TOO_DEEP = object()
#: Content-part types whose ``text`` is message text: chat completions and Anthropic (``text``) and the
#: Responses API (``input_text``, ``output_text``).
TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
#: Parts the APIs put in one role only -> that role (elsewhere they are ``misplaced_part:<type>``).
PART_ROLES = {"refusal": "assistant", "thinking": "assistant", "tool_use": "assistant", "tool_result": "user"}
#: What joins the text parts (and the thinking blocks) of one message: one newline, as vLLM (and other
#: OpenAI-compatible servers) flatten text parts for a chat template that takes text content.
PART_JOIN = "\n"
_PART_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def as_text(value: Any, field: str, notes: list[str], where: str) -> str | None:
    """A text value as a string: a string as it is, a JSON number or boolean as its JSON text (noted as
    ``coerced:<field>``); None stays None; a list or an object is a bad row ``not_string:<field>``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        notes.append(f"coerced:{field}")
        return "true" if value else "false"
    if isinstance(value, int | float) and not (isinstance(value, float) and not math.isfinite(value)):
        notes.append(f"coerced:{field}")
        return json.dumps(value)
    raise BadRow(f"not_string:{field}", f"{where} is a {type(value).__name__}, not text")


def _parse_json(value: Any, reason: str, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise BadRow(reason, f"{what} is not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        parsed = _TOO_DEEP
    if parsed is _TOO_DEEP or too_deep(parsed, value):
        raise BadRow(reason, f"{what} nests lists or objects more than {MAX_DEPTH} levels deep")
    return parsed


def normalize_tools(value: Any) -> list[dict[str, Any]]:
    """A ``tools`` column (a list of function schemas, or a JSON string of one) -> ``[{"type": "function",
    "function": {...}}]``; empty or missing -> ``[]``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    tools = _parse_json(value, "tools_invalid", "the tools column")
    if isinstance(tools, Mapping):
        tools = [tools]
    if not isinstance(tools, list):
        raise BadRow(
            "tools_invalid", f"the tools column is a {type(tools).__name__}, not a list of functions"
        )
    normalized = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise BadRow("tools_invalid", f"tool {i} is a {type(tool).__name__}, not a function schema")
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        function = function if isinstance(function, Mapping) else tool
        if not isinstance(function.get("name"), str) or not function["name"].strip():
            raise BadRow("tools_invalid", f"tool {i} has no function name")
        normalized.append({"type": "function", "function": _function_schema(function)})
    return normalized


def _function_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    """A function schema as templates read it: Anthropic's ``input_schema`` becomes ``parameters`` (in
    its place), and its API-only keys (``type``, ``cache_control``) are left out."""
    if "input_schema" not in function or "parameters" in function:
        return dict(function)
    return {
        ("parameters" if key == "input_schema" else key): value
        for key, value in function.items()
        if key not in ("type", "cache_control")
    }


def _one_call(call: Any, where: str) -> dict[str, Any]:
    """``{"name", "arguments"}`` / ``{"type": "function", "function": {...}, "id"}`` -> the internal call."""
    if not isinstance(call, Mapping):
        raise BadRow("tool_call_invalid", f"{where}: a tool call is a {type(call).__name__}, not an object")
    function = call.get("function") if isinstance(call.get("function"), Mapping) else call
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRow("tool_call_invalid", f"{where}: a tool call has no function name")
    arguments = function.get("arguments", function.get("parameters", {}))
    arguments = _parse_json(arguments, "tool_call_invalid", f"{where}: the arguments of {name!r}")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise BadRow(
            "tool_call_invalid",
            f"{where}: the arguments of {name!r} are a {type(arguments).__name__}, not a JSON object",
        )
    normalized: dict[str, Any] = {
        "type": "function",
        "function": {"name": name, "arguments": dict(arguments)},
    }
    if isinstance(call.get("id"), str) and call["id"]:
        normalized["id"] = call["id"]
    return normalized


def normalize_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls (a list, one call, or a JSON string of either) -> internal calls (at least one)."""
    calls = _parse_json(value, "tool_call_invalid", f"{where}: the tool call")
    if isinstance(calls, Mapping):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise BadRow("tool_call_invalid", f"{where}: no tool call (expected an object or a list of them)")
    return [_one_call(call, where) for call in calls]


def split_think(content: str, where: str) -> tuple[str | None, str]:
    """``<think>trace</think>answer`` -> (trace, answer); content without a leading trace -> (None, content)."""
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN):
        return None, content
    end = stripped.find(THINK_CLOSE)
    if end < 0:
        raise BadRow(
            "reasoning_unclosed", f"{where}: the content starts with {THINK_OPEN} but has no {THINK_CLOSE}"
        )
    return stripped[len(THINK_OPEN) : end].strip(), stripped[end + len(THINK_CLOSE) :].lstrip()


@dataclass
class Content:
    """A message's content once read: its text (None when it has none), and from Anthropic blocks its
    reasoning trace (``thinking``), tool calls (``tool_use``) and tool results (``tool_result``, as tool
    turns)."""

    text: str | None = None
    reasoning: str | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)


def _part_list(raw: Any, where: str) -> list[Mapping[str, Any]] | None:
    """``raw`` as a list of content parts (one part object, with a ``type``, as a list of one); None when
    it is not parts."""
    if isinstance(raw, Mapping):
        return [raw] if "type" in raw else None
    if not isinstance(raw, list):
        return None
    for j, part in enumerate(raw):
        if not isinstance(part, Mapping):
            raise BadRow(
                "not_string:content",
                f"{where} is a list holding a {type(part).__name__} (part {j}), not text or content "
                'parts (objects such as {"type": "text", "text": "..."})',
            )
    return raw


def _part_type(part: Mapping[str, Any]) -> str:
    """The part's ``type`` as a reason key suffix: ``untyped`` when it has none, ``unknown`` when it is
    not a short name (a reason key must stay one of a few)."""
    kind = part.get("type")
    if kind is None:
        return "untyped"
    return kind if isinstance(kind, str) and _PART_TYPE.fullmatch(kind) else "unknown"


def _part_text(part: Mapping[str, Any], key: str, where: str, notes: list[str]) -> str:
    """The text a part holds under ``key``; a part without it is a bad row ``not_string:content``."""
    text = as_text(part.get(key), "content", notes, f"{where}: {key}")
    if text is None:
        raise BadRow("not_string:content", f"{where} has no {key!r} (the part's text)")
    return text


def _a(word: str) -> str:
    """``word`` with its article: an image_url, a file, a user."""
    return f"{'an' if word[0] in 'aeiou' and not word.startswith('us') else 'a'} {word}"


def _unsupported_part(kind: str, where: str) -> BadRow:
    what = "has no type" if kind == "untyped" else f"is {_a(kind)} part"
    return BadRow(
        f"unsupported_part:{kind}",
        f"{where} {what}, which ftpipe cannot train on (it trains on text: text, input_text, output_text "
        "and refusal parts, and Anthropic text, thinking, tool_use and tool_result blocks); remove the "
        "part, or give what it holds as a text part",
    )


def _tool_use(part: Mapping[str, Any], where: str) -> dict[str, Any]:
    """An Anthropic ``tool_use`` block -> an internal tool call (``input`` is its arguments)."""
    call = {"name": part.get("name"), "arguments": part.get("input") or {}, "id": part.get("id")}
    return _one_call(call, where)


def _tool_result(part: Mapping[str, Any], where: str, notes: list[str]) -> dict[str, Any]:
    """An Anthropic ``tool_result`` block -> a tool turn linked to its call by ``tool_call_id``."""
    raw = part.get("content")
    text = read_content(raw, "tool", f"{where}: content", notes).text if raw is not None else None
    message: dict[str, Any] = {"role": "tool", "content": text or ""}
    if isinstance(part.get("tool_use_id"), str) and part["tool_use_id"]:
        message["tool_call_id"] = part["tool_use_id"]
    return message


def read_content(raw: Any, role: str, where: str, notes: list[str]) -> Content:
    """A message's content (``where`` names it) read for a ``role`` turn: text as :func:`as_text` reads
    it, or content parts (see the module notes), their text joined with :data:`PART_JOIN`."""
    parts = _part_list(raw, where)
    if parts is None:
        return Content(text=as_text(raw, "content", notes, where))
    content = Content()
    texts: list[str] = []
    traces: list[str] = []
    for j, part in enumerate(parts):
        kind, at = _part_type(part), f"{where} part {j}"
        owner = PART_ROLES.get(kind)
        if owner is not None and owner != role:
            raise BadRow(
                f"misplaced_part:{kind}",
                f"{at} is {_a(kind)} part in {_a(role)} turn; the API puts it only in {_a(owner)} message",
            )
        if kind in TEXT_PARTS or kind == "refusal":
            texts.append(_part_text(part, "text" if kind != "refusal" else "refusal", at, notes))
        elif kind == "thinking":
            traces.append(_part_text(part, "thinking", at, notes))
        elif kind == "tool_use":
            content.calls.append(_tool_use(part, at))
        elif kind == "tool_result":
            content.results.append(_tool_result(part, at, notes))
        else:
            raise _unsupported_part(kind, at)
    content.text = PART_JOIN.join(texts) if texts else None
    content.reasoning = PART_JOIN.join(traces) if traces else None
    return content


def _text_parts_only(raw: Any) -> bool:
    """True when ``raw`` is one text part or a non-empty list of them (a tool result given as parts)."""
    parts = [raw] if isinstance(raw, Mapping) else raw
    return (
        isinstance(parts, list)
        and bool(parts)
        and all(isinstance(p, Mapping) and p.get("type") in TEXT_PARTS for p in parts)
    )


def _tool_turn(turn: Mapping[str, Any], raw: Any, where: str, notes: list[str]) -> dict[str, Any]:
    """A tool-result turn: text, text parts (joined), or a structured result (its JSON text)."""
    if _text_parts_only(raw):
        content = read_content(raw, "tool", where, notes).text
    elif isinstance(raw, Mapping | list):
        content = json.dumps(raw, ensure_ascii=False)
    else:
        content = as_text(raw, "content", notes, where)
    message: dict[str, Any] = {"role": "tool", "content": content or ""}
    for key in ("name", "tool_call_id"):
        if isinstance(turn.get(key), str) and turn[key]:
            message[key] = turn[key]
    return message


def _assistant(turn: Mapping[str, Any], content: Content, where: str, notes: list[str]) -> dict[str, Any]:
    """An assistant turn: its text (or, when it has none, its ``refusal``), its reasoning trace (the
    ``reasoning_content`` / ``thinking`` field, else thinking blocks, else a leading ``<think>``) and
    its tool calls (the ``tool_calls`` / ``function_call`` field, then ``tool_use`` blocks)."""
    text = content.text
    if not (text or "").strip() and isinstance(turn.get("refusal"), str):
        text = turn["refusal"]
    message: dict[str, Any] = {"role": "assistant", "content": text or ""}
    trace = turn.get("reasoning_content", turn.get("thinking"))
    trace = as_text(trace, "reasoning_content", notes, f"{where}: reasoning_content")
    trace = trace if trace is not None else content.reasoning
    in_content, rest = split_think(message["content"], where)
    if in_content is not None:
        message["content"] = rest
        trace = trace if trace is not None else in_content
    if trace is not None:
        message["reasoning_content"] = trace.strip()
    calls = turn.get("tool_calls") or turn.get("function_call")
    tool_calls = [*(normalize_tool_calls(calls, where) if calls else []), *content.calls]
    if tool_calls:
        message["tool_calls"] = tool_calls
    if not message["content"].strip() and "tool_calls" not in message:
        raise BadRow("chat_empty_content", f"{where} (assistant): empty content")
    return message


def _turn_role(turn: Mapping[str, Any], role_key: str, role_names: Mapping[str, str], where: str) -> str:
    """The internal role of a turn; a BadRow ``chat_unknown_role`` naming the allowed ones."""
    raw_role = turn.get(role_key)
    role = role_names.get(raw_role) if isinstance(raw_role, str) else None
    if role is not None:
        return role
    hint = ""
    if raw_role is None and isinstance(turn.get("type"), str) and turn["type"] != "message":
        hint = (
            f"; a Responses API {turn['type']!r} item? Only message items are read: give tool calls as an "
            "assistant turn's tool_calls and their results as tool turns"
        )
    raise BadRow(
        "chat_unknown_role",
        f"{where}: unknown {role_key} {raw_role!r} (allowed: {sorted(role_names)}){hint}",
    )


def _sharegpt_call(messages: list[dict[str, Any]], raw: Any, where: str) -> None:
    """A ShareGPT ``function_call`` turn (its value is the call itself): joined to the assistant's text
    just before it, else a turn of its own."""
    calls = normalize_tool_calls(raw, where)
    previous = messages[-1] if messages else None
    if previous and previous["role"] == "assistant" and "tool_calls" not in previous:
        previous["tool_calls"] = calls  # text then a call: one assistant turn
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": calls})


def normalize_turns(
    turns: Any,
    *,
    role_key: str,
    content_key: str,
    role_names: Mapping[str, str],
    notes: list[str],
) -> list[dict[str, Any]]:
    """Chat turns of either layout -> internal messages (order not yet checked).

    A user message holding Anthropic ``tool_result`` blocks gives its tool turns first, then its text
    (if any) as a user turn.
    """
    if not isinstance(turns, list) or not turns:
        raise BadRow("chat_no_messages", "the conversation is missing, empty or not a list of turns")
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        where = f"turn {i}"
        if not isinstance(turn, Mapping):
            raise BadRow("chat_bad_turn", f"{where} is a {type(turn).__name__}, not an object")
        role = _turn_role(turn, role_key, role_names, where)
        raw = turn.get(content_key)
        if turn.get(role_key) == "function_call":
            _sharegpt_call(messages, raw, where)
        elif role == "tool":
            messages.append(_tool_turn(turn, raw, f"{where}: {content_key}", notes))
        else:
            content = read_content(raw, role, f"{where}: {content_key}", notes)
            if role == "assistant":
                messages.append(_assistant(turn, content, where, notes))
                continue
            messages.extend(content.results)
            text = content.text
            if content.results and not (text and text.strip()):
                continue  # a user message holding only tool results
            if text is None or not text.strip():
                raise BadRow("chat_empty_content", f"{where} ({role}): empty {content_key}")
            messages.append({"role": role, "content": text})
    return messages


def check_role_order(messages: list[dict[str, Any]], *, final_answer: bool = True) -> None:
    """The one rule for the order of turns; a BadRow naming the turn when it is broken.

    An optional first system turn; then user and assistant alternating from user; an assistant turn
    with ``tool_calls`` is followed by one or more tool turns, then by the assistant, or by the user
    (who may speak before the answer, as in an Anthropic message holding tool results and text). With
    ``final_answer`` the last turn must be the assistant's (it is what the model learns; it may be a
    tool call); without it, trailing user or tool turns are allowed (they are left out of training).
    """
    if not messages:
        raise BadRow("chat_no_messages", "the conversation has no turns")
    expected: tuple[str, ...] = ("user",)
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "system" and i == 0:
            continue
        if role not in expected:
            first = i == 0 or (i == 1 and messages[0]["role"] == "system")
            if role == "system":
                what, reason = "a system turn is only allowed as the first turn", "chat_role_order"
            elif role == "tool":
                what = "a tool result with no tool call before it (an assistant turn with tool_calls, or a function_call turn, must come first)"
                reason = "chat_tool_without_call"
            elif expected == ("tool",):
                what = f"the tool calls of turn {i - 1} have no result (a tool / observation turn must follow them)"
                reason = "chat_call_without_result"
            elif first:
                what, reason = f"the conversation starts with an {role} turn", "chat_role_order"
            else:
                what, reason = f"two {role} turns in a row", "chat_role_order"
            raise BadRow(reason, f"turn {i}: {what} (turns must alternate user, assistant, ...)")
        if role == "user":
            expected = ("assistant",)
        elif role == "assistant":
            expected = ("tool",) if msg.get("tool_calls") else ("user",)
        else:  # tool
            expected = ("tool", "assistant", "user")
    last = messages[-1]["role"]
    if final_answer and last != "assistant":
        raise BadRow(
            "chat_role_order" if last != "tool" else "chat_call_without_answer",
            f"the last turn is a {last} turn (must be assistant: it is what the model learns)",
        )


def normalize_chat_row(
    row: Mapping[str, Any], data_format: str, notes: list[str] | None = None
) -> dict[str, Any]:
    """A ``messages`` or ShareGPT ``conversations`` row -> ``{"messages", "tools"?}`` in the internal form.

    A top-level ``system`` (ShareGPT's string, Anthropic's text or text blocks) becomes the first turn
    when there is none. ``notes`` collects ``coerced:<field>`` for numbers and booleans taken as text.
    """
    notes = [] if notes is None else notes
    if data_format == "messages":
        messages = normalize_turns(
            row.get("messages"), role_key="role", content_key="content", role_names=MESSAGE_ROLES, notes=notes
        )
    else:
        messages = normalize_turns(
            row.get("conversations"),
            role_key="from",
            content_key="value",
            role_names=SHAREGPT_ROLES,
            notes=notes,
        )
    system = system_text(row.get("system"), notes)
    if system and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    check_role_order(messages)
    record: dict[str, Any] = {"messages": messages}
    tools = normalize_tools(row.get("tools"))
    if tools:
        record["tools"] = tools
    return record


def system_text(value: Any, notes: list[str]) -> str | None:
    """A row's top-level ``system``: text (``coerced:system`` for a number), or text parts joined."""
    if isinstance(value, Mapping | list):
        return read_content(value, "system", "the system column", notes).text
    return as_text(value, "system", notes, "the system column")


def uses_tools(record: Mapping[str, Any]) -> bool:
    """True when a prepared chat row has tool schemas, tool calls or tool results."""
    if record.get("tools"):
        return True
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in record.get("messages") or ())


def has_reasoning(record: Mapping[str, Any]) -> bool:
    """True when an assistant turn of a prepared chat row carries a reasoning trace."""
    return any(m.get("reasoning_content") is not None for m in record.get("messages") or ())
