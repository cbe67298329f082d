"""The user's own files and code, broken: chat templates, deeply nested JSON, converters that exit, odd
dataset paths and exports without a tokenizer. Each is one message naming the culprit (an FtpipeError),
never a crash or a silent success."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from ftpipe.config import PipelineConfig
from ftpipe.config.schema import DataConfig, ModelConfig
from ftpipe.data.chat import normalize_tools
from ftpipe.data.errors import BadRow, BadRowError, DataError
from ftpipe.data.formats import ConverterStopped, apply_converter
from ftpipe.data.jsonscan import MAX_DEPTH, scan_file, too_deep
from ftpipe.data.render import ChatTemplateError, check_tool_template
from ftpipe.data.sources import resolve_source
from ftpipe.data.tokenize import encode_examples
from ftpipe.model.errors import TokenizerLoadError
from ftpipe.model.tokenizer import (
    apply_chat_template_setting,
    check_tokenizer_files,
    load_folder_tokenizer,
)

pytestmark = pytest.mark.timeout(120)
ROW = {"instruction": "Say hi.", "input": "", "output": "Hi."}
SYNTAX_ERROR = "{% for m in messages %}\n{{ m.content }\n{% endfor %}\n"
NO_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system turns here') }}"
    "{% endif %}{{ m.content }}<|im_end|>{% endfor %}"
)


def with_template(tokenizer, path: Path):
    tok = copy.deepcopy(tokenizer)
    apply_chat_template_setting(tok, ModelConfig(chat_template=str(path)))
    return tok


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------------------------------
# chat templates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SYNTAX_ERROR, r"t\.jinja: line 2: Jinja syntax error: unexpected '\}'"),
        ("{{ raise_exception('not for chat') }}", r"t\.jinja: the template raised an error: not for chat"),
        ("{{ messages[7].content }}", r"t\.jinja: UndefinedError: list object has no element 7"),
        ("", r"t\.jinja: the file is empty"),
        (" \n\t\n", r"t\.jinja: the file is empty"),
        (b"{{ '\xff' }}", r"t\.jinja: not UTF-8 text \(byte 4\)"),
    ],
    ids=["syntax", "raise_exception", "undefined", "empty", "blank", "not-utf8"],
)
def test_a_broken_template_file_is_named_when_the_tokenizer_loads(tokenizer, tmp_path, text, expected):
    path = tmp_path / "t.jinja"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TokenizerLoadError, match=rf"^chat_template: {tmp_path}/{expected}"):
        with_template(tokenizer, path)


def test_a_template_refusing_system_turns_still_loads(tokenizer, tmp_path):
    """The check renders a plain conversation with and without a system turn: one of them is enough."""
    path = tmp_path / "t.jinja"
    path.write_text(NO_SYSTEM)
    assert with_template(tokenizer, path).chat_template == NO_SYSTEM


def test_train_stops_at_the_template_check_before_the_data_is_prepared(tiny_llama, tmp_path):
    from ftpipe.train.run import train

    (tmp_path / "t.jinja").write_text(SYNTAX_ERROR)
    (tmp_path / "d.jsonl").write_text(json.dumps(ROW) + "\n")
    cfg = PipelineConfig.from_flat(
        {
            "hf_model_id": str(tiny_llama),
            "chat_template": str(tmp_path / "t.jinja"),
            "dataset": str(tmp_path / "d.jsonl"),
            "data_dir": str(tmp_path / "data"),
            "results_dir": str(tmp_path / "results"),
            "strategy": "single",
            "gpus_per_node": 1,
            "max_steps": 2,
            "warmup_steps": 0,
        }
    )
    with pytest.raises(TokenizerLoadError, match=r"t\.jinja: line 2: Jinja syntax error"):
        train(cfg)
    assert not (tmp_path / "data").exists()


def test_a_row_the_template_refuses_names_the_row_the_file_and_the_message(tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(NO_SYSTEM)
    tok = with_template(tokenizer, path)
    row = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ],
    }
    with pytest.raises(ChatTemplateError) as err:
        encode_examples(tok, row, DataConfig())
    message = str(err.value)
    assert message.startswith(f"row id 7: the chat template file {path} (chat_template) cannot render")
    assert "the template raised an error: no system turns here" in message
    no_system = {"id": 8, "messages": row["messages"][1:]}
    assert encode_examples(tok, no_system, DataConfig())[0]  # the same template renders the others


def test_a_template_file_that_fails_on_tools_is_blamed_not_the_model(tokenizer, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(
        "{% for m in messages %}{{ m.content }}{{ m.tool_calls[0].x.y if m.tool_calls }}{% endfor %}"
    )
    tok = with_template(tokenizer, path)
    with pytest.raises(ChatTemplateError) as err:
        check_tool_template(tok, "the data uses tools")
    message = str(err.value)
    assert f"the chat template file {path} (chat_template) cannot render them" in message
    assert "UndefinedError" in message and tok.name_or_path not in message.split("cannot")[0]


# --------------------------------------------------------------------------------------------------
# deeply nested JSON


def test_deep_jsonl_rows_are_bad_rows_counted_or_named(tmp_path):
    path = tmp_path / "d.jsonl"
    deep_parsed = json.dumps({**ROW, "x": json.loads(nested(MAX_DEPTH + 5))})  # parses, but too deep
    lines = [json.dumps(ROW), '{"x": ' + nested(100_000) + "}", deep_parsed, json.dumps({**ROW, "x": [[1]]})]
    path.write_text("\n".join(lines) + "\n")
    scan = scan_file(path, tmp_path / "work", fail=False)
    assert scan.good == [0, 3]
    assert [(p, reason) for p, reason, _ in scan.bad] == [(1, "too_deep"), (2, "too_deep")]
    with pytest.raises(BadRowError, match=r"d\.jsonl: line 2: bad row \(too_deep\): values nested more"):
        scan_file(path, tmp_path / "work2", fail=True)


def test_a_deep_json_array_element_is_found_by_its_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        "[" + json.dumps(ROW) + ', {"x": ' + nested(100_000) + ', "s": "]]\\"["}, ' + json.dumps(ROW) + "]"
    )
    scan = scan_file(path, tmp_path / "work", fail=False)
    assert scan.good == [0, 2] and [(p, r) for p, r, _ in scan.bad] == [(1, "too_deep")]
    with pytest.raises(BadRowError, match=r"d\.json: row 1: bad row \(too_deep\)"):
        scan_file(path, tmp_path / "work2", fail=True)
    path.write_text("[" + json.dumps(ROW) + ", " + nested(100_000) + " oops")
    with pytest.raises(DataError, match=r"d\.json: not valid JSON"):
        scan_file(path, tmp_path / "work3", fail=False)


def test_nesting_depth_is_measured_without_recursion():
    assert not too_deep({"a": [[1]]}) and too_deep([[[1]]], limit=2) and not too_deep([[1]], limit=2)
    value: list = []
    for _ in range(sys.getrecursionlimit() * 3):
        value = [value]
    assert too_deep(value)


def test_a_deep_json_string_in_a_tools_column_is_a_bad_row():
    for text in (nested(100_000), nested(MAX_DEPTH + 5)):
        with pytest.raises(BadRow) as err:
            normalize_tools(text)
        assert err.value.reason == "tools_invalid" and "more than 100 levels deep" in err.value.detail


# --------------------------------------------------------------------------------------------------
# converters that stop the program


def _exit(row):
    sys.exit(0)


def _interrupt(row):
    raise KeyboardInterrupt


class _Stop(BaseException):
    pass


def _stop(row):
    raise _Stop("mine")


@pytest.mark.parametrize(
    ("func", "shown"),
    [
        (_exit, "called sys.exit (SystemExit: 0)"),
        (_interrupt, "raised KeyboardInterrupt"),
        (_stop, "raised _Stop: mine"),
    ],
    ids=["sys-exit", "keyboard-interrupt", "base-exception"],
)
def test_a_converter_may_not_stop_ftpipe(func, shown):
    with pytest.raises(ConverterStopped) as err:
        apply_converter(func, ROW)
    error = err.value.at("data.jsonl: line 3")
    assert isinstance(error, DataError) and error.exit_code == 2
    assert str(error).startswith(f"data.jsonl: line 3: the converter {func.__qualname__} {shown} instead of")


def test_an_exception_in_a_converter_stays_a_counted_bad_row():
    with pytest.raises(BadRow) as err:
        apply_converter(lambda row: 1 / 0, ROW)
    assert err.value.reason == "converter_error"


# --------------------------------------------------------------------------------------------------
# dataset paths


def test_a_symlink_loop_and_a_dangling_link_are_named(tmp_path):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    with pytest.raises(DataError, match=r"a\.jsonl' is a symbolic link loop"):
        resolve_source(str(tmp_path / "a.jsonl"))
    (tmp_path / "c.jsonl").symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(
        DataError, match=r"c\.jsonl' is a symbolic link to .*gone\.jsonl, which does not exist"
    ):
        resolve_source(str(tmp_path / "c.jsonl"))


def test_pipes_and_devices_are_refused_by_what_they_are(tmp_path):
    os.mkfifo(tmp_path / "p.jsonl")
    with pytest.raises(DataError, match=r"p\.jsonl' is a pipe .*Save it to a file first"):
        resolve_source(str(tmp_path / "p.jsonl"))
    read, write = os.pipe()  # what a shell's <(...) hands over: /dev/fd/N
    try:
        with pytest.raises(DataError, match=rf"'/dev/fd/{read}' is a pipe"):
            resolve_source(f"/dev/fd/{read}")
    finally:
        os.close(read)
        os.close(write)
    with pytest.raises(DataError, match=r"'/dev/null' is a device, not a regular file"):
        resolve_source("/dev/null")


def test_a_literal_file_name_with_glob_characters_wins_over_the_pattern(tmp_path):
    for name in ("train[1].jsonl", "train1.jsonl"):
        (tmp_path / name).write_text(json.dumps(ROW) + "\n")
    source = resolve_source(str(tmp_path / "train[1].jsonl"))
    assert source.files == ((tmp_path / "train[1].jsonl").resolve(),)
    pattern = resolve_source(str(tmp_path / "train[0-9].jsonl"))  # no such file: still a pattern
    assert pattern.files == ((tmp_path / "train1.jsonl").resolve(),)


# --------------------------------------------------------------------------------------------------
# exports without a tokenizer


def test_a_model_folder_without_tokenizer_files_is_named(tiny_llama, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_llama, folder)
    check_tokenizer_files(folder, "export_dir")
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(
        TokenizerLoadError, match=r"export_dir: .*export holds no tokenizer \(tokenizer_config"
    ):
        check_tokenizer_files(folder, "export_dir")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(
        TokenizerLoadError, match=r"model_dir: .* \(tokenizer\.json and tokenizer_config\.json missing\)"
    ):
        load_folder_tokenizer(folder, "model_dir")


def test_an_unreadable_tokenizer_file_is_named(tiny_llama, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(tiny_llama, folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match=r"model_dir: cannot load the tokenizer in .*export \("):
        load_folder_tokenizer(folder, "model_dir")
