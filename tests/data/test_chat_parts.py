"""Content parts and other API layouts: OpenAI text parts, Responses API parts, Anthropic content blocks.

Seeded files of each layout (tests/data/api_samples.py) keep every row and normalise to the internal
form written from the conversations themselves; ``ftpipe inspect`` trains exactly the calls and answers;
parts ftpipe cannot train on are bad rows with their own reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_samples import LAYOUTS, chatml_trained, internal, layout_rows, masked_texts

from ftpipe.cli.main import run_command
from ftpipe.config import PipelineConfig, validate_config
from ftpipe.data.chat import normalize_chat_row
from ftpipe.data.errors import BadRow, BadRowError

pytestmark = pytest.mark.timeout(120)
SEED, N = 25, 12


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def user(content) -> dict:
    return {"role": "user", "content": content}


def assistant(content, **extra) -> dict:
    return {"role": "assistant", "content": content, **extra}


def text(t: str, kind: str = "text") -> dict:
    return {"type": kind, "text": t}


def messages_of(*turns: dict, **columns) -> list[dict]:
    return normalize_chat_row({"messages": list(turns), **columns}, "messages")["messages"]


# --------------------------------------------------------------------------------------------------
# the seeded files


def test_seeded_conversations_cover_every_shape():
    """The seeded files hold what the tests below claim to check (else a new seed silently tests less)."""
    conversations = [c for layout in LAYOUTS for c in layout_rows(layout, SEED, N)[0]]
    rounds = [r for c in conversations for r in c.rounds]
    assert any(len(r.user) > 1 for r in rounds) and any(len(c.system) > 1 for c in conversations)
    assert any(len(r.calls) > 1 for r in rounds) and any(r.preface for r in rounds)
    assert any(r.aside for r in rounds) and any(r.reasoning and r.calls for r in rounds)
    assert any(r.reasoning and not r.calls for r in rounds) and any(not c.system for c in conversations)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_normalises_to_the_internal_form(layout):
    conversations, rows = layout_rows(layout, SEED, N)
    for conv, row in zip(conversations, rows, strict=True):
        assert normalize_chat_row(row, "messages") == internal(conv)


def test_openai_and_anthropic_files_of_one_conversation_are_one_internal_form():
    _, openai = layout_rows("openai", SEED, N)
    _, anthropic = layout_rows("anthropic", SEED, N)
    for a, b in zip(openai, anthropic, strict=True):
        assert normalize_chat_row(a, "messages") == normalize_chat_row(b, "messages")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_api_file_prepares_with_every_row_kept(tmp_path, layout):
    from ftpipe.data.prepare import prepare_data, read_jsonl

    conversations, rows = layout_rows(layout, SEED, N)
    path = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    cfg = PipelineConfig.from_flat(
        {
            "dataset": str(path),
            "data_dir": str(tmp_path / "out"),
            "on_bad_row": "fail",  # any dropped row would stop here
            "hf_model_id": "embedded",
            "chat_template": "chatml-tools",
        }
    )
    result = prepare_data(validate_config(cfg))
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert (manifest["rows_read"], manifest["rows_usable"], manifest["rows_dropped"]) == (N, N, {})
    prepared = [r for f in (result.train_file, result.val_file, result.test_file) for r in read_jsonl(f)]
    assert sorted(r["id"] for r in prepared) == list(range(N))
    for record in prepared:
        assert {k: v for k, v in record.items() if k not in ("id", "source")} == internal(
            conversations[record["id"]]
        )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_inspect_trains_calls_and_answers_and_masks_user_text_and_tool_results(
    tmp_path, capsys, tokenizer, layout
):
    conversations, rows = layout_rows(layout, SEED, N)
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    where = ["--dataset", str(path), "--data_dir", str(tmp_path / "out"), "--hf_model_id", "embedded"]
    split = ["--train_ratio", "1", "--val_ratio", "0", "--test_ratio", "0"]
    capsys.readouterr()
    run_command(["inspect", *where, *split, "--chat_template", "chatml-tools", "--n", str(N), "--json"])
    samples = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(s["row_id"] for s in samples) == list(range(N))
    for sample in samples:
        conv = conversations[sample["row_id"]]
        assert sample["trained_spans"] == chatml_trained(conv)
        assert sample["truncated_tokens"] == 0
        masked = _masked_text(tokenizer, sample)
        for prompt_text in masked_texts(conv):
            assert prompt_text in masked


def _masked_text(tokenizer, sample: dict) -> str:
    """The decoded text of a ``--json`` sample's untrained tokens (each run decoded on its own)."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"], strict=True):
        if label == -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return "".join(runs)


# --------------------------------------------------------------------------------------------------
# the join rule and the part types


def test_text_parts_are_joined_with_one_newline_in_order():
    turns = messages_of(
        user([text("Translate:"), text("Good morning", "input_text"), text(""), text("please.")]),
        assistant([text("Bonjour", "output_text"), text("!")]),
    )
    assert turns[0]["content"] == "Translate:\nGood morning\n\nplease."
    assert turns[1]["content"] == "Bonjour\n!"


def test_one_part_object_and_plain_strings_still_work():
    assert messages_of(user(text("Hi")), assistant("Hello")) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_developer_role_and_system_parts_are_the_system_turn():
    turns = messages_of(
        {
            "role": "developer",
            "content": [text("Be brief.", "input_text"), text("Use metric.", "input_text")],
        },
        user("Hi"),
        assistant("Hello"),
    )
    assert turns[0] == {"role": "system", "content": "Be brief.\nUse metric."}


@pytest.mark.parametrize(
    ("system", "expected"),
    [("Be brief.", "Be brief."), ([text("Be brief."), text("Be kind.")], "Be brief.\nBe kind.")],
    ids=["string", "blocks"],
)
def test_top_level_system_is_the_first_turn(system, expected):
    turns = messages_of(user("Hi"), assistant("Hello"), system=system)
    assert turns[0] == {"role": "system", "content": expected}


def test_a_system_turn_of_the_messages_wins_over_the_system_column():
    turns = messages_of(
        {"role": "system", "content": "Own."}, user("Hi"), assistant("Hello"), system="Column."
    )
    assert [m["content"] for m in turns] == ["Own.", "Hi", "Hello"]


def test_refusals_are_the_assistants_words():
    refusal = {"type": "refusal", "refusal": "I can't help with that."}
    assert messages_of(user("q"), assistant([refusal]))[1]["content"] == "I can't help with that."
    field = assistant(None, refusal="I won't.")
    assert messages_of(user("q"), field)[1] == {"role": "assistant", "content": "I won't."}


def test_tool_results_given_as_text_parts_are_joined_and_structured_results_stay_json():
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}, "id": "c1"}
    turns = messages_of(
        user("q"),
        assistant(None, tool_calls=[call, {**call, "id": "c2"}]),
        {"role": "tool", "tool_call_id": "c1", "content": [text("line 1"), text("line 2")]},
        {"role": "tool", "tool_call_id": "c2", "content": {"t": 20}},
        assistant("done"),
    )
    assert turns[2] == {"role": "tool", "content": "line 1\nline 2", "tool_call_id": "c1"}
    assert turns[3] == {"role": "tool", "content": '{"t": 20}', "tool_call_id": "c2"}


def test_anthropic_tool_results_come_before_the_users_text():
    """Anthropic puts tool results first in a user message; text written before them still follows
    them, as a user turn of its own, before the assistant's answer."""
    turns = messages_of(
        user("Weather?"),
        assistant([{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]),
        user(
            [
                text("Also, be quick."),
                {"type": "tool_result", "tool_use_id": "t1", "content": "-3", "is_error": False},
            ]
        ),
        assistant([text("-3 in Oslo.")]),
    )
    assert turns[1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                    "id": "t1",
                }
            ],
        },
        {"role": "tool", "content": "-3", "tool_call_id": "t1"},
        {"role": "user", "content": "Also, be quick."},
        {"role": "assistant", "content": "-3 in Oslo."},
    ]


def test_thinking_blocks_are_the_trace_and_the_field_wins():
    thinking = {"type": "thinking", "thinking": "add them", "signature": "s"}
    turns = messages_of(user("2+2?"), assistant([thinking, text("4")]))
    assert turns[1] == {"role": "assistant", "content": "4", "reasoning_content": "add them"}
    turns = messages_of(user("2+2?"), assistant([thinking, text("4")], reasoning_content="own"))
    assert turns[1]["reasoning_content"] == "own"


def test_anthropic_tools_take_input_schema_as_parameters():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    row = {
        "messages": [user("q"), assistant("a")],
        "tools": [{"type": "custom", "name": "get_weather", "description": "w", "input_schema": schema}],
    }
    assert normalize_chat_row(row, "messages")["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": schema}}
    ]


def test_sharegpt_values_may_be_parts_too():
    row = {
        "conversations": [{"from": "human", "value": [text("a"), text("b")]}, {"from": "gpt", "value": "c"}]
    }
    assert normalize_chat_row(row, "sharegpt")["messages"][0] == {"role": "user", "content": "a\nb"}


IMAGE_URL = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    ("part", "reason", "detail"),
    [
        (IMAGE_URL, "unsupported_part:image_url", "turn 0: content part 1 is an image_url part"),
        ({"type": "input_image", "image_url": "x"}, "unsupported_part:input_image", "is an input_image part"),
        ({"type": "image", "source": {}}, "unsupported_part:image", "is an image part"),
        (
            {"type": "input_audio", "input_audio": {}},
            "unsupported_part:input_audio",
            "is an input_audio part",
        ),
        ({"type": "audio", "audio": {}}, "unsupported_part:audio", "is an audio part"),
        ({"type": "file", "file": {}}, "unsupported_part:file", "is a file part"),
        ({"type": "input_file", "file_id": "f"}, "unsupported_part:input_file", "is an input_file part"),
        ({"type": "document", "source": {}}, "unsupported_part:document", "is a document part"),
        ({"type": "video_url"}, "unsupported_part:video_url", "is a video_url part"),
        ({"type": "a b" * 30}, "unsupported_part:unknown", "is an unknown part"),
        ({"text": "no type"}, "unsupported_part:untyped", "turn 0: content part 1 has no type"),
        ({"type": "text"}, "not_string:content", "turn 0: content part 1 has no 'text'"),
        ({"type": "tool_use", "name": "f", "input": {}}, "misplaced_part:tool_use", "in a user turn"),
        ({"type": "thinking", "thinking": "t"}, "misplaced_part:thinking", "only in an assistant message"),
    ],
)
def test_parts_ftpipe_cannot_train_on_are_bad_rows(part, reason, detail):
    with pytest.raises(BadRow) as err:
        messages_of(user([text("Look:"), part]), assistant("A cat."))
    assert err.value.reason == reason
    assert detail in err.value.detail


@pytest.mark.parametrize(
    ("turns", "reason", "detail"),
    [
        (
            [user("q"), assistant([text("a"), {"type": "redacted_thinking", "data": "xx"}])],
            "unsupported_part:redacted_thinking",
            "turn 1: content part 1 is a redacted_thinking part",
        ),
        (
            [user("q"), assistant([{"type": "tool_result", "tool_use_id": "t", "content": "r"}])],
            "misplaced_part:tool_result",
            "the API puts it only in a user message",
        ),
        (
            [
                user("q"),
                assistant([{"type": "tool_use", "id": "t", "name": "f", "input": {}}]),
                user([{"type": "tool_result", "tool_use_id": "t", "content": [text("r"), IMAGE_URL]}]),
                assistant("a"),
            ],
            "unsupported_part:image_url",
            "turn 2: content part 0: content part 1 is an image_url part",
        ),
        ([user("q"), assistant([])], "chat_empty_content", "turn 1 (assistant): empty content"),
        (
            [user("q"), {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"}],
            "chat_unknown_role",
            "a Responses API 'function_call' item?",
        ),
    ],
    ids=["redacted-thinking", "result-in-assistant", "image-in-result", "no-parts", "responses-item"],
)
def test_bad_block_rows(turns, reason, detail):
    with pytest.raises(BadRow) as err:
        messages_of(*turns)
    assert err.value.reason == reason
    assert detail in err.value.detail


def test_unsupported_parts_are_counted_under_skip_and_named_under_fail(tmp_path):
    from ftpipe.data.prepare import prepare_data

    good = {"messages": [user([text("Hi")]), assistant("Hello")]}
    bad = {"messages": [user([text("Look:"), IMAGE_URL]), assistant("A cat.")]}
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad, good])
    flat = {
        "dataset": str(path),
        "data_dir": str(tmp_path / "out"),
        "train_ratio": 1,
        "val_ratio": 0,
        "test_ratio": 0,
    }
    result = prepare_data(validate_config(PipelineConfig.from_flat(flat)))
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert (manifest["rows_usable"], manifest["rows_dropped"]) == (2, {"unsupported_part:image_url": 1})
    cfg = validate_config(
        PipelineConfig.from_flat({**flat, "data_dir": str(tmp_path / "out2"), "on_bad_row": "fail"})
    )
    with pytest.raises(BadRowError) as err:
        prepare_data(cfg)
    assert (
        f"{path}: line 2: bad row (unsupported_part:image_url): turn 0: content part 1 is an image_url part, "
        "which ftpipe cannot train on" in str(err.value)
    )
