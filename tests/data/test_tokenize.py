"""Tokenization with loss masking on the embedded SmolLM2 tokenizer (pad == eos == <|im_end|>)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from ftpipe.config.schema import DataConfig, ModelConfig
from ftpipe.data.dataset import SFTDataset
from ftpipe.data.tokenize import (
    IGNORE_INDEX,
    ChatTemplateError,
    encode_example,
    encode_examples,
    encode_prompt,
    fit_to_length,
    reference_output,
)
from ftpipe.model.tokenizer import ensure_pad_token, load_tokenizer

PROMPT = "### Instruction:\nSay hi\n\n### Response:\n"
# Hand-checked ids of PROMPT and of "Hi there!" with the SmolLM2 tokenizer; 2 is <|im_end|> (EOS and pad).
PROMPT_IDS = [3757, 20880, 42, 198, 36218, 15876, 198, 198, 3757, 14212, 42, 198]
OUTPUT_IDS = [26843, 665, 17]
EOS = 2
ROW = {"id": 1, "input": PROMPT, "output": "Hi there!"}
CHAT = {
    "id": 7,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"},
    ],
}


def labelled_spans(tokenizer, ids, labels) -> list[str]:
    """Decoded runs of consecutive labelled positions (labels equal the ids there)."""
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.timeout(30)
def test_alpaca_masking_boundary_is_exact(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == EOS
    ex = encode_example(tokenizer, ROW, DataConfig(max_seq_length=64))
    assert ex.input_ids == PROMPT_IDS + OUTPUT_IDS + [EOS]
    assert ex.labels == [IGNORE_INDEX] * 12 + OUTPUT_IDS + [EOS]
    assert not ex.prompt_truncated and not ex.output_cut
    assert labelled_spans(tokenizer, ex.input_ids, ex.labels) == ["Hi there!<|im_end|>"]
    # no BOS added (SmolLM2 adds none to plain text) and the evaluation prompt is the same prefix
    assert encode_prompt(tokenizer, ROW, DataConfig()) == PROMPT_IDS
    assert reference_output(ROW) == "Hi there!"


@pytest.mark.timeout(30)
def test_output_already_ending_with_eos_is_not_doubled(tokenizer):
    ex = encode_example(tokenizer, {**ROW, "output": "Hi there!<|im_end|>"}, DataConfig())
    assert ex.input_ids == PROMPT_IDS + OUTPUT_IDS + [EOS]


@pytest.mark.timeout(30)
def test_long_prompt_is_cut_from_the_left_and_output_kept(tokenizer):
    ex = encode_example(tokenizer, ROW, DataConfig(), max_len=10)
    assert ex.input_ids == PROMPT_IDS[-6:] + OUTPUT_IDS + [EOS]
    assert ex.labels == [IGNORE_INDEX] * 6 + OUTPUT_IDS + [EOS]
    assert ex.prompt_truncated and not ex.output_cut
    exact = encode_example(tokenizer, ROW, DataConfig(), max_len=16)  # fits exactly
    assert len(exact.input_ids) == 16 and not exact.prompt_truncated


@pytest.mark.timeout(30)
def test_output_alone_too_long_is_cut_from_the_right_without_eos(tokenizer):
    # 4 output tokens (with EOS) + at least 1 prompt token do not fit in 4: output cut to 3, EOS gone.
    ex = encode_example(tokenizer, ROW, DataConfig(), max_len=4)
    assert ex.input_ids == PROMPT_IDS[-1:] + OUTPUT_IDS
    assert ex.labels == [IGNORE_INDEX, *OUTPUT_IDS]
    assert ex.prompt_truncated and ex.output_cut
    assert EOS not in ex.input_ids


@pytest.mark.timeout(30)
def test_fit_to_length_keeps_head_and_forces_first_label_masked():
    ex = fit_to_length([1, 10, 11, 12], [-100] * 4, [20, 21, 2], [20, 21, 2], max_len=5, keep_head=1)
    assert ex.input_ids == [1, 12, 20, 21, 2] and ex.prompt_truncated
    # no context at all: position 0 can not be predicted, its label is masked
    ex = fit_to_length([], [], [20, 21, 2], [20, 21, 2], max_len=8)
    assert ex.labels == [IGNORE_INDEX, 21, 2]
    assert fit_to_length([], [], [2], [2], max_len=8) is None
    # the prompt keeps max_len // 4 tokens before the answer is cut instead
    ctx, ans = list(range(100, 110)), [*range(200, 208), 2]
    ex = fit_to_length(ctx, [-100] * 10, ans, ans, max_len=12)  # 9 answer tokens + 3 prompt tokens fit
    assert ex.input_ids == [107, 108, 109, *ans] and not ex.output_cut
    ex = fit_to_length(ctx, [-100] * 10, [199, *ans], [199, *ans], max_len=12)
    assert ex.input_ids == [107, 108, 109, 199, *range(200, 208)] and ex.output_cut and ex.prompt_truncated
    assert fit_to_length([5, 6], [-100, -100], [20, 2], [20, 2], max_len=1) is None


@pytest.mark.timeout(30)
def test_chat_template_for_alpaca_rows(tokenizer):
    ex = encode_example(tokenizer, ROW, DataConfig(use_chat_template=True))
    text = tokenizer.decode(ex.input_ids)
    default_system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    assert (
        text
        == default_system
        + f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>"
    )
    assert ex.input_ids[-5:] == [198, *OUTPUT_IDS, EOS]  # EOS once: it is the template's end of turn
    assert labelled_spans(tokenizer, ex.input_ids, ex.labels) == ["Hi there!<|im_end|>"]
    prompt = encode_prompt(tokenizer, ROW, DataConfig(use_chat_template=True))
    assert prompt == ex.input_ids[: len(prompt)] and len(prompt) == len(ex.input_ids) - 4

    with_system = encode_example(
        tokenizer, ROW, DataConfig(use_chat_template=True, system_prompt="Be brief.")
    )
    assert tokenizer.decode(with_system.input_ids).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n### Instruction"
    )


@pytest.mark.timeout(30)
def test_multi_turn_chat_trains_every_assistant_turn_only(tokenizer):
    ex = encode_example(tokenizer, CHAT, DataConfig())
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(ex.input_ids) + "\n" == full  # the final turn's trailing newline is left out
    assert labelled_spans(tokenizer, ex.input_ids, ex.labels) == ["Hello!<|im_end|>", "Goodbye!<|im_end|>"]
    prompt = encode_prompt(tokenizer, CHAT, DataConfig())
    assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(
        CHAT["messages"][:-1], add_generation_prompt=True, tokenize=False
    )
    assert ex.input_ids[: len(prompt)] == prompt and reference_output(CHAT) == "Goodbye!"


@pytest.mark.timeout(30)
def test_chat_without_system_uses_template_default_or_system_prompt(tokenizer):
    row = {"id": 8, "messages": CHAT["messages"][1:]}
    ex = encode_example(tokenizer, row, DataConfig())
    text = tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert labelled_spans(tokenizer, ex.input_ids, ex.labels) == ["Hello!<|im_end|>", "Goodbye!<|im_end|>"]
    ex = encode_example(tokenizer, row, DataConfig(system_prompt="Be terse."))
    assert tokenizer.decode(ex.input_ids).startswith(
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi"
    )
    assert labelled_spans(tokenizer, ex.input_ids, ex.labels) == ["Hello!<|im_end|>", "Goodbye!<|im_end|>"]


@pytest.mark.timeout(30)
def test_chat_truncation_drops_oldest_tokens_and_keeps_last_turn(tokenizer):
    whole = encode_example(tokenizer, CHAT, DataConfig())
    ex = encode_example(tokenizer, CHAT, DataConfig(), max_len=20)
    assert ex.input_ids == whole.input_ids[-20:] and ex.labels[1:] == whole.labels[-19:]
    assert ex.prompt_truncated and not ex.output_cut
    assert labelled_spans(tokenizer, ex.input_ids, ex.labels)[-1] == "Goodbye!<|im_end|>"


@pytest.mark.timeout(30)
def test_history_rewriting_template_trains_one_sample_per_assistant_turn(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # renders earlier assistant turns differently once a later turn exists
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}[earlier]{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    examples, per_turn = encode_examples(tok, CHAT, DataConfig())
    assert per_turn and len(examples) == 2
    first, last = examples
    # each sample: the history as the template renders it at inference, trained on its own turn only
    assert tok.decode(first.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>"
    )
    assert labelled_spans(tok, first.input_ids, first.labels) == ["Hello!<|im_end|>"]
    assert tok.decode(last.input_ids).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n[earlier]"
    )
    assert labelled_spans(tok, last.input_ids, last.labels) == ["Goodbye!<|im_end|>"]
    assert encode_example(tok, CHAT, DataConfig()) == last
    assert (
        encode_prompt(tok, CHAT, DataConfig())
        == last.input_ids[: len(encode_prompt(tok, CHAT, DataConfig()))]
    )


@pytest.mark.timeout(30)
def test_template_whose_generation_prompt_is_not_the_turn_start_fails_naming_the_row(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"row id 7: .*assistant turn 2 .*generation prompt"):
        encode_example(tok, CHAT, DataConfig())


@pytest.mark.timeout(60)
def test_missing_chat_template_fails_before_tokenizing(tokenizer, tmp_path, monkeypatch):
    import datasets

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [ROW])
    chat = write_jsonl(tmp_path / "chat.jsonl", [CHAT])

    def no_map(*args, **kwargs):
        raise AssertionError("tokenization started before the chat template was checked")

    monkeypatch.setattr(datasets.Dataset, "map", no_map)
    cache = str(tmp_path / "cache")
    with pytest.raises(
        ChatTemplateError, match=r"SmolLM2-135M-Instruct has no chat template.*use_chat_template: false"
    ):
        SFTDataset(alpaca, tok, DataConfig(use_chat_template=True), cache_dir=cache)
    with pytest.raises(
        ChatTemplateError, match=r"SmolLM2-135M-Instruct has no chat template, but the data has chat rows"
    ):
        SFTDataset(chat, tok, DataConfig(), cache_dir=cache)


@pytest.mark.timeout(60)
def test_dataset_counts_truncated_cut_and_dropped(tokenizer, tmp_path, caplog):
    rows = [
        ROW,
        {"id": 2, "input": "x " * 40, "output": "Hi there!"},  # long prompt: truncated from the left
        {"id": 3, "input": "Q", "output": "word " * 40},  # output alone too long: cut
        {"id": 4, "messages": [{"role": "user", "content": "no answer"}]},  # nothing to learn: dropped
    ]
    path = write_jsonl(tmp_path / "training.jsonl", rows)
    caplog.set_level(logging.INFO, logger="ftpipe")
    ds = SFTDataset(path, tokenizer, DataConfig(max_seq_length=24), cache_dir=str(tmp_path / "cache"))
    s = ds.stats
    assert (s.rows, s.kept, s.truncated_prompts, s.cut_outputs, s.dropped) == (4, 3, 1, 1, 1)
    assert len(ds) == 3
    first = ds[0]
    assert first == {"input_ids": PROMPT_IDS + OUTPUT_IDS + [EOS], "labels": [-100] * 12 + OUTPUT_IDS + [EOS]}
    assert [len(ds[i]["input_ids"]) for i in range(3)] == [16, 24, 24]
    assert ds[2]["input_ids"][-1] != EOS  # a cut answer does not pretend to end
    assert s.label_tokens == sum(sum(x != -100 for x in ds[i]["labels"]) for i in range(3))
    assert s.tokens == 16 + 24 + 24
    logged = [r.getMessage() for r in caplog.records if "rows dropped" in r.getMessage()]
    assert len(logged) == 1 and "4 rows -> 3 samples" in logged[0] and "1 answers cut" in logged[0]


@pytest.mark.timeout(60)
def test_empty_split_gives_empty_dataset(tokenizer, tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text("", encoding="utf-8")
    ds = SFTDataset(path, tokenizer, DataConfig(), cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 0 and ds.stats.rows == 0


@pytest.mark.timeout(30)
def test_missing_pad_token_is_set_to_eos_and_logged(tokenizer, caplog):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    caplog.set_level(logging.INFO, logger="ftpipe")
    assert ensure_pad_token(tok) is tok
    assert tok.pad_token == "<|im_end|>" and tok.pad_token_id == EOS
    assert any("has no pad token" in r.getMessage() and "EOS" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_load_tokenizer_embedded(embedded_model_path, caplog):
    caplog.set_level(logging.INFO, logger="ftpipe")
    tok = load_tokenizer(ModelConfig(hf_model_id="embedded", trust_remote_code=True))
    assert tok.padding_side == "right" and tok.pad_token_id == tok.eos_token_id == EOS
    assert any(r.levelno == logging.WARNING and "trust_remote_code" in r.getMessage() for r in caplog.records)
    with pytest.raises(OSError, match="hf_model_id"):
        load_tokenizer(ModelConfig(hf_model_id=str(embedded_model_path / "missing")))
