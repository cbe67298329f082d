"""Seeded conversations written in three API layouts, with the internal form and the trained text each
must give.

One :class:`Conversation` (system text, rounds of user text, tool calls and results, reasoning, answers)
is drawn from a seeded generator and written as:

* OpenAI chat completions: system and user content as text parts (a list, one part object, or a plain
  string), assistant content a string (null when it only calls tools), ``tool_calls`` with JSON-string
  ``arguments``, tool messages linked by ``tool_call_id``, ``reasoning_content``;
* the Responses API's message items: developer and user content as ``input_text`` parts, assistant
  content as ``output_text`` parts (no tools: the Responses API gives those as items of their own);
* Anthropic Messages: a top-level ``system`` (text blocks or a string), assistant ``thinking`` /
  ``text`` / ``tool_use`` blocks, ``tool_result`` blocks (a string or text blocks) in user messages,
  tools with ``input_schema``.

:func:`internal` writes the expected internal form from the conversation itself, with the join rule
spelled out here (text parts joined by one newline), so a wrong join fails the tests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

FUNCTIONS = {
    "get_weather": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "calculate_tip": {
        "name": "calculate_tip",
        "description": "Tip for a bill",
        "parameters": {"type": "object", "properties": {"bill": {"type": "number"}}, "required": ["bill"]},
    },
}
_WORDS = [
    "amber",
    "bright",
    "calm",
    "distant",
    "early",
    "fresh",
    "gentle",
    "hollow",
    "quiet",
    "rapid",
    "silver",
    "tall",
    "warm",
    "yellow",
    "river",
    "garden",
    "lantern",
    "harbor",
    "meadow",
    "window",
    "bridge",
    "forest",
    "orchard",
    "valley",
    "market",
    "station",
]
_CITIES = ("Oslo", "Lyon", "Kyoto", "Lima", "Perth")
#: How a single-part message is written in turn (a list of one part, the part object, a plain string);
#: Anthropic's API takes a list of blocks or a string.
SHAPES = ("list", "object", "string")
ANTHROPIC_SHAPES = ("list", "string")


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: dict[str, Any]
    result: str


@dataclass(frozen=True)
class Round:
    """A user request and what answers it: optionally tool calls (after a ``preface`` text) whose results
    come back with an ``aside`` from the user, then the answer. ``reasoning`` is the trace of the round's
    first assistant turn."""

    user: tuple[str, ...]
    answer: str
    calls: tuple[Call, ...] = ()
    preface: str | None = None
    aside: str | None = None
    reasoning: str | None = None


@dataclass(frozen=True)
class Conversation:
    system: tuple[str, ...]
    rounds: tuple[Round, ...]
    tools: bool


def _sentence(rng: random.Random) -> str:
    words = rng.sample(_WORDS, rng.randint(2, 5))
    return " ".join(words).capitalize() + "."


def _call(rng: random.Random, call_id: str) -> Call:
    if rng.random() < 0.5:
        city = rng.choice(_CITIES)
        return Call(
            call_id, "get_weather", {"city": city}, json.dumps({"city": city, "t": rng.randint(-9, 30)})
        )
    bill = rng.randint(10, 200)
    return Call(call_id, "calculate_tip", {"bill": bill}, f"{bill * 0.15:.2f}")


def _round(rng: random.Random, name: str, tools: bool, reasoning: bool) -> Round:
    user = tuple(_sentence(rng) for _ in range(rng.randint(1, 3)))
    calls: tuple[Call, ...] = ()
    if tools and rng.random() < 0.6:
        calls = tuple(_call(rng, f"call_{name}_{k}") for k in range(rng.randint(1, 2)))
    return Round(
        user=user,
        answer=_sentence(rng),
        calls=calls,
        preface=_sentence(rng) if calls and rng.random() < 0.5 else None,
        aside=_sentence(rng) if calls and rng.random() < 0.4 else None,
        reasoning=_sentence(rng) if reasoning and rng.random() < 0.5 else None,
    )


def generate(seed: int, n: int, *, tools: bool = True, reasoning: bool = True) -> list[Conversation]:
    """``n`` conversations drawn from ``seed`` (1-3 rounds each, most with a system prompt)."""
    rng = random.Random(seed)
    conversations = []
    for i in range(n):
        system = tuple(_sentence(rng) for _ in range(rng.randint(1, 2))) if rng.random() < 0.8 else ()
        rounds = tuple(_round(rng, f"{i}_{r}", tools, reasoning) for r in range(rng.randint(1, 3)))
        conversations.append(Conversation(system, rounds, tools))
    return conversations


# --------------------------------------------------------------------------------------------------
# what each conversation must become


def internal(conv: Conversation) -> dict[str, Any]:
    """The internal form the conversation normalises to, in every layout."""
    messages: list[dict[str, Any]] = []
    if conv.system:
        messages.append({"role": "system", "content": "\n".join(conv.system)})
    for r in conv.rounds:
        messages.append({"role": "user", "content": "\n".join(r.user)})
        first: dict[str, Any] = {"role": "assistant", "content": (r.preface or "") if r.calls else r.answer}
        if r.reasoning is not None:
            first["reasoning_content"] = r.reasoning
        if r.calls:
            first["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}, "id": c.id}
                for c in r.calls
            ]
        messages.append(first)
        if r.calls:
            messages += [{"role": "tool", "content": c.result, "tool_call_id": c.id} for c in r.calls]
            if r.aside is not None:
                messages.append({"role": "user", "content": r.aside})
            messages.append({"role": "assistant", "content": r.answer})
    record: dict[str, Any] = {"messages": messages}
    if conv.tools:
        record["tools"] = [{"type": "function", "function": f} for f in FUNCTIONS.values()]
    return record


def chatml_trained(conv: Conversation) -> list[str]:
    """The trained spans of the conversation under ftpipe's ``chatml-tools`` template (reasoning: train):
    each assistant turn, its trace, text and calls, and its end token."""
    spans = []
    for r in conv.rounds:
        think = f"<think>\n{r.reasoning}\n</think>\n\n" if r.reasoning is not None else ""
        if not r.calls:
            spans.append(f"{think}{r.answer}<|im_end|>")
            continue
        calls = [
            f'<tool_call>\n{{"name": {json.dumps(c.name)}, "arguments": {json.dumps(c.arguments)}}}\n</tool_call>'
            for c in r.calls
        ]
        text = r.preface or ""
        spans.append(f"{think}{text}{chr(10) if text else ''}{chr(10).join(calls)}<|im_end|>")
        spans.append(f"{r.answer}<|im_end|>")
    return spans


def masked_texts(conv: Conversation) -> list[str]:
    """The texts that must be in the prompt and never trained: system and user text, tool results."""
    texts = ["\n".join(conv.system)] if conv.system else []
    for r in conv.rounds:
        texts.append("\n".join(r.user))
        texts += [c.result for c in r.calls]
        texts += [r.aside] if r.aside is not None else []
    return texts


# --------------------------------------------------------------------------------------------------
# the layouts


def _parts(texts: tuple[str, ...], kind: str, shape: str) -> Any:
    """Text as content parts of type ``kind``; a single text written in ``shape``."""
    parts = [{"type": kind, "text": t} for t in texts]
    if len(parts) == 1 and shape != "list":
        return parts[0] if shape == "object" else texts[0]
    return parts


def openai_row(conv: Conversation, index: int) -> dict[str, Any]:
    """The conversation as an OpenAI chat completions row."""
    messages: list[dict[str, Any]] = []
    if conv.system:
        messages.append({"role": "system", "content": _parts(conv.system, "text", "list")})
    for j, r in enumerate(conv.rounds):
        messages.append({"role": "user", "content": _parts(r.user, "text", SHAPES[(index + j) % 3])})
        first: dict[str, Any] = {"role": "assistant", "content": r.preface if r.calls else r.answer}
        if r.reasoning is not None:
            first["reasoning_content"] = r.reasoning
        if r.calls:
            first["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                }
                for c in r.calls
            ]
        messages.append(first)
        if r.calls:
            messages += [{"role": "tool", "tool_call_id": c.id, "content": c.result} for c in r.calls]
            if r.aside is not None:
                messages.append({"role": "user", "content": [{"type": "text", "text": r.aside}]})
            messages.append({"role": "assistant", "content": r.answer})
    row: dict[str, Any] = {"messages": messages}
    if conv.tools:
        row["tools"] = [{"type": "function", "function": f} for f in FUNCTIONS.values()]
    return row


def responses_row(conv: Conversation, index: int) -> dict[str, Any]:
    """The conversation (without tools or reasoning) as Responses API message items."""
    assert not conv.tools and all(r.reasoning is None for r in conv.rounds)
    messages: list[dict[str, Any]] = []
    if conv.system:
        messages.append(
            {"type": "message", "role": "developer", "content": _parts(conv.system, "input_text", "list")}
        )
    for j, r in enumerate(conv.rounds):
        shape = SHAPES[(index + j) % 3]
        messages.append({"type": "message", "role": "user", "content": _parts(r.user, "input_text", shape)})
        answer = [{"type": "output_text", "text": r.answer, "annotations": []}]
        messages.append({"type": "message", "role": "assistant", "content": answer})
    return {"messages": messages}


def anthropic_row(conv: Conversation, index: int) -> dict[str, Any]:
    """The conversation as an Anthropic Messages row (top-level system, content blocks)."""
    messages: list[dict[str, Any]] = []
    for j, r in enumerate(conv.rounds):
        messages.append(
            {"role": "user", "content": _parts(r.user, "text", ANTHROPIC_SHAPES[(index + j) % 2])}
        )
        blocks: list[dict[str, Any]] = []
        if r.reasoning is not None:
            blocks.append({"type": "thinking", "thinking": r.reasoning, "signature": f"sig{index}{j}"})
        text = r.preface if r.calls else r.answer
        if text is not None:
            blocks.append({"type": "text", "text": text})
        blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments} for c in r.calls]
        messages.append({"role": "assistant", "content": blocks})
        if r.calls:
            results: list[dict[str, Any]] = [
                {
                    "type": "tool_result",
                    "tool_use_id": c.id,
                    "content": c.result if k % 2 else [{"type": "text", "text": c.result}],
                }
                for k, c in enumerate(r.calls)
            ]
            if r.aside is not None:
                results.append({"type": "text", "text": r.aside})
            messages.append({"role": "user", "content": results})
            answer = r.answer if (index + j) % 2 else [{"type": "text", "text": r.answer}]
            messages.append({"role": "assistant", "content": answer})
    row: dict[str, Any] = {"messages": messages}
    if conv.system:
        row["system"] = _parts(conv.system, "text", ANTHROPIC_SHAPES[index % 2])
    if conv.tools:
        row["tools"] = [
            {"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}
            for f in FUNCTIONS.values()
        ]
    return row


#: layout -> (row writer, generator options)
LAYOUTS = {
    "openai": (openai_row, {}),
    "responses": (responses_row, {"tools": False, "reasoning": False}),
    "anthropic": (anthropic_row, {}),
}


def layout_rows(layout: str, seed: int, n: int) -> tuple[list[Conversation], list[dict[str, Any]]]:
    """``n`` seeded conversations and their rows in ``layout``."""
    writer, options = LAYOUTS[layout]
    conversations = generate(seed, n, **options)
    return conversations, [writer(conv, i) for i, conv in enumerate(conversations)]
