"""Row formats as pure functions: alpaca templates, chat normalisation and custom converters.

Every function takes one raw row (a mapping of column -> value, as ``datasets`` yields it) and
returns one prepared record, ``{"input": str, "output": str}`` or ``{"messages": [...]}``, or raises
:class:`~ftpipe.data.errors.BadRow` with a short reason key and a readable detail.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ftpipe.config.schema import DataConfig
from ftpipe.config.validate import template_fields
from ftpipe.data.errors import BadRow, DataError

Row = Mapping[str, Any]
Record = dict[str, Any]
Converter = Callable[[dict[str, Any]], Any]

FORMATS = ("alpaca", "messages", "sharegpt")
CHAT_ROLES = ("system", "user", "assistant")
#: ShareGPT ``from`` values -> chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


def detect_format(columns: Iterable[str]) -> str:
    """``messages`` (chat), ``sharegpt`` (``conversations``) or else ``alpaca`` (templated columns)."""
    names = set(columns)
    if "messages" in names:
        return "messages"
    if "conversations" in names:
        return "sharegpt"
    return "alpaca"


@dataclass(frozen=True)
class AlpacaSpec:
    """Templates and the template-field -> column mapping of alpaca-style rows."""

    input_template: str
    output_template: str
    field_mapping: dict[str, str]
    input_template_no_input: str | None = None
    optional_fields: tuple[str, ...] = ()
    used_fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        templates = [self.input_template, self.output_template, self.input_template_no_input or ""]
        used = dict.fromkeys(f for t in templates for f in template_fields(t))
        used.update(dict.fromkeys(self.optional_fields))
        object.__setattr__(self, "used_fields", tuple(used))

    @classmethod
    def from_config(cls, data: DataConfig) -> AlpacaSpec:
        return cls(
            input_template=data.input_template,
            output_template=data.output_template,
            field_mapping=dict(data.field_mapping),
            input_template_no_input=data.input_template_no_input,
            optional_fields=tuple(data.optional_fields),
        )


def _field_value(row: Row, name: str, column: str, optional: bool) -> str:
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise BadRow(f"missing:{name}", f"field {name!r} (column {column!r}) is missing or null")
    if not isinstance(value, str):
        raise BadRow(
            f"not_string:{name}",
            f"field {name!r} (column {column!r}) is a {type(value).__name__}, not a string",
        )
    if not optional and not value.strip():
        raise BadRow(f"empty:{name}", f"field {name!r} (column {column!r}) is empty")
    return value


def render_alpaca(row: Row, spec: AlpacaSpec) -> Record:
    """One alpaca-style row -> ``{"input", "output"}`` with the templates applied.

    ``input_template_no_input`` (when set) is used when every optional field is empty or missing;
    ``{{`` and ``}}`` in templates are literal braces, braces inside values are kept as they are.
    """
    optional = set(spec.optional_fields)
    values = {
        name: _field_value(row, name, spec.field_mapping[name], name in optional) for name in spec.used_fields
    }
    template = spec.input_template
    if spec.input_template_no_input is not None and optional and all(not values[f].strip() for f in optional):
        template = spec.input_template_no_input
    output = spec.output_template.format_map(values)
    if not output.strip():
        raise BadRow("empty_output", "the rendered output is empty")
    return {"input": template.format_map(values), "output": output}


def _check_role_order(messages: list[dict[str, str]]) -> None:
    expected = "user"
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "system":
            if i != 0:
                raise BadRow("chat_role_order", f"turn {i}: a system turn is only allowed as the first turn")
            continue
        if role != expected:
            first = i == 0 or (i == 1 and messages[0]["role"] == "system")
            what = "the conversation starts with an assistant turn" if first else f"two {role} turns in a row"
            raise BadRow("chat_role_order", f"turn {i}: {what} (turns must alternate user, assistant, ...)")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise BadRow(
            "chat_role_order",
            f"the last turn is a {messages[-1]['role']} turn (must be assistant: it is what the model learns)",
        )


def normalize_messages(
    turns: Any,
    *,
    role_key: str = "role",
    content_key: str = "content",
    role_names: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """Chat turns -> ``[{"role": system|user|assistant, "content": str}, ...]``, checked.

    ``role_names`` maps the data's role names to chat roles (ShareGPT ``human``/``gpt``); without it
    the roles must already be system/user/assistant. Extra keys of a turn are dropped.
    """
    if not isinstance(turns, list) or not turns:
        raise BadRow("chat_no_messages", "the conversation is missing, empty or not a list of turns")
    names = role_names if role_names is not None else {r: r for r in CHAT_ROLES}
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise BadRow("chat_bad_turn", f"turn {i} is a {type(turn).__name__}, not an object")
        raw_role = turn.get(role_key)
        role = names.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise BadRow(
                "chat_unknown_role", f"turn {i}: unknown {role_key} {raw_role!r} (allowed: {sorted(names)})"
            )
        content = turn.get(content_key)
        if content is not None and not isinstance(content, str):
            raise BadRow("not_string:content", f"turn {i}: {content_key} is a {type(content).__name__}")
        if content is None or not content.strip():
            raise BadRow("chat_empty_content", f"turn {i} ({role}): empty {content_key}")
        messages.append({"role": role, "content": content})
    _check_role_order(messages)
    return messages


def normalize_chat_row(row: Row, data_format: str) -> Record:
    """A ``messages`` (role/content) or ShareGPT ``conversations`` (from/value) row -> ``{"messages"}``.

    A ShareGPT row's top-level ``system`` string becomes the first turn when there is none.
    """
    if data_format == "messages":
        return {"messages": normalize_messages(row.get("messages"))}
    messages = normalize_messages(
        row.get("conversations"), role_key="from", content_key="value", role_names=SHAREGPT_ROLES
    )
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


def load_converter(path: str) -> Converter:
    """Import ``package.module:function``; a clear DataError when it cannot be imported."""
    module_name, _, func_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(
            f"converter: cannot import module {module_name!r} of {path!r} ({err}); "
            "install it or add its folder to PYTHONPATH"
        ) from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"converter: {module_name!r} has no function {func_name!r} (from {path!r})")
    return func


def apply_converter(func: Converter, row: Row) -> Record:
    """Run a custom converter on one row and check what it returned."""
    try:
        result = func(dict(row))
    except Exception as err:
        raise BadRow("converter_error", f"the converter raised {type(err).__name__}: {err}") from err
    if result is None:
        raise BadRow("converter_dropped", "the converter returned None", fatal=False)
    if isinstance(result, Mapping) and "messages" in result:
        return {"messages": normalize_messages(result["messages"])}
    if isinstance(result, Mapping) and {"input", "output"} <= set(result):
        text_in, text_out = result["input"], result["output"]
        if not isinstance(text_in, str) or not isinstance(text_out, str):
            raise BadRow("converter_bad_result", "the converter's input and output must be strings")
        if not text_out.strip():
            raise BadRow("empty_output", "the converter returned an empty output")
        return {"input": text_in, "output": text_out}
    raise BadRow(
        "converter_bad_result",
        f'the converter returned {type(result).__name__}; expected {{"input", "output"}}, {{"messages"}} or None',
    )


@dataclass(frozen=True)
class RowFormat:
    """How to turn one raw row into a record: a format name plus what that format needs."""

    kind: str
    alpaca: AlpacaSpec | None = None
    converter: Converter | None = None

    def __call__(self, row: Row) -> Record:
        if self.kind == "converter" and self.converter is not None:
            return apply_converter(self.converter, row)
        if self.kind == "alpaca" and self.alpaca is not None:
            return render_alpaca(row, self.alpaca)
        return normalize_chat_row(row, self.kind)

    def required_columns(self) -> list[str]:
        """Columns that must exist in the data set for this format."""
        if self.kind == "alpaca" and self.alpaca is not None:
            return list(dict.fromkeys(self.alpaca.field_mapping.values()))
        return {"messages": ["messages"], "sharegpt": ["conversations"]}.get(self.kind, [])


def replace_text(value: Any, replacements: dict[str, str]) -> Any:
    """``value`` with every ``replacements`` key replaced in each string inside it (``text_replacements``)."""
    if not replacements:
        return value
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: replace_text(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [replace_text(v, replacements) for v in value]
    return value


def row_format(data: DataConfig, columns: Iterable[str], converter: Converter | None = None) -> RowFormat:
    """The format of a data set with these columns under this configuration."""
    if converter is not None:
        return RowFormat("converter", converter=converter)
    kind = detect_format(columns) if data.data_format == "auto" else data.data_format
    return RowFormat(kind, alpaca=AlpacaSpec.from_config(data) if kind == "alpaca" else None)
