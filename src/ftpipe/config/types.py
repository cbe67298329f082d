"""Every configuration value checked against its field's type, and for meaning where a type allows nonsense.

A configuration can come from YAML (where ``no`` is a boolean and ``1e5`` a float), from the command
line or from Python; whatever it holds, each field is checked here against the type its dataclass
declares, and a value of the wrong type gets one line naming the field, what was given and what is
allowed. Beyond types: floats must be finite (``.nan`` and ``.inf`` pass YAML's type but mean
nothing), mapping options must have keys and values that can mean something (a ``field_mapping`` key
is a template placeholder name; a ``text_replacements`` key is non-empty text), and lists of names
hold distinct, non-empty names.

A list of plain values may be given as one value alone, from YAML or the command line
(``lora_target_modules: all-linear`` is ``[all-linear]``): :func:`one_value_lists`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Literal

from ftpipe.config.schema import SECTIONS, DatasetEntry

#: YAML 1.1 words that PyYAML reads as booleans: a text field given one of them was most likely meant as text.
_YAML_BOOLEAN_WORDS = "yes/no/on/off/true/false"


@functools.cache
def field_types() -> dict[str, Any]:
    """Flat field name -> its type (for every section)."""
    hints: dict[str, Any] = {}
    for cls in SECTIONS.values():
        hints.update(typing.get_type_hints(cls))
    return hints


@functools.cache
def _entry_types() -> dict[str, Any]:
    return typing.get_type_hints(DatasetEntry)


def describe(hint: Any) -> str:
    """What a value of type ``hint`` is, in words (``a whole number``, ``one of 'a', 'b'``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if hint is str:
        return "text"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a number"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        if args and dataclasses.is_dataclass(args[0]):
            return "a list of entries (mappings with at least 'dataset')"
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping of text to text"
    if dataclasses.is_dataclass(hint):
        return "a mapping of its fields"
    return getattr(hint, "__name__", str(hint))


def _given(value: Any) -> str:
    kind = {
        bool: "a boolean",
        int: "a whole number",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "a mapping",
    }
    name = kind.get(type(value), type(value).__name__)
    return f"{name} ({value!r})" if not isinstance(value, list | dict) else name


def _matches(hint: Any, value: Any) -> bool:
    """True when ``value`` has the type ``hint`` (the contents of lists and mappings checked separately)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return any(_matches(a, value) for a in args)
    if origin is list:
        return isinstance(value, list | tuple)
    if origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict | hint)
    return True  # pragma: no cover - every field type is one of the above


def _inner(hint: Any) -> Any:
    """The list / dict / dataclass type inside an optional type (``list[str] | None`` -> ``list[str]``)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    return hint


def value_problems(name: str, hint: Any, value: Any) -> list[str]:
    """What is wrong with ``value`` for a field ``name`` of type ``hint`` (empty when nothing)."""
    if not _matches(hint, value):
        line = f"{name}: expected {describe(hint)}, got {_given(value)}"
        if isinstance(value, bool) and _matches(hint, "x"):
            line += f"; YAML reads {_YAML_BOOLEAN_WORDS} as booleans: quote the value if you mean the text"
        elif isinstance(value, int | float) and not isinstance(value, bool) and _matches(hint, "x"):
            line += "; quote the value if you mean the text"
        return [line]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{name}: {value!r} is not a usable number (must be finite)"]
    inner = _inner(hint)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    problems: list[str] = []
    if origin is list and isinstance(value, list | tuple) and args:
        for i, item in enumerate(value):
            if dataclasses.is_dataclass(args[0]):
                problems += _entry_problems(f"{name}[{i}]", item)
            else:
                problems += value_problems(f"{name}[{i}]", args[0], item)
    if origin is dict and isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{name}: key {key!r} is {_given(key)}; keys must be text")
            problems += value_problems(f"{name}[{key!r}]", args[1] if args else str, item)
    return problems


def _entry_problems(name: str, entry: Any) -> list[str]:
    if isinstance(entry, DatasetEntry):
        entry = dataclasses.asdict(entry)
    if not isinstance(entry, dict):
        return [f"{name}: expected a mapping with at least 'dataset', got {_given(entry)}"]
    hints = _entry_types()
    problems = []
    for key, value in entry.items():
        if key not in hints:
            problems.append(f"{name}.{key}: unknown field (allowed: {sorted(hints)})")
            continue
        problems += value_problems(f"{name}.{key}", hints[key], value)
    return problems


def _names(problems: list[str], name: str, values: Any, what: str) -> None:
    if not isinstance(values, list | tuple):
        return
    seen = set()
    for value in values:
        if isinstance(value, str) and not value.strip():
            problems.append(f"{name}: an empty {what} means nothing (remove it)")
        elif value in seen:
            problems.append(f"{name}: {value!r} is listed twice")
        seen.add(value)


def meaning_problems(flat: dict[str, Any]) -> list[str]:
    """Mapping and list options whose keys or values cannot mean anything (types already checked)."""
    problems: list[str] = []
    mapping = flat.get("field_mapping")
    if isinstance(mapping, dict):
        for key, column in mapping.items():
            if isinstance(key, str) and not key.isidentifier():
                problems.append(
                    f"field_mapping: key {key!r} is not a template field name (a name like instruction, "
                    "used as {instruction} in the templates)"
                )
            if isinstance(column, str) and not column.strip():
                problems.append(f"field_mapping: {key!r} maps to an empty column name")
    replacements = flat.get("text_replacements")
    if isinstance(replacements, dict):
        for key in replacements:
            if isinstance(key, str) and not key:
                problems.append(
                    "text_replacements: an empty key would insert its text between every character"
                )
    _names(problems, "lora_target_modules", flat.get("lora_target_modules"), "module name")
    _names(problems, "optional_fields", flat.get("optional_fields"), "field name")
    _names(problems, "modules_to_save", flat.get("modules_to_save"), "module name")
    return problems


#: Text that reads as a decimal number (``1e-4``, ``-2.5E+3``, ``.5``); YAML 1.1 reads some of them as text.
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number_field(hint: Any) -> bool:
    """True for a field that takes a number and no text (``float``, ``float | None``)."""
    if hint is float:
        return True
    args = typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else ()
    return float in args and str not in args


def _number(value: Any) -> Any:
    if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


def numbers_from_text(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with the number fields (and the number fields of ``datasets`` entries) given text that reads
    as a number (``1e-4``, which YAML 1.1 reads as text) given that number, as their flags would; other
    text stays (and is refused by :func:`type_problems`)."""
    hints, entry_hints = field_types(), _entry_types()
    out = {name: _number(v) if _number_field(hints.get(name)) else v for name, v in flat.items()}
    entries = out.get("datasets")
    if isinstance(entries, list):
        out["datasets"] = [
            {k: _number(v) if _number_field(entry_hints.get(k)) else v for k, v in e.items()}
            if isinstance(e, dict)
            else e
            for e in entries
        ]
    return out


def list_item_type(hint: Any) -> Any | None:
    """The item type of a list of plain values (``list[str] | None`` -> ``str``); None for any other type,
    lists of entries (``datasets``) included."""
    inner = _inner(hint)
    if typing.get_origin(inner) is not list or not typing.get_args(inner):
        return None
    item = typing.get_args(inner)[0]
    return None if dataclasses.is_dataclass(item) else item


def _one_value_list(hint: Any, value: Any) -> Any:
    item = list_item_type(hint)
    if item is None or isinstance(value, list | tuple | dict) or value is None:
        return value
    return [value] if _matches(item, value) else value


def one_value_lists(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with each list field (and each list field of ``datasets`` entries) given one plain value
    that is a valid item given the list of that one value: ``lora_target_modules: all-linear`` means
    ``[all-linear]``. Other values stay (a wrong one is refused by :func:`type_problems`, naming the list)."""
    hints, entry_hints = field_types(), _entry_types()
    out = {name: _one_value_list(hints.get(name), v) for name, v in flat.items()}
    entries = out.get("datasets")
    if isinstance(entries, list):
        out["datasets"] = [
            {k: _one_value_list(entry_hints.get(k), v) for k, v in e.items()} if isinstance(e, dict) else e
            for e in entries
        ]
    return out


def given_forms(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with the shorter forms a value may be given in made the field's own: number text for number
    fields (:func:`numbers_from_text`), one value alone for lists (:func:`one_value_lists`)."""
    return one_value_lists(numbers_from_text(flat))


def type_problems(flat: dict[str, Any]) -> dict[str, list[str]]:
    """Field name -> the problems of its value's type (only fields with problems; unknown names skipped)."""
    hints = field_types()
    found = {}
    for name, value in flat.items():
        if name in hints:
            problems = value_problems(name, hints[name], value)
            if problems:
                found[name] = problems
    return found
