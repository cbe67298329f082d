"""Row formats as pure functions: alpaca templates, chat normalisation and custom converters.

Every function takes one raw row (a mapping of column -> value) and returns one prepared record,
``{"input": str, "output": str}`` or ``{"messages": [...], "tools": [...]}`` (chat rows in the internal
form of :mod:`ftpipe.data.chat`), or raises :class:`~ftpipe.data.errors.BadRow` with a short reason key
and a readable detail.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ftpipe.config.schema import DataConfig
from ftpipe.config.validate import template_fields
from ftpipe.data.chat import as_text, normalize_chat_row
from ftpipe.data.errors import BadRow, DataError

Row = Mapping[str, Any]
Record = dict[str, Any]

FORMATS = ("alpaca", "messages", "sharegpt")


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
            # used only when some field is optional (it replaces input_template when they are all empty)
            input_template_no_input=data.input_template_no_input if data.optional_fields else None,
            optional_fields=tuple(data.optional_fields),
        )


def _field_value(row: Row, name: str, column: str, optional: bool, notes: list[str]) -> str:
    where = f"field {name!r} (column {column!r})"
    value = as_text(row.get(column), name, notes, where)
    if value is None:
        if optional:
            return ""
        raise BadRow(f"missing:{name}", f"{where} is missing or null")
    if not optional and not value.strip():
        raise BadRow(f"empty:{name}", f"{where} is empty")
    return value


def render_alpaca(row: Row, spec: AlpacaSpec, notes: list[str] | None = None) -> Record:
    """One alpaca-style row -> ``{"input", "output"}`` with the templates applied.

    ``input_template_no_input`` (when set) is used when every optional field is empty or missing;
    ``{{`` and ``}}`` in templates are literal braces, braces inside values are kept as they are. A JSON
    number or boolean in a field is taken as its JSON text and noted in ``notes`` as ``coerced:<field>``.
    """
    notes = [] if notes is None else notes
    values = alpaca_values(row, spec, notes)
    output = spec.output_template.format_map(values)
    if not output.strip():
        raise BadRow("empty_output", "the rendered output is empty")
    return {"input": alpaca_prompt(values, spec), "output": output}


def alpaca_values(row: Row, spec: AlpacaSpec, notes: list[str]) -> dict[str, str]:
    """The text of every template field of ``spec`` in ``row`` (a BadRow for a missing or empty one)."""
    optional = set(spec.optional_fields)
    return {
        name: _field_value(row, name, spec.field_mapping[name], name in optional, notes)
        for name in spec.used_fields
    }


def alpaca_prompt(values: Mapping[str, str], spec: AlpacaSpec) -> str:
    """The prompt rendered from the field values: ``input_template_no_input`` when every optional field
    is empty (and it is set), else ``input_template``."""
    optional = set(spec.optional_fields)
    template = spec.input_template
    if spec.input_template_no_input is not None and optional and all(not values[f].strip() for f in optional):
        template = spec.input_template_no_input
    return template.format_map(values)


def load_converter(path: str) -> Callable[[dict[str, Any]], Any]:
    """Import ``package.module:function``; whatever goes wrong while importing it is a DataError naming it."""
    module_name, _, func_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DataError(
            f"converter {path}: cannot import module {module_name!r} ({err}); "
            "install it or add its folder to PYTHONPATH"
        ) from err
    except BaseException as err:  # the module's own code failed: a SyntaxError, an exception, an exit
        raise DataError(
            f"converter {path}: importing module {module_name!r} failed ({type(err).__name__}: {err}); "
            "fix the converter's module"
        ) from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise DataError(f"converter {path}: module {module_name!r} has no function {func_name!r}")
    return func


class ConverterStopped(DataError):
    """A converter raised SystemExit, KeyboardInterrupt or another BaseException that is not an Exception:
    not a bad row but a converter to fix; :meth:`at` names the row."""

    def __init__(self, name: str, err: BaseException) -> None:
        shown = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        what = f"called sys.exit ({shown})" if isinstance(err, SystemExit) else f"raised {shown}"
        super().__init__(
            f"the converter {name} {what} instead of returning a record or None: a converter may "
            "not stop ftpipe; raise an Exception (ValueError, ...) for a bad row, and fix the converter"
        )

    def at(self, where: str) -> DataError:
        """The error naming the row (``<file>: line N``) the converter stopped at."""
        return DataError(f"{where}: {self}")


#: The keys a converter's result may have: one of these shapes (``tools`` only with ``messages``).
CONVERTER_SHAPES = ({"input", "output"}, {"messages"}, {"messages", "tools"})


@dataclass(frozen=True)
class Converter:
    """A user's converter and its contract (see the module notes of :func:`apply_converter`).

    ``watched``: (template field, column) pairs whose text, when a row has it, a converter is expected
    to carry into its result; ``allow_empty_prompt`` lets an ``input`` of "" through.
    """

    name: str
    func: Callable[[dict[str, Any]], Any]
    allow_empty_prompt: bool = False
    watched: tuple[tuple[str, str], ...] = ()

    def __call__(self, row: dict[str, Any]) -> Any:
        return self.func(row)


def as_converter(converter: Converter | Callable) -> Converter:
    """A plain function as a :class:`Converter` named after it."""
    if isinstance(converter, Converter):
        return converter
    return Converter(name=getattr(converter, "__qualname__", "converter"), func=converter)


def run_converter(converter: Converter, row: Row) -> Any:
    """The converter's result for a copy of ``row``; None is a non-fatal ``converter_dropped``, an Exception
    a ``converter_error`` and any other BaseException a :class:`ConverterStopped`."""
    try:
        result = converter(dict(row))
    except Exception as err:
        raise BadRow(
            "converter_error", f"the converter {converter.name} raised {type(err).__name__}: {err}"
        ) from err
    except BaseException as err:  # sys.exit(), KeyboardInterrupt, ...: user code may not end the command
        raise ConverterStopped(converter.name, err) from err
    if result is None:
        raise BadRow("converter_dropped", f"the converter {converter.name} returned None", fatal=False)
    return result


def _record_text(record: Record) -> str:
    if "messages" in record:
        return "\n".join(str(m.get("content") or "") for m in record["messages"])
    return f"{record['input']}\n{record['output']}"


def apply_converter(converter: Converter | Callable, row: Row, notes: list[str] | None = None) -> Record:
    """Run a custom converter on one row and hold its result to the contract.

    The converter gets a copy of the raw row and returns ``None`` (the row is left out, counted as
    ``converter_dropped``), ``{"input": str, "output": str}`` (a prompt and its answer, used as they
    are) or ``{"messages": [...], "tools": [...]}`` (a conversation, checked as chat rows are). Any other
    key is a bad row (``converter_bad_result``): its value would be lost. An empty ``input`` is a bad row
    (``empty_prompt``) unless ``allow_empty_prompt``. A row's text in a field the templates use that does
    not reach the result is noted (``converter_dropped:<field>``, a warning). Whatever Exception the
    converter raises is a bad row (``converter_error``) naming the converter; SystemExit, KeyboardInterrupt
    and any other BaseException raised by it is a :class:`ConverterStopped` (the command stops, exit 2).
    """
    converter = as_converter(converter)
    notes = [] if notes is None else notes
    result = run_converter(converter, row)
    if not isinstance(result, Mapping) or set(result) not in CONVERTER_SHAPES:
        keys = sorted(map(str, result)) if isinstance(result, Mapping) else None
        what = f"keys {keys}" if keys is not None else f"a {type(result).__name__}"
        pair = keys is not None and {"chosen", "rejected"} <= set(keys)
        raise BadRow(
            "converter_bad_result",
            f'the converter {converter.name} returned {what}; it must return {{"input", "output"}}, '
            '{"messages"} (optionally with "tools") or None: other keys would be lost'
            + ("; a preference pair (chosen / rejected) needs objective: dpo" if pair else ""),
        )
    if "messages" in result:
        record = normalize_chat_row(result, "messages", notes)
    else:
        text_in, text_out = result["input"], result["output"]
        if not isinstance(text_in, str) or not isinstance(text_out, str):
            raise BadRow(
                "converter_bad_result", f"the converter {converter.name}'s input and output must be strings"
            )
        if not text_out.strip():
            raise BadRow("empty_output", f"the converter {converter.name} returned an empty output")
        if not text_in.strip() and not converter.allow_empty_prompt:
            raise BadRow(
                "empty_prompt",
                f"the converter {converter.name} returned an empty input (set allow_empty_prompt: true if "
                "answers without a prompt are meant)",
            )
        record = {"input": text_in, "output": text_out}
    text = _record_text(record)
    for field_name, column in converter.watched:
        value = row.get(column)
        if isinstance(value, str) and value.strip() and value.strip() not in text:
            notes.append(f"converter_dropped:{field_name}")
    return record


@dataclass(frozen=True)
class RowFormat:
    """How to turn one raw row into a record: a format name plus what that format needs."""

    kind: str
    alpaca: AlpacaSpec | None = None
    converter: Converter | None = None

    def __call__(self, row: Row, notes: list[str] | None = None) -> Record:
        """The record of ``row``; ``notes`` collects what was changed on the way (``coerced:<field>``)."""
        if self.kind == "converter" and self.converter is not None:
            return apply_converter(self.converter, row, notes)
        if self.kind == "alpaca" and self.alpaca is not None:
            return render_alpaca(row, self.alpaca, notes)
        return normalize_chat_row(row, self.kind, notes)

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


def make_converter(data: DataConfig) -> Converter | None:
    """The configured converter, imported, with its contract's settings (None when there is none)."""
    if not data.converter:
        return None
    spec = AlpacaSpec.from_config(data)
    optional = set(spec.optional_fields)
    watched = tuple(
        (name, spec.field_mapping[name])
        for name in spec.used_fields
        if name not in optional and name in spec.field_mapping
    )
    return Converter(
        name=data.converter,
        func=load_converter(data.converter),
        allow_empty_prompt=data.allow_empty_prompt,
        watched=watched,
    )


def row_format(data: DataConfig, columns: Iterable[str], converter: Converter | None = None) -> RowFormat:
    """The format of a data set with these columns under this configuration."""
    if converter is not None:
        columns = set(columns)
        watched = tuple((name, column) for name, column in converter.watched if column in columns)
        return RowFormat("converter", converter=dataclasses.replace(converter, watched=watched))
    kind = detect_format(columns) if data.data_format == "auto" else data.data_format
    return RowFormat(kind, alpaca=AlpacaSpec.from_config(data) if kind == "alpaca" else None)
