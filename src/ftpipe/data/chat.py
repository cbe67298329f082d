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
* Both: a ``tools`` column (a list of function schemas or a JSON string of one), and a reasoning trace
  as ``<think>...</think>`` at the start of an assistant's content.

One rule for the order of turns (:func:`check_role_order`): an optional first system turn, then user
and assistant alternating from user, where an assistant turn that calls tools is followed by one or
more tool results and then by the assistant again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
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
#: OpenAI ``role`` values -> internal roles (``function`` is the legacy tool-result role).
MESSAGE_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_TOO_DEEP = object()


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
        normalized.append({"type": "function", "function": dict(function)})
    return normalized


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


def _assistant(turn: Mapping[str, Any], content: str | None, where: str, notes: list[str]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content or ""}
    trace = turn.get("reasoning_content", turn.get("thinking"))
    trace = as_text(trace, "reasoning_content", notes, f"{where}: reasoning_content")
    in_content, rest = split_think(message["content"], where)
    if in_content is not None:
        message["content"] = rest
        trace = trace if trace is not None else in_content
    if trace is not None:
        message["reasoning_content"] = trace.strip()
    calls = turn.get("tool_calls") or turn.get("function_call")
    if calls:
        message["tool_calls"] = normalize_tool_calls(calls, where)
    if not message["content"].strip() and "tool_calls" not in message:
        raise BadRow("chat_empty_content", f"{where} (assistant): empty content")
    return message


def normalize_turns(
    turns: Any,
    *,
    role_key: str,
    content_key: str,
    role_names: Mapping[str, str],
    notes: list[str],
) -> list[dict[str, Any]]:
    """Chat turns of either layout -> internal messages (order not yet checked)."""
    if not isinstance(turns, list) or not turns:
        raise BadRow("chat_no_messages", "the conversation is missing, empty or not a list of turns")
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        where = f"turn {i}"
        if not isinstance(turn, Mapping):
            raise BadRow("chat_bad_turn", f"{where} is a {type(turn).__name__}, not an object")
        raw_role = turn.get(role_key)
        role = role_names.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise BadRow(
                "chat_unknown_role",
                f"{where}: unknown {role_key} {raw_role!r} (allowed: {sorted(role_names)})",
            )
        raw = turn.get(content_key)
        if raw_role == "function_call":  # ShareGPT: the value is the call itself
            message = {"role": "assistant", "content": "", "tool_calls": normalize_tool_calls(raw, where)}
            previous = messages[-1] if messages else None
            if previous and previous["role"] == "assistant" and "tool_calls" not in previous:
                previous["tool_calls"] = message["tool_calls"]  # text then a call: one assistant turn
                continue
            messages.append(message)
            continue
        if role == "tool" and isinstance(raw, Mapping | list):  # a structured tool result: its JSON text
            raw = json.dumps(raw, ensure_ascii=False)
        content = as_text(raw, "content", notes, f"{where}: {content_key}")
        if role == "assistant":
            messages.append(_assistant(turn, content, where, notes))
            continue
        if role == "tool":
            message = {"role": "tool", "content": content or ""}
            for key in ("name", "tool_call_id"):
                if isinstance(turn.get(key), str) and turn[key]:
                    message[key] = turn[key]
            messages.append(message)
            continue
        if content is None or not content.strip():
            raise BadRow("chat_empty_content", f"{where} ({role}): empty {content_key}")
        messages.append({"role": role, "content": content})
    return messages


def check_role_order(messages: list[dict[str, Any]], *, final_answer: bool = True) -> None:
    """The one rule for the order of turns; a BadRow naming the turn when it is broken.

    An optional first system turn; then user and assistant alternating from user; an assistant turn
    with ``tool_calls`` is followed by one or more tool turns, then by the assistant. With
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
            expected = ("tool", "assistant")
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

    A ShareGPT row's top-level ``system`` string becomes the first turn when there is none.
    ``notes`` collects ``coerced:<field>`` for numbers and booleans taken as text.
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
        system = as_text(row.get("system"), "system", notes, "the system column")
        if system and system.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    check_role_order(messages)
    record: dict[str, Any] = {"messages": messages}
    tools = normalize_tools(row.get("tools"))
    if tools:
        record["tools"] = tools
    return record


def uses_tools(record: Mapping[str, Any]) -> bool:
    """True when a prepared chat row has tool schemas, tool calls or tool results."""
    if record.get("tools"):
        return True
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in record.get("messages") or ())


def has_reasoning(record: Mapping[str, Any]) -> bool:
    """True when an assistant turn of a prepared chat row carries a reasoning trace."""
    return any(m.get("reasoning_content") is not None for m in record.get("messages") or ())
