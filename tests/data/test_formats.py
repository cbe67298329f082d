"""Pure row formatting: alpaca templates, chat normalisation, converters, format detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftpipe.config import DataConfig, PipelineConfig, validate_config
from ftpipe.data.chat import normalize_chat_row
from ftpipe.data.errors import BadRow, DataError
from ftpipe.data.formats import (
    AlpacaSpec,
    apply_converter,
    detect_format,
    load_converter,
    render_alpaca,
    row_format,
)

pytestmark = pytest.mark.timeout(30)


def spec(**kw) -> AlpacaSpec:
    return AlpacaSpec.from_config(DataConfig(**kw))


def test_field_mapping_reads_renamed_columns():
    s = spec(
        input_template="Q: {instruction}\nC: {input}\n",
        input_template_no_input="Q: {instruction}\n",
        output_template="{output}",
        field_mapping={"instruction": "prompt", "input": "context", "output": "answer"},
    )
    row = {"prompt": "Add.", "context": "2 and 3", "answer": "5", "instruction": "ignored"}
    assert render_alpaca(row, s) == {"input": "Q: Add.\nC: 2 and 3\n", "output": "5"}


def test_literal_braces_and_braces_inside_values():
    cfg = PipelineConfig.from_flat({"input_template": '{{"task": "{instruction}"}} {input}'})
    validate_config(cfg)  # literal braces are a valid template
    s = AlpacaSpec.from_config(cfg.data)
    row = {"instruction": "say {x}", "input": "in {0}", "output": "{done}"}
    assert render_alpaca(row, s) == {"input": '{"task": "say {x}"} in {0}', "output": "{done}"}


@pytest.mark.parametrize("value", ["", "   ", None])
def test_no_input_template_when_optional_fields_empty(value):
    s = spec(input_template="I: {instruction} / {input}", input_template_no_input="I: {instruction}")
    row = {"instruction": "Go", "output": "ok"}
    if value is not None:
        row["input"] = value
    assert render_alpaca(row, s)["input"] == "I: Go"
    assert render_alpaca({**row, "input": "x"}, s)["input"] == "I: Go / x"


def test_without_no_input_template_the_input_template_gets_empty_optional_fields():
    s = spec(input_template="I: {instruction}|{input}|", input_template_no_input=None)
    assert render_alpaca({"instruction": "Go", "input": None, "output": "ok"}, s)["input"] == "I: Go||"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"input": "", "output": "o"}, "missing:instruction"),
        ({"instruction": None, "input": "", "output": "o"}, "missing:instruction"),
        ({"instruction": "i", "input": "", "output": {"a": 5}}, "not_string:output"),
        ({"instruction": "i", "input": ["x"], "output": "o"}, "not_string:input"),
        ({"instruction": "i", "input": "", "output": "  \n"}, "empty:output"),
        ({"instruction": "", "input": "", "output": "o"}, "empty:instruction"),
    ],
)
def test_bad_alpaca_rows(row, reason):
    with pytest.raises(BadRow) as err:
        render_alpaca(row, spec())
    assert err.value.reason == reason
    assert err.value.fatal


def test_empty_rendered_output_is_bad_even_for_optional_output():
    s = spec(output_template="{output}", optional_fields=["input", "output"])
    with pytest.raises(BadRow) as err:
        render_alpaca({"instruction": "i", "input": "", "output": ""}, s)
    assert err.value.reason == "empty_output"


def test_messages_normalised_and_extra_keys_dropped():
    turns = [
        {"role": "system", "content": "Be brief.", "weight": None},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "name": "bot"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    assert normalize_chat_row({"messages": turns}, "messages") == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Bye!"},
        ]
    }


def test_sharegpt_normalised_with_top_level_system():
    row = {
        "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
        "system": "You are a calculator.",
    }
    assert normalize_chat_row(row, "sharegpt") == {
        "messages": [
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }


U, A, S = "user", "assistant", "system"


@pytest.mark.parametrize(
    ("roles", "contents", "reason", "detail"),
    [
        ([U, U, A], ["a", "b", "c"], "chat_role_order", "turn 1: two user turns in a row"),
        ([A, U, A], ["a", "b", "c"], "chat_role_order", "turn 0: the conversation starts with an assistant"),
        ([S, A], ["a", "b"], "chat_role_order", "turn 1: the conversation starts with an assistant"),
        ([U, A, U], ["a", "b", "c"], "chat_role_order", "the last turn is a user turn"),
        ([U, S, A], ["a", "b", "c"], "chat_role_order", "turn 1: a system turn is only allowed"),
        ([U, A], ["a", " "], "chat_empty_content", "turn 1 (assistant): empty content"),
        ([U, A], ["a", None], "chat_empty_content", "turn 1 (assistant): empty content"),
        ([U, A], ["a", [3]], "not_string:content", "turn 1: content is a list"),
        ([U, "robot"], ["a", "b"], "chat_unknown_role", "turn 1: unknown role 'robot'"),
        (
            [U, "tool", A],
            ["a", "b", "c"],
            "chat_tool_without_call",
            "turn 1: a tool result with no tool call",
        ),
    ],
)
def test_bad_chat_rows(roles, contents, reason, detail):
    turns = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    with pytest.raises(BadRow) as err:
        normalize_chat_row({"messages": turns}, "messages")
    assert err.value.reason == reason
    assert detail in err.value.detail


@pytest.mark.parametrize("turns", [[], None, "hello"])
def test_missing_conversation(turns):
    with pytest.raises(BadRow) as err:
        normalize_chat_row({"messages": turns}, "messages")
    assert err.value.reason == "chat_no_messages"


def test_sharegpt_unknown_from():
    with pytest.raises(BadRow) as err:
        normalize_chat_row({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt")
    assert err.value.reason == "chat_unknown_role"


def test_detect_format_and_forced_format():
    assert detect_format(["messages", "id"]) == "messages"
    assert detect_format(["conversations"]) == "sharegpt"
    assert detect_format(["instruction", "output"]) == "alpaca"
    assert row_format(DataConfig(), ["conversations"]).kind == "sharegpt"
    assert row_format(DataConfig(data_format="messages"), ["x"]).required_columns() == ["messages"]
    assert row_format(DataConfig(), ["instruction"]).required_columns() == ["instruction", "input", "output"]


def test_converter_import_and_results(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    pair = load_converter("ftpipe_test_converter:qa_pair")
    assert apply_converter(pair, {"question": "2+2?", "answer": "4"}) == {
        "input": "Q: 2+2?\nA:",
        "output": " 4",
    }
    with pytest.raises(BadRow) as err:
        apply_converter(pair, {"question": "q", "answer": "a", "skip": True})
    assert (err.value.reason, err.value.fatal) == ("converter_dropped", False)
    with pytest.raises(BadRow) as err:
        apply_converter(pair, {"answer": "a"})
    assert err.value.reason == "converter_error" and "KeyError" in err.value.detail
    chat = load_converter("ftpipe_test_converter:qa_chat")
    assert apply_converter(chat, {"question": "q", "answer": "a"})["messages"][1] == {
        "role": "assistant",
        "content": "a",
    }
    with pytest.raises(BadRow) as err:
        apply_converter(lambda row: {"text": "x"}, {})
    assert err.value.reason == "converter_bad_result"


def test_converter_import_errors_name_the_path():
    with pytest.raises(
        DataError, match=r"converter no_such_module_xyz:f: cannot import module 'no_such_module_xyz'"
    ):
        load_converter("no_such_module_xyz:f")
    with pytest.raises(DataError, match="has no function 'nope'"):
        load_converter("json:nope")


def test_converter_contract():
    from ftpipe.data.formats import Converter

    row = {"instruction": "Translate to French.", "input": "hi", "output": "salut"}
    # builtins:dict returns the raw row: its 'instruction' would be lost, so the row is refused
    with pytest.raises(BadRow) as err:
        apply_converter(Converter(name="builtins:dict", func=dict), row)
    assert err.value.reason == "converter_bad_result"
    assert "the converter builtins:dict returned keys ['input', 'instruction', 'output']" in err.value.detail
    # an empty prompt is refused unless allowed
    empty = Converter(name="m:f", func=lambda r: {"input": " ", "output": r["output"]})
    with pytest.raises(BadRow) as err:
        apply_converter(empty, row)
    assert err.value.reason == "empty_prompt" and "allow_empty_prompt" in err.value.detail
    allowed = Converter(name="m:f", func=empty.func, allow_empty_prompt=True)
    assert apply_converter(allowed, row) == {"input": " ", "output": "salut"}
    # a field the templates use that does not reach the result is noted (the row is kept)
    drops = Converter(
        name="m:g",
        func=lambda r: {"input": r["input"], "output": r["output"]},
        watched=(("instruction", "instruction"), ("output", "output")),
    )
    notes: list[str] = []
    assert apply_converter(drops, row, notes) == {"input": "hi", "output": "salut"}
    assert notes == ["converter_dropped:instruction"]
    # a conversation may bring its tools; whatever the converter raises names it
    chat = Converter(
        name="m:h",
        func=lambda r: {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "tools": [{"name": "f"}],
        },
    )
    assert apply_converter(chat, row)["tools"] == [{"type": "function", "function": {"name": "f"}}]
    with pytest.raises(BadRow) as err:
        apply_converter(Converter(name="m:boom", func=lambda r: r["nope"]), row)
    assert (
        err.value.reason == "converter_error" and "the converter m:boom raised KeyError" in err.value.detail
    )


def test_a_converter_that_drops_a_template_field_is_warned_about(tmp_path, monkeypatch, caplog):
    import json

    from ftpipe.data.prepare import prepare_data

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "drops_conv.py").write_text(
        "def convert(row):\n    return {'input': row['input'] or 'Q', 'output': row['output']}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    rows = [{"instruction": f"Task {i}", "input": "", "output": f"A{i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate_config(
        PipelineConfig.from_flat(
            {
                "dataset": str(tmp_path / "d.jsonl"),
                "data_dir": str(tmp_path / "out"),
                "converter": "drops_conv:convert",
            }
        )
    )
    with caplog.at_level("WARNING", logger="ftpipe"):
        result = prepare_data(cfg)
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert manifest["sources"]["d"]["rows_warned"] == {"converter_dropped:instruction": 5}
    assert "in 5 of 5 rows the converter's result does not contain the row's 'instruction'" in caplog.text
