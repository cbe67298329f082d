"""``ftpipe inspect``: every data layout shows exactly the spans that are trained (``--json``), and the
text view marks them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_samples import CALL_2, CALLS_1, OPENAI, SHAREGPT, STRIPPING_TEMPLATE, THINKING

from ftpipe.cli.main import run_command

pytestmark = pytest.mark.timeout(120)
ALPACA = [
    {"instruction": "Say hi", "input": "", "output": "Hi there!"},
    {"instruction": "Count", "input": "to 3", "output": "1 2 3"},
]
CHAT = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ]
}


def run_inspect(tmp_path: Path, capsys, rows: list[dict], *flags: str) -> str:
    """``ftpipe inspect`` on ``rows`` (all in the training split); returns what it printed."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    where = ["--dataset", str(path), "--data_dir", str(tmp_path / "out"), "--hf_model_id", "embedded"]
    split = ["--train_ratio", "1", "--val_ratio", "0", "--test_ratio", "0"]
    capsys.readouterr()
    run_command(["inspect", *where, *split, *flags])
    return capsys.readouterr().out


def inspect_json(tmp_path: Path, capsys, rows: list[dict], *flags: str) -> list[dict]:
    return [json.loads(line) for line in run_inspect(tmp_path, capsys, rows, "--json", *flags).splitlines()]


def test_alpaca_trains_the_answer_and_eos(tmp_path, capsys):
    samples = inspect_json(tmp_path, capsys, ALPACA, "--n", "5", "--use_chat_template")
    assert len(samples) == 2
    by_answer = {s["trained_spans"][0]: s for s in samples}
    assert set(by_answer) == {"Hi there!<|im_end|>", "1 2 3<|im_end|>"}
    sample = by_answer["Hi there!<|im_end|>"]
    assert sample["source"] == "data" and sample["truncated_tokens"] == 0
    assert sample["trained_tokens"] == sum(label != -100 for label in sample["labels"])
    assert sample["prompt_tokens"] + sample["trained_tokens"] == len(sample["input_ids"])


def test_chat_trains_every_assistant_turn(tmp_path, capsys):
    [sample] = inspect_json(tmp_path, capsys, [CHAT])
    assert sample["trained_spans"] == ["Hello!<|im_end|>", "Goodbye!<|im_end|>"]


@pytest.mark.parametrize("row", [SHAREGPT, OPENAI], ids=["sharegpt", "openai"])
def test_tool_layouts_train_the_calls_and_answers_only(tmp_path, capsys, row):
    [sample] = inspect_json(tmp_path, capsys, [row], "--chat_template", "chatml-tools")
    assert sample["trained_spans"] == [CALLS_1, "Paris 20, Lyon 22.<|im_end|>", CALL_2]


@pytest.mark.parametrize(
    ("policy", "spans"),
    [
        (
            "train",
            ["<think>\nadd them\n</think>\n\n4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"],
        ),
        ("drop", ["4<|im_end|>", "6<|im_end|>"]),
    ],
)
def test_reasoning_policies(tmp_path, capsys, policy, spans):
    [sample] = inspect_json(
        tmp_path, capsys, [THINKING], "--chat_template", "chatml-tools", "--reasoning", policy
    )
    assert sample["trained_spans"] == spans


def test_history_rewriting_template_shows_one_sample_per_turn(tmp_path, capsys):
    template = tmp_path / "stripping.jinja"
    template.write_text(STRIPPING_TEMPLATE, encoding="utf-8")
    samples = inspect_json(tmp_path, capsys, [THINKING], "--chat_template", str(template))
    assert [s["turn"] for s in samples] == [0, 1]
    assert [s["trained_spans"] for s in samples] == [
        ["<think>\nadd them\n</think>\n\n4<|im_end|>"],
        ["<think>\nadd again\n</think>\n\n6<|im_end|>"],
    ]


def test_text_view_marks_trained_spans_and_counts(tmp_path, capsys):
    out = run_inspect(tmp_path, capsys, [CHAT], "--max_seq_length", "20")
    assert "[[Goodbye!<|im_end|>]]" in out
    assert "sample 1 of 1 (row id 0, source data)" in out and "; 30 truncated" in out
    assert "(trained spans are between [[ and ]])" in out
