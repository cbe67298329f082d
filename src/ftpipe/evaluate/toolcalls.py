"""Scores of generated tool calls against the reference calls of test samples.

A generated answer's calls are read from ``<tool_call>...</tool_call>`` blocks (the tags of
``chatml-tools`` and of Hermes / Qwen templates; a last block cut off before its closing tag counts),
else from the answer as one JSON object or list of objects (Llama 3.1 and Mistral style). A call is
``{"name": ..., "arguments": {...}}``; ``parameters`` for ``arguments``, arguments given as a JSON
string and the OpenAI ``{"type": "function", "function": {...}}`` wrapper are accepted.

Per sample whose reference answer is a tool call:

* ``tool_call_parsed``: the answer holds at least one call and every call in it parses;
* ``tool_call_name``: the called functions are the reference's (as a multiset);
* ``tool_call_exact``: the calls equal the reference's, names and JSON-equal arguments (in any order).
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ftpipe.data.chat import split_think

#: one ``<tool_call>`` block (the last one may lack its closing tag).
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
TOOL_METRICS = ("tool_call_parsed", "tool_call_name", "tool_call_exact")

Call = dict[str, Any]


def _as_call(obj: Any) -> Call | None:
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("function"), Mapping):
        obj = obj["function"]
    name = obj.get("name")
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(arguments, Mapping):
        return None
    return {"name": name, "arguments": dict(arguments)}


def parse_tool_calls(text: str) -> tuple[list[Call], bool]:
    """The calls in a generated answer, and whether every call-shaped part of it parsed."""
    try:
        _, text = split_think(text, "answer")
    except ValueError:  # an unclosed trace: no answer after it
        return [], False
    blocks = TOOL_CALL_BLOCK.findall(text)
    if not blocks:
        stripped = text.strip()
        if not stripped.startswith(("{", "[")):
            return [], False
        blocks = [stripped]
    calls: list[Call] = []
    ok = True
    for block in blocks:
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError:
            ok = False
            continue
        for item in obj if isinstance(obj, list) else [obj]:
            call = _as_call(item)
            if call is None:
                ok = False
            else:
                calls.append(call)
    return calls, ok and bool(calls)


def _canonical(value: Any) -> Any:
    """A JSON value in a form where equal JSON values are equal (``1`` and ``1.0`` alike; ``true`` is not 1)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _key(call: Call) -> str:
    return json.dumps(_canonical(call), sort_keys=True, ensure_ascii=False)


def score_tool_calls(
    predictions: Sequence[str], references: Sequence[Sequence[Call] | None]
) -> dict[str, Any]:
    """Per-sample and mean tool-call scores over the samples whose reference is a tool call.

    Returns ``{"num_samples", "indices", "per_sample": {metric: [..]}, "mean": {metric: float}}``;
    ``indices`` are the positions (in ``predictions``) of the scored samples.
    """
    indices = [i for i, ref in enumerate(references) if ref]
    per_sample: dict[str, list[float]] = {name: [] for name in TOOL_METRICS}
    for i in indices:
        calls, parsed = parse_tool_calls(predictions[i])
        reference = [{"name": c["name"], "arguments": dict(c["arguments"])} for c in references[i] or ()]
        per_sample["tool_call_parsed"].append(float(parsed))
        names_equal = Counter(c["name"] for c in calls) == Counter(c["name"] for c in reference)
        per_sample["tool_call_name"].append(float(parsed and names_equal))
        exact = parsed and sorted(map(_key, calls)) == sorted(map(_key, reference))
        per_sample["tool_call_exact"].append(float(exact))
    return {
        "num_samples": len(indices),
        "indices": indices,
        "per_sample": per_sample,
        "mean": {name: statistics.fmean(v) for name, v in per_sample.items()} if indices else {},
    }
