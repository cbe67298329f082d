"""Tool calling and reasoning traces: both chat layouts normalised to one form, tokens trained and masked.

Token checks run on the embedded SmolLM2 tokenizer with ftpipe's ``chatml-tools`` template (and, for
the reasoning policies, with SmolLM2's own template and a history-stripping template written here).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from chat_samples import CALL_2, CALLS_1, OPENAI, SHAREGPT, STRIPPING_TEMPLATE, THINKING, TIP, WEATHER

from ftpipe.config import PipelineConfig, validate_config
from ftpipe.config.schema import DataConfig, ModelConfig
from ftpipe.data.chat import normalize_chat_row, uses_tools
from ftpipe.data.errors import BadRow, BadRowError
from ftpipe.data.render import ChatTemplateError, check_tool_template
from ftpipe.data.tokenize import (
    IGNORE_INDEX,
    encode_example,
    encode_examples,
    encode_prompt,
    reference_output,
    reference_tool_calls,
)
from ftpipe.model.tokenizer import apply_chat_template_setting

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tools_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    apply_chat_template_setting(tok, ModelConfig(chat_template="chatml-tools"))
    return tok


def spans(tokenizer, ids, labels) -> tuple[list[str], list[str]]:
    """Decoded runs of trained positions, and of masked positions."""
    trained, masked, current, flag = [], [], [], None
    for token, label in zip(ids, labels, strict=True):
        is_trained = label != IGNORE_INDEX
        if is_trained:
            assert label == token
        if flag is not None and is_trained != flag:
            (trained if flag else masked).append(tokenizer.decode(current))
            current = []
        current.append(token)
        flag = is_trained
    if current:
        (trained if flag else masked).append(tokenizer.decode(current))
    return trained, masked


def test_both_layouts_normalise_to_one_form():
    share = normalize_chat_row(SHAREGPT, "sharegpt")
    openai = normalize_chat_row(OPENAI, "messages")
    assert share == openai
    roles = [m["role"] for m in share["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "user", "assistant"]
    assert share["messages"][2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}},
        ],
    }
    assert share["tools"] == [
        {"type": "function", "function": WEATHER},
        {"type": "function", "function": TIP},
    ]
    assert uses_tools(share)


def test_text_then_call_in_sharegpt_is_one_assistant_turn():
    row = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "gpt", "value": "Let me check."},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": "cold"},
            {"from": "gpt", "value": "Cold."},
        ]
    }
    messages = normalize_chat_row(row, "sharegpt")["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert (
        messages[1]["content"] == "Let me check."
        and messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    )


@pytest.mark.parametrize(
    ("turns", "reason", "detail"),
    [
        (
            [("human", "q"), ("observation", "r"), ("gpt", "a")],
            "chat_tool_without_call",
            "turn 1: a tool result with no tool call",
        ),
        (
            [("human", "q"), ("function_call", '{"name": "f", "arguments": {}}'), ("gpt", "a")],
            "chat_call_without_result",
            "turn 2: the tool calls of turn 1 have no result",
        ),
        (
            [("human", "q"), ("function_call", '{"name": "f", "arguments": {')],
            "tool_call_invalid",
            "is not valid JSON",
        ),
        (
            [("human", "q"), ("function_call", '{"arguments": {}}')],
            "tool_call_invalid",
            "has no function name",
        ),
        (
            [("human", "q"), ("function_call", '{"name": "f", "arguments": [1]}')],
            "tool_call_invalid",
            "not a JSON object",
        ),
        (
            [("human", "q"), ("function_call", '{"name": "f", "arguments": {}}'), ("observation", "r")],
            "chat_call_without_answer",
            "the last turn is a tool turn",
        ),
        ([("human", "q"), ("gpt", "<think>never closed")], "reasoning_unclosed", "has no </think>"),
    ],
)
def test_bad_tool_rows_have_their_own_reasons(turns, reason, detail):
    row = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    with pytest.raises(BadRow) as err:
        normalize_chat_row(row, "sharegpt")
    assert err.value.reason == reason and detail in err.value.detail


def test_bad_tools_column():
    for tools, detail in [
        ("[{", "not valid JSON"),
        ('[{"description": "x"}]', "no function name"),
        ("3", "not a list"),
    ]:
        with pytest.raises(BadRow) as err:
            normalize_chat_row({**OPENAI, "tools": tools}, "messages")
        assert err.value.reason == "tools_invalid" and detail in err.value.detail


def test_tool_conversation_trains_the_calls_and_masks_the_results_token_by_token(tools_tokenizer):
    tok = tools_tokenizer
    row = {"id": 1, **normalize_chat_row(SHAREGPT, "sharegpt")}
    ex = encode_example(tok, row, DataConfig(max_seq_length=4096))
    trained, masked = spans(tok, ex.input_ids, ex.labels)
    assert trained == [CALLS_1, "Paris 20, Lyon 22.<|im_end|>", CALL_2]
    masked_text = "".join(masked)
    assert (
        '<tool_response>\n{"t": 20}\n</tool_response>\n<tool_response>\n{"t": 22}\n</tool_response>'
        in masked_text
    )
    assert '{"name": "get_weather", "description": "Current weather in a city"' in masked_text  # the schemas
    assert masked_text.startswith("<|im_start|>system\nBe brief.\n\nYou can call these functions:")
    # every token: the ids are the template's full rendering, the labels cover exactly the assistant turns
    full = tok.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert tok.decode(ex.input_ids) == full.rstrip("\n")
    # the OpenAI layout of the same conversation gives the same tokens and labels
    other = encode_example(
        tok, {"id": 1, **normalize_chat_row(OPENAI, "messages")}, DataConfig(max_seq_length=4096)
    )
    assert (other.input_ids, other.labels) == (ex.input_ids, ex.labels)
    # evaluation: the prompt is everything before the last call, the reference is that call
    prompt = encode_prompt(tok, row, DataConfig())
    assert ex.input_ids[: len(prompt)] == prompt and tok.decode(prompt).endswith(
        "Tip on 80?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert reference_tool_calls(row) == [{"name": "calculate_tip", "arguments": {"bill": 80}}]
    assert reference_output(row) == '{"name": "calculate_tip", "arguments": {"bill": 80}}'


def test_template_without_tool_support_is_refused_naming_the_option(tokenizer, tools_tokenizer):
    with pytest.raises(
        ChatTemplateError, match=r"drops the tool schemas, the tool calls\. Set chat_template"
    ):
        check_tool_template(tokenizer, "the data uses tools")
    check_tool_template(tools_tokenizer, "the data uses tools")  # chatml-tools renders them all


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_public_style_tool_file_prepares_with_no_rows_lost_and_stops_without_a_tool_template(tmp_path):
    from ftpipe.data.prepare import prepare_data, read_jsonl

    rows = [SHAREGPT] * 9 + [
        {"conversations": SHAREGPT["conversations"][:2] + SHAREGPT["conversations"][2:5]}
    ]
    path = write_jsonl(tmp_path / "agent.jsonl", rows)
    flat = {"dataset": str(path), "data_dir": str(tmp_path / "out"), "hf_model_id": "embedded"}
    with pytest.raises(ChatTemplateError, match=r"the data uses tools \(agent: 10 rows\).*Set chat_template"):
        prepare_data(validate_config(PipelineConfig.from_flat(flat)))
    assert not any((tmp_path / "out").rglob(".data_ready")) and not any((tmp_path / "out").rglob("*.jsonl"))
    result = prepare_data(
        validate_config(PipelineConfig.from_flat({**flat, "chat_template": "chatml-tools"}))
    )
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert (
        manifest["rows_dropped"] == {} and manifest["rows_usable"] == 10 and manifest["rows_with_tools"] == 10
    )
    prepared = [r for f in (result.train_file, result.val_file, result.test_file) for r in read_jsonl(f)]
    assert all(r["source"] == "agent" and uses_tools(r) for r in prepared)
    assert sum("tools" in r for r in prepared) == 9  # the tenth row calls a tool but lists no schemas


def test_on_bad_row_fail_names_the_tool_reason(tmp_path):
    from ftpipe.data.prepare import prepare_data

    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"}]}
    path = write_jsonl(tmp_path / "agent.jsonl", [SHAREGPT, bad])
    cfg = PipelineConfig.from_flat(
        {
            "dataset": str(path),
            "data_dir": str(tmp_path / "out"),
            "on_bad_row": "fail",
            "chat_template": "chatml-tools",
        }
    )
    with pytest.raises(BadRowError, match=r"agent\.jsonl: line 2: bad row \(chat_tool_without_call\)"):
        prepare_data(validate_config(cfg))


# --------------------------------------------------------------------------------------------------
# reasoning traces


def test_traces_are_normalised_from_think_tags_and_fields():
    messages = normalize_chat_row(THINKING, "messages")["messages"]
    assert messages[1] == {"role": "assistant", "content": "4", "reasoning_content": "add them"}
    assert messages[3] == {"role": "assistant", "content": "6", "reasoning_content": "add again"}
    other = normalize_chat_row(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "thinking": "t"},
            ]
        },
        "messages",
    )
    assert other["messages"][1]["reasoning_content"] == "t"


@pytest.mark.parametrize(
    ("reasoning", "expected"),
    [
        (
            "train",
            ["<think>\nadd them\n</think>\n\n4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"],
        ),
        ("drop", ["4<|im_end|>", "6<|im_end|>"]),
    ],
)
@pytest.mark.parametrize("template", ["chatml-tools", "smollm2"])
def test_reasoning_policies_on_real_token_ids(tokenizer, tools_tokenizer, template, reasoning, expected):
    """chatml-tools renders reasoning_content itself; SmolLM2's template ignores it, so the trace is written
    into the content: the trained tokens are the same either way, never silently lost."""
    tok = tools_tokenizer if template == "chatml-tools" else tokenizer
    row = {"id": 3, **normalize_chat_row(THINKING, "messages")}
    ex = encode_example(tok, row, DataConfig(reasoning=reasoning))
    trained, masked = spans(tok, ex.input_ids, ex.labels)
    assert trained == expected
    assert "add" not in "".join(masked)


def test_empty_think_adds_the_trace_the_template_adds_at_inference(tokenizer, tools_tokenizer):
    row = {"id": 4, "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    # a template that renders traces: an empty one before the trained answer
    ex = encode_example(tools_tokenizer, row, DataConfig(reasoning="empty_think"))
    assert spans(tools_tokenizer, ex.input_ids, ex.labels)[0] == ["<think>\n\n</think>\n\n4<|im_end|>"]
    # a thinking template with an enable_thinking switch: the empty trace is in the (masked) prompt,
    # exactly as the template writes it at inference with enable_thinking=false
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = STRIPPING_TEMPLATE
    ex = encode_example(tok, row, DataConfig(reasoning="empty_think"))
    trained, masked = spans(tok, ex.input_ids, ex.labels)
    assert trained == ["4<|im_end|>"]
    assert masked[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    prompt = encode_prompt(tok, row, DataConfig(reasoning="empty_think"))
    assert tok.decode(prompt) == tok.apply_chat_template(
        row["messages"][:1], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )


def test_history_stripping_template_trains_each_turn_with_its_inference_history(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = STRIPPING_TEMPLATE
    row = {"id": 5, **normalize_chat_row(THINKING, "messages")}
    examples, per_turn = encode_examples(tok, row, DataConfig())
    assert per_turn and len(examples) == 2
    first, second = examples
    assert tok.decode(first.input_ids) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>"
    )
    assert spans(tok, first.input_ids, first.labels)[0] == ["<think>\nadd them\n</think>\n\n4<|im_end|>"]
    # the second sample's history is rendered as at inference: the first trace stripped, masked
    assert tok.decode(second.input_ids) == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd again\n</think>\n\n6<|im_end|>"
    )
    assert spans(tok, second.input_ids, second.labels)[0] == ["<think>\nadd again\n</think>\n\n6<|im_end|>"]
    # the evaluation prompt is the second sample's context, token for token
    prompt = encode_prompt(tok, row, DataConfig())
    assert second.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in second.labels[: len(prompt)])


def test_dataset_counts_and_logs_per_turn_samples(tokenizer, tmp_path, caplog):
    import logging

    from ftpipe.data.dataset import SFTDataset

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = STRIPPING_TEMPLATE
    rows = [{"id": i, **normalize_chat_row(THINKING, "messages")} for i in range(3)]
    rows.append(
        {"id": 9, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    path = write_jsonl(tmp_path / "training.jsonl", rows)
    caplog.set_level(logging.INFO, logger="ftpipe")
    ds = SFTDataset(path, tok, DataConfig(), cache_dir=str(tmp_path / "cache"))
    assert (ds.stats.rows, ds.stats.kept, ds.stats.per_turn_rows, ds.stats.per_turn_samples) == (4, 7, 3, 6)
    assert len(ds) == 7
    assert any(
        "3 conversations were trained as 6 samples, one per assistant turn" in r.getMessage()
        for r in caplog.records
    )


def test_prepared_rows_keep_their_own_keys_through_the_dataset(tools_tokenizer, tmp_path):
    """Tool arguments and schemas differ from row to row; a column-typed loader would give every row every
    key (null-filled). Each dataset sample equals its row encoded alone."""
    from ftpipe.data.dataset import SFTDataset

    timer = {
        "name": "set_timer",
        "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}}},
    }
    rows = [
        {"id": 0, **normalize_chat_row(SHAREGPT, "sharegpt")},
        {
            "id": 1,
            "messages": [
                {"role": "user", "content": "Timer for 5"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "set_timer", "arguments": {"minutes": 5}}}
                    ],
                },
            ],
            "tools": [{"type": "function", "function": timer}],
        },
    ]
    path = write_jsonl(tmp_path / "training.jsonl", rows)
    cfg = DataConfig(max_seq_length=4096)
    ds = SFTDataset(path, tools_tokenizer, cfg, cache_dir=str(tmp_path / "cache"))
    for i, row in enumerate(rows):
        ex = encode_example(tools_tokenizer, row, cfg)
        assert ds[i] == {"input_ids": ex.input_ids, "labels": ex.labels}
    assert "null" not in tools_tokenizer.decode(ds[1]["input_ids"])
    assert [ds.samples[i]["source"] for i in range(2)] == [None, None] and ds.samples[1]["row_id"] == 1
