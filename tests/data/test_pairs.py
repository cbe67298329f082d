"""Preference pairs on the embedded SmolLM2 tokenizer (pad == eos == <|im_end|>, id 2): encoding in both
record forms, equality with SFT's encoding, truncation, drops, batching, the cached dataset and inspect."""

from __future__ import annotations

import copy
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from chat_samples import CALL_2, CALLS_1, OPENAI, STRIPPING_TEMPLATE, THINKING
from hypothesis import given, settings
from hypothesis import strategies as st

from ftpipe.config.schema import DataConfig, ModelConfig, ObjectiveConfig, PipelineConfig
from ftpipe.data import pairs as pairs_module
from ftpipe.data.chat import normalize_chat_row
from ftpipe.data.errors import DataError
from ftpipe.data.inspect import InspectOptions, inspect, inspect_pairs, print_pairs
from ftpipe.data.pairs import PairCollator, PairDataset, PairEncoding, encode_pair, fit_pair
from ftpipe.data.tokenize import (
    IGNORE_INDEX,
    MIN_PROMPT_FRACTION,
    encode_example,
    encode_prompt,
)
from ftpipe.model.tokenizer import apply_chat_template_setting

pytestmark = pytest.mark.timeout(60)

EOS = 2
PROMPT = "### Instruction:\nSay hi\n\n### Response:\n"
# Hand-checked ids (the same as in test_tokenize.py): PROMPT, "Hi there!" and "Go away."
PROMPT_IDS = [3757, 20880, 42, 198, 36218, 15876, 198, 198, 3757, 14212, 42, 198]
CHOSEN_IDS = [26843, 665, 17]
REJECTED_IDS = [6044, 2025, 30]
TEXT = {"id": 1, "prompt": PROMPT, "chosen": "Hi there!", "rejected": "Go away.", "source": "demo"}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a fruit"},
]
CHAT = {
    "id": 5,
    "prompt": HISTORY,
    "chosen": [{"role": "assistant", "content": "Apple."}],
    "rejected": [{"role": "assistant", "content": "No."}],
}


def trained(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of labelled positions (each label equals its id)."""
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return [tokenizer.decode(s) for s in [*spans, current] if s]


def check_shared_prompt(pair: PairEncoding) -> None:
    """Both sides start with the same prompt, which is masked, as is position 0."""
    n = pair.prompt_length
    assert pair.chosen_input_ids[:n] == pair.rejected_input_ids[:n]
    for ids, labels in (
        (pair.chosen_input_ids, pair.chosen_labels),
        (pair.rejected_input_ids, pair.rejected_labels),
    ):
        assert len(ids) == len(labels) and labels[:n] == [IGNORE_INDEX] * n and labels[0] == IGNORE_INDEX


@pytest.fixture(scope="module")
def tools_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    apply_chat_template_setting(tok, ModelConfig(chat_template="chatml-tools"))
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The embedded tokenizer made to put BOS (<|im_start|>, id 1) before plain text, Llama style."""
    tok = copy.deepcopy(tokenizer)
    tok.add_bos_token = True
    assert tok("a")["input_ids"][0] == tok.bos_token_id == 1
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# encoding


def test_text_pair_exact_ids_and_labels(tokenizer):
    pair = encode_pair(tokenizer, TEXT, DataConfig(max_seq_length=64))
    assert pair.chosen_input_ids == PROMPT_IDS + CHOSEN_IDS + [EOS]
    assert pair.chosen_labels == [IGNORE_INDEX] * 12 + CHOSEN_IDS + [EOS]
    assert pair.rejected_input_ids == PROMPT_IDS + REJECTED_IDS + [EOS]
    assert pair.rejected_labels == [IGNORE_INDEX] * 12 + REJECTED_IDS + [EOS]
    assert (pair.prompt_length, pair.full_length, pair.drop) == (12, 16, None)
    assert not pair.prompt_truncated and not pair.answers_cut
    # the same ids as the SFT sample of prompt + each answer
    for side in ("chosen", "rejected"):
        sft = encode_example(tokenizer, {"id": 1, "input": PROMPT, "output": TEXT[side]}, DataConfig())
        assert getattr(pair, f"{side}_input_ids") == sft.input_ids
        assert getattr(pair, f"{side}_labels") == sft.labels
    # an answer already ending with EOS does not get a second one
    doubled = encode_pair(tokenizer, {**TEXT, "chosen": "Hi there!<|im_end|>"}, DataConfig())
    assert doubled.chosen_input_ids == pair.chosen_input_ids


def test_text_pair_through_the_chat_template(tokenizer):
    cfg = DataConfig(use_chat_template=True)
    pair = encode_pair(tokenizer, TEXT, cfg)
    check_shared_prompt(pair)
    sft = encode_example(tokenizer, {"id": 1, "input": PROMPT, "output": "Hi there!"}, cfg)
    assert pair.chosen_input_ids == sft.input_ids and pair.chosen_labels == sft.labels
    assert pair.chosen_input_ids[: pair.prompt_length] == encode_prompt(tokenizer, {"input": PROMPT}, cfg)
    assert trained(tokenizer, pair.rejected_input_ids, pair.rejected_labels) == ["Go away.<|im_end|>"]
    # the record's system message, else system_prompt; a plain prompt has no place for it
    with_system = encode_pair(tokenizer, {**TEXT, "system": "Be brief."}, cfg)
    like_sft = encode_example(
        tokenizer,
        {"id": 1, "input": PROMPT, "output": "Hi there!"},
        DataConfig(use_chat_template=True, system_prompt="Be brief."),
    )
    assert with_system.chosen_input_ids == like_sft.input_ids
    assert tokenizer.decode(with_system.chosen_input_ids).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )
    overridden = encode_pair(
        tokenizer, {**TEXT, "system": "Be brief."}, DataConfig(use_chat_template=True, system_prompt="Other.")
    )
    assert overridden.chosen_input_ids == with_system.chosen_input_ids
    plain = encode_pair(tokenizer, {**TEXT, "system": "Be brief."}, DataConfig())
    assert plain.chosen_input_ids == PROMPT_IDS + CHOSEN_IDS + [EOS]


def test_chat_pair_trains_only_the_final_answer_and_matches_sft(tokenizer):
    pair = encode_pair(tokenizer, CHAT, DataConfig())
    check_shared_prompt(pair)
    assert trained(tokenizer, pair.chosen_input_ids, pair.chosen_labels) == ["Apple.<|im_end|>"]
    assert trained(tokenizer, pair.rejected_input_ids, pair.rejected_labels) == ["No.<|im_end|>"]
    # the earlier assistant turn "Hello!" is in the prompt, masked
    assert "Hello!" in tokenizer.decode(pair.chosen_input_ids[: pair.prompt_length])
    for side in ("chosen", "rejected"):
        sft_row = {"id": 5, "messages": HISTORY + CHAT[side]}
        assert (
            getattr(pair, f"{side}_input_ids") == encode_example(tokenizer, sft_row, DataConfig()).input_ids
        )
        # the prompt is what generation starts from
        assert getattr(pair, f"{side}_input_ids")[: pair.prompt_length] == encode_prompt(
            tokenizer, sft_row, DataConfig()
        )
    assert tokenizer.decode(pair.chosen_input_ids).endswith(
        "<|im_start|>user\nName a fruit<|im_end|>\n<|im_start|>assistant\nApple.<|im_end|>"
    )
    # system_prompt applies as in SFT when the prompt has no system message
    cfg = DataConfig(system_prompt="Be terse.")
    no_system = {**CHAT, "prompt": HISTORY[1:]}
    pair = encode_pair(tokenizer, no_system, cfg)
    sft = encode_example(tokenizer, {"id": 5, "messages": HISTORY[1:] + CHAT["chosen"]}, cfg)
    assert pair.chosen_input_ids == sft.input_ids
    assert tokenizer.decode(pair.chosen_input_ids).startswith("<|im_start|>system\nBe terse.")


def test_tools_in_the_prompt_and_a_tool_call_as_the_answer(tools_tokenizer):
    tok = tools_tokenizer
    convo = normalize_chat_row(OPENAI, "messages")
    record = {
        "id": 9,
        "prompt": convo["messages"][:-1],  # ends with the user asking for a tip
        "chosen": convo["messages"][-1:],  # answered by a tool call
        "rejected": [{"role": "assistant", "content": "About 12."}],
        "tools": convo["tools"],
    }
    pair = encode_pair(tok, record, DataConfig())
    check_shared_prompt(pair)
    assert trained(tok, pair.chosen_input_ids, pair.chosen_labels) == [CALL_2]
    assert trained(tok, pair.rejected_input_ids, pair.rejected_labels) == ["About 12.<|im_end|>"]
    prompt = tok.decode(pair.chosen_input_ids[: pair.prompt_length])
    assert "get_weather" in prompt and "calculate_tip" in prompt  # the tool schemas
    assert '{"t": 20}' in prompt  # the earlier tool results: context
    sft = encode_example(tok, {"id": 9, "messages": convo["messages"], "tools": convo["tools"]}, DataConfig())
    assert pair.chosen_input_ids == sft.input_ids
    assert pair.chosen_labels[pair.prompt_length :] == sft.labels[pair.prompt_length :]


def test_an_answer_of_several_turns_trains_its_assistant_turns_only(tools_tokenizer):
    tok = tools_tokenizer
    convo = normalize_chat_row(OPENAI, "messages")
    messages, tools = convo["messages"], convo["tools"]
    record = {
        "id": 4,
        "prompt": messages[:2],  # system, user
        "chosen": messages[2:6],  # two calls, their results, the answer
        "rejected": [{"role": "assistant", "content": "I cannot know."}],
        "tools": tools,
    }
    pair = encode_pair(tok, record, DataConfig())
    check_shared_prompt(pair)
    spans = trained(tok, pair.chosen_input_ids, pair.chosen_labels)
    assert spans == [CALLS_1, "Paris 20, Lyon 22.<|im_end|>"]  # the tool results are not trained
    sft = encode_example(tok, {"id": 4, "messages": messages[:6], "tools": tools}, DataConfig())
    assert pair.chosen_input_ids == sft.input_ids and pair.chosen_labels == sft.labels  # SFT trains the same


def test_reasoning_policy_and_history_rewriting_template(tokenizer):
    record = {
        "id": 2,
        "prompt": THINKING["messages"][:3],
        "chosen": THINKING["messages"][3:],
        "rejected": [{"role": "assistant", "content": "7", "reasoning_content": "guess"}],
    }
    for policy in ("train", "drop"):
        cfg = DataConfig(reasoning=policy)
        pair = encode_pair(tokenizer, record, cfg)
        check_shared_prompt(pair)
        sft = encode_example(tokenizer, {"id": 2, "messages": THINKING["messages"]}, cfg)
        assert pair.chosen_input_ids == sft.input_ids
        spans = trained(tokenizer, pair.chosen_input_ids, pair.chosen_labels)
        assert spans == (
            ["<think>\nadd again\n</think>\n\n6<|im_end|>"] if policy == "train" else ["6<|im_end|>"]
        )
    # a template that strips reasoning from history: the prompt as rendered at inference, as in SFT
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = STRIPPING_TEMPLATE
    pair = encode_pair(tok, record, DataConfig())
    check_shared_prompt(pair)
    sft = encode_example(tok, {"id": 2, "messages": THINKING["messages"]}, DataConfig())
    assert pair.chosen_input_ids == sft.input_ids and pair.chosen_labels == sft.labels
    assert "add them" not in tok.decode(pair.chosen_input_ids[: pair.prompt_length])
    assert trained(tok, pair.rejected_input_ids, pair.rejected_labels) == [
        "<think>\nguess\n</think>\n\n7<|im_end|>"
    ]


def test_a_prompt_rendered_differently_per_answer_is_a_data_error(tokenizer, monkeypatch):
    tok = copy.deepcopy(tokenizer)
    # counts the tool results in a header: the prompt changes once an answer with a tool result follows
    tok.chat_template = (
        "{%- set ns = namespace(tools=0) %}{%- for m in messages %}{%- if m.role == 'tool' %}"
        "{%- set ns.tools = ns.tools + 1 %}{%- endif %}{%- endfor %}"
        "<|im_start|>system\ntool results: {{ ns.tools }}<|im_end|>\n"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    several = [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
        },
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "done"},
    ]
    with pytest.raises(DataError, match=r"row id 5 \(prompt \+ chosen\): .*renders the prompt differently"):
        encode_pair(tok, {**CHAT, "chosen": several}, DataConfig())
    # the final check: both sides must hold the very same prompt ids
    real = pairs_module._chat_side

    def skewed(tok, record, side, cfg, eos):
        prompt, ids, labels = real(tok, record, side, cfg, eos)
        return ([*prompt, 7] if side == "rejected" else prompt), ids, labels

    monkeypatch.setattr(pairs_module, "_chat_side", skewed)
    with pytest.raises(
        DataError, match=r"row id 5: .*renders the prompt differently depending on the answer"
    ):
        encode_pair(tokenizer, CHAT, DataConfig())


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": 3, "input": "q", "output": "a"}, r"row id 3: not a preference pair .*objective: dpo"),
        ({"id": 3, "prompt": 4, "chosen": "a", "rejected": "b"}, r"row id 3: 'prompt' must be"),
        ({"id": 3, "prompt": "q", "chosen": "a", "rejected": None}, r"row id 3: field 'rejected'"),
        ({**CHAT, "chosen": []}, r"row id 5: 'chosen' must be a non-empty list"),
        ({**CHAT, "prompt": ["Hi"]}, r"row id 5: 'prompt' must be a non-empty list of messages"),
        (
            {**CHAT, "rejected": [{"role": "user", "content": "x"}]},
            r"row id 5: the rejected answer must begin",
        ),
        (
            {**CHAT, "prompt": [{"role": "assistant", "content": "x"}]},
            r"row id 5 \(prompt \+ chosen\): turn 0",
        ),
    ],
)
def test_unusable_records_name_the_row(tokenizer, record, message):
    with pytest.raises(DataError, match=message):
        encode_pair(tokenizer, record, DataConfig())


# --------------------------------------------------------------------------------------------------
# truncation


def test_the_prompt_is_cut_from_the_left_first(tokenizer):
    pair = encode_pair(tokenizer, TEXT, DataConfig(), max_len=10)  # 4 answer tokens leave 6 for the prompt
    assert pair.chosen_input_ids == PROMPT_IDS[-6:] + CHOSEN_IDS + [EOS]
    assert pair.rejected_input_ids == PROMPT_IDS[-6:] + REJECTED_IDS + [EOS]
    assert pair.prompt_truncated and not pair.answers_cut and pair.prompt_length == 6
    assert pair.full_length == 16 and pair.drop is None
    check_shared_prompt(pair)


def test_answers_are_cut_to_one_budget_and_lose_their_eos(tokenizer):
    record = {**TEXT, "rejected": "Go away, and do not come back."}
    longer = encode_pair(tokenizer, record, DataConfig(), max_len=64).rejected_input_ids[12:]
    assert len(longer) > 6
    # max_len 8: the prompt keeps max(1, 8 // 4) = 2 tokens, both answers get 6
    pair = encode_pair(tokenizer, record, DataConfig(), max_len=8)
    assert pair.prompt_length == 2 and pair.prompt_truncated and pair.answers_cut
    assert pair.chosen_input_ids == PROMPT_IDS[-2:] + CHOSEN_IDS + [EOS]  # fits: whole, with EOS
    assert pair.rejected_input_ids == PROMPT_IDS[-2:] + longer[:6] and EOS not in pair.rejected_input_ids
    assert pair.full_length == 12 + len(longer)
    # max_len 4: the prompt keeps 1 token, both answers are cut to 3
    pair = encode_pair(tokenizer, record, DataConfig(), max_len=4)
    assert pair.chosen_input_ids == PROMPT_IDS[-1:] + CHOSEN_IDS and pair.chosen_labels == [-100, *CHOSEN_IDS]
    assert pair.rejected_input_ids == PROMPT_IDS[-1:] + longer[:3]


def test_a_bos_the_tokenizer_adds_survives_truncation(bos_tokenizer):
    pair = encode_pair(bos_tokenizer, TEXT, DataConfig(), max_len=10)
    assert pair.chosen_input_ids == [1, *PROMPT_IDS[-5:], *CHOSEN_IDS, EOS]
    assert pair.rejected_input_ids[:6] == [1, *PROMPT_IDS[-5:]] and pair.prompt_length == 6
    whole = encode_pair(bos_tokenizer, TEXT, DataConfig())
    assert whole.chosen_input_ids == [1, *PROMPT_IDS, *CHOSEN_IDS, EOS]  # BOS once


def test_drops_too_long_identical_and_empty(tokenizer):
    shared = "word " * 20
    record = {"id": 8, "prompt": "Q", "chosen": shared + "yes", "rejected": shared + "no"}
    assert encode_pair(tokenizer, record, DataConfig(), max_len=64).drop is None
    cut = encode_pair(tokenizer, record, DataConfig(), max_len=12)  # the difference is cut away
    assert cut.drop == "too_long" and cut.answers_cut
    assert cut.chosen_input_ids == cut.rejected_input_ids and len(cut.chosen_input_ids) == 12
    same = encode_pair(tokenizer, {**record, "rejected": record["chosen"]}, DataConfig())
    assert same.drop == "identical"
    # max_len 1: the one position left is the prompt's, no answer token remains
    assert encode_pair(tokenizer, TEXT, DataConfig(), max_len=1).drop == "empty_answer"
    # no prompt at all: position 0 predicts nothing, a one-token answer teaches nothing
    empty = encode_pair(tokenizer, {"id": 1, "prompt": "", "chosen": "", "rejected": "No"}, DataConfig())
    assert empty.chosen_input_ids == [EOS] and empty.drop == "empty_answer"


@settings(max_examples=60, deadline=None)
@given(
    n_prompt=st.integers(0, 40),
    n_chosen=st.integers(1, 40),
    n_rejected=st.integers(1, 40),
    max_len=st.integers(1, 60),
    head=st.integers(0, 1),
)
def test_fit_pair_follows_the_rule(n_prompt, n_chosen, n_rejected, max_len, head):
    prompt = list(range(1000, 1000 + n_prompt))
    chosen = list(range(2000, 2000 + n_chosen))
    rejected = list(range(3000, 3000 + n_rejected))
    pair = fit_pair(prompt, (chosen, chosen), (rejected, rejected), max_len, keep_head=head)
    head = min(head, n_prompt)
    n_long = max(n_chosen, n_rejected)
    min_prompt = min(n_prompt, max(head + 1, int(max_len * MIN_PROMPT_FRACTION)))
    fits = n_prompt + n_long <= max_len
    keep = n_prompt if fits else min(max(min_prompt, max_len - n_long), max_len)
    budget = n_long if fits else max_len - keep
    kept_prompt = prompt[: min(head, keep)] + prompt[n_prompt - (keep - min(head, keep)) :]
    assert pair.prompt_length == keep and pair.prompt_truncated == (keep < n_prompt)
    assert pair.chosen_input_ids == kept_prompt + chosen[:budget]
    assert pair.rejected_input_ids == kept_prompt + rejected[:budget]
    assert max(len(pair.chosen_input_ids), len(pair.rejected_input_ids)) <= max_len
    assert pair.answers_cut == (n_long > budget) and pair.full_length == n_prompt + n_long
    assert pair.chosen_labels[0] == IGNORE_INDEX and pair.chosen_labels[:keep] == [IGNORE_INDEX] * keep
    # a side learns nothing without an answer token, or with only one at position 0
    empty = any(k == 0 or (keep == 0 and k == 1) for k in (min(n_chosen, budget), min(n_rejected, budget)))
    assert pair.drop == ("empty_answer" if empty else None)


# --------------------------------------------------------------------------------------------------
# batches


def test_collator_layout_chosen_rows_first():
    pairs = [
        {
            "chosen_input_ids": [5, 6, 7],
            "chosen_labels": [-100, 6, 7],
            "rejected_input_ids": [5, 8],
            "rejected_labels": [-100, 8],
        },
        {
            "chosen_input_ids": [9, 10],
            "chosen_labels": [-100, 10],
            "rejected_input_ids": [9, 11, 12, 13],
            "rejected_labels": [-100, -100, 12, 13],
        },
    ]
    batch = PairCollator(pad_token_id=EOS)(pairs)
    assert set(batch) == {
        "input_ids",
        "labels",
        "attention_mask",
        "num_tokens",
        "num_label_tokens",
        "num_pairs",
        "pair_mask",
    }
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [9, 10, 2, 2], [5, 8, 2, 2], [9, 11, 12, 13]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100],
        [-100, 10, -100, -100],
        [-100, 8, -100, -100],
        [-100, -100, 12, 13],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["num_tokens"].ndim == 0 and batch["num_tokens"].item() == 11
    assert batch["num_label_tokens"].ndim == 0 and batch["num_label_tokens"].item() == 6
    assert batch["num_pairs"].ndim == 0 and batch["num_pairs"].item() == 2
    assert batch["pair_mask"].dtype == torch.float32 and batch["pair_mask"].tolist() == [1.0, 1.0]


SHARED_PAIRS = [
    {  # two prompt tokens: the rejected block starts with the prompt's last token again
        "chosen_input_ids": [5, 6, 7, 8],
        "chosen_labels": [-100, -100, 7, 8],
        "rejected_input_ids": [5, 6, 9],
        "rejected_labels": [-100, -100, 9],
    },
    {  # one prompt token (nothing to share but the row's start)
        "chosen_input_ids": [9, 10],
        "chosen_labels": [-100, 10],
        "rejected_input_ids": [9, 11, 12, 13],
        "rejected_labels": [-100, -100, 12, 13],
    },
]


def test_collator_shares_the_prompt_in_one_row_per_pair():
    batch = PairCollator(pad_token_id=EOS, share_prompt=True)(SHARED_PAIRS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 6, 9], [9, 10, 9, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 1, 2], [0, 1, 0, 1, 2, 3]]
    assert batch["pair_segments"].dtype == torch.int8
    assert batch["pair_segments"].tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, 2]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [  # chosen rows, then rejected rows, over the B input rows
        [x, x, 7, 8, x, x],
        [x, 10, x, x, x, x],
        [x, x, x, x, x, 9],
        [x, x, x, x, 12, 13],
    ]
    assert "attention_mask" not in batch
    assert batch["num_tokens"].item() == 12  # positions computed: 15 in two rows per pair
    two_rows = PairCollator(pad_token_id=EOS)(SHARED_PAIRS)
    assert two_rows["num_tokens"].item() == 13 and two_rows["input_ids"].numel() == 16
    for key in ("num_label_tokens", "num_pairs", "pair_mask"):
        assert batch[key].tolist() == two_rows[key].tolist(), key
    # the block mask: the prompt, then each answer block sees the prompt and itself
    mask = pairs_module.pair_block_mask(batch["pair_segments"])
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 0],
        [1, 0, 0, 0, 1, 1],
    ]
    assert mask[1, 0, 5].int().tolist() == [0, 0, 1, 1, 1, 1]
    additive = pairs_module.pair_block_mask(batch["pair_segments"], torch.float32)
    assert torch.equal(additive == 0, mask)
    assert additive.min().item() == torch.finfo(torch.float32).min


def test_collator_share_prompt_auto_keeps_rows_within_max_len_and_pads():
    assert "attention_mask" in PairCollator(0, share_prompt="auto", max_len=5)(SHARED_PAIRS)
    shared = PairCollator(0, share_prompt="auto", max_len=6)(SHARED_PAIRS)
    assert shared["input_ids"].shape == (2, 6)
    padded = PairCollator(0, 8, share_prompt=True)(SHARED_PAIRS[:1])
    assert padded["input_ids"].shape == (1, 8) and padded["labels"].shape == (2, 8)
    assert padded["pair_segments"][0, 6:].tolist() == [-1, -1]
    mask = pairs_module.pair_block_mask(padded["pair_segments"])
    assert mask[0, 0, 7].int().tolist() == [1, 0, 0, 0, 0, 0, 0, 1]  # padding: the prompt and itself
    with pytest.raises(ValueError, match="share_prompt 'auto' needs max_len"):
        PairCollator(0, share_prompt="auto")


def test_collator_padding_copies_refs_and_bad_items():
    pair = {
        "chosen_input_ids": [5, 6],
        "chosen_labels": [-100, 6],
        "rejected_input_ids": [5, 7],
        "rejected_labels": [-100, 7],
    }
    copy_ = {**pair, "chosen_labels": [-100, -100], "rejected_labels": [-100, -100]}  # a label-free copy
    batch = PairCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [
            {**pair, "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5},
            {**copy_, "ref_chosen_logps": torch.tensor(-3.0), "ref_rejected_logps": -4.0},
        ]
    )
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 8)
    assert batch["num_pairs"].item() == 1 and batch["pair_mask"].tolist() == [1.0, 0.0]
    assert batch["num_label_tokens"].item() == 2
    assert batch["ref_logps"].dtype == torch.float32 and batch["ref_logps"].tolist() == [
        -1.5,
        -3.0,
        -2.5,
        -4.0,
    ]
    collate = PairCollator(pad_token_id=0)
    with pytest.raises(
        ValueError, match=r"pair 1 of the batch: rejected_input_ids \(2,\) and rejected_labels \(1,\)"
    ):
        collate([pair, {**pair, "rejected_labels": [7]}])
    with pytest.raises(ValueError, match="pair 0 of the batch has no chosen_labels"):
        collate([{k: v for k, v in pair.items() if k != "chosen_labels"}])
    with pytest.raises(ValueError, match="pair 1 of the batch lacks ref_chosen_logps"):
        collate([{**pair, "ref_chosen_logps": -1.0, "ref_rejected_logps": -1.0}, pair])
    with pytest.raises(ValueError, match="cannot collate an empty batch"):
        collate([])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        PairCollator(pad_token_id=None)


# --------------------------------------------------------------------------------------------------
# the dataset


PAIRS = [
    TEXT,
    {"id": 2, "prompt": "x " * 40, "chosen": "Hi there!", "rejected": "Go away."},  # prompt truncated
    {"id": 3, "prompt": "Q", "chosen": "word " * 40 + "yes", "rejected": "word " * 40 + "no"},  # too_long
    {"id": 4, "prompt": "Q", "chosen": "Sure " * 30, "rejected": "No"},  # the chosen answer cut
    {"id": 5, "prompt": "Q", "chosen": "Same", "rejected": "Same"},  # identical
]


@pytest.mark.timeout(120)
def test_dataset_caches_counts_and_serves_pairs(tokenizer, tmp_path, monkeypatch, caplog):
    path = write_jsonl(tmp_path / "training.jsonl", PAIRS)
    cache, cfg = str(tmp_path / "cache"), DataConfig(max_seq_length=24)
    calls = []
    encode = pairs_module._encode_pair_batch
    monkeypatch.setattr(
        pairs_module, "_encode_pair_batch", lambda *a, **k: calls.append(1) or encode(*a, **k)
    )
    caplog.set_level(logging.INFO, logger="ftpipe")
    ds = PairDataset(path, tokenizer, cfg, role="leader", cache_dir=cache)
    assert calls
    s = ds.stats
    assert (s.rows, s.kept, s.dropped) == (5, 3, 2)
    assert s.dropped_by_reason == {"identical": 1, "too_long": 1}
    assert (s.truncated_prompts, s.cut_answers) == (1, 1)
    expected = [encode_pair(tokenizer, PAIRS[i], cfg) for i in (0, 1, 3)]
    items = [ds[i] for i in range(len(ds))]
    assert items == [{k: getattr(e, k) for k in pairs_module.PAIR_COLUMNS} for e in expected]
    assert ds.lengths == [len(e.chosen_input_ids) + len(e.rejected_input_ids) for e in expected]
    assert s.tokens == sum(ds.lengths)
    assert s.label_tokens == sum(
        sum(label != IGNORE_INDEX for label in e.chosen_labels + e.rejected_labels) for e in expected
    )
    assert ds.samples["row_id"] == [1, 2, 4] and ds.samples["source"] == ["demo", None, None]
    assert s.as_dict()["dropped_by_reason"] == {"identical": 1, "too_long": 1}
    logged = [r for r in caplog.records if "pairs dropped" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert (
        "5 pairs -> 3 kept" in logged[0].getMessage()
        and "(identical 1, too_long 1)" in logged[0].getMessage()
    )
    # the second construction, and a follower, read the cache
    calls.clear()
    again = PairDataset(path, tokenizer, cfg, cache_dir=cache)
    follower = PairDataset(path, tokenizer, cfg, role="follower", cache_dir=cache, wait_s=5)
    assert calls == []
    assert again.stats == follower.stats == s
    assert [follower[i] for i in range(len(follower))] == items
    # batches from the dataset
    batch = PairCollator(tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["num_pairs"].item() == 2


@pytest.mark.timeout(120)
def test_dataset_of_chat_pairs_with_tools_and_wrong_rows(tools_tokenizer, tokenizer, tmp_path):
    convo = normalize_chat_row(OPENAI, "messages")
    record = {
        "id": 0,
        "prompt": convo["messages"][:-1],
        "chosen": convo["messages"][-1:],
        "rejected": [{"role": "assistant", "content": "About 12."}],
        "tools": convo["tools"],
    }
    path = write_jsonl(tmp_path / "training.jsonl", [record, CHAT])
    ds = PairDataset(path, tools_tokenizer, DataConfig(), cache_dir=str(tmp_path / "cache"))
    assert (
        len(ds) == 2
        and ds[0]["chosen_input_ids"] == encode_pair(tools_tokenizer, record, DataConfig()).chosen_input_ids
    )
    # SmolLM2's own template drops tools: refused before tokenizing
    with pytest.raises(Exception, match="the data uses tools"):
        PairDataset(path, tokenizer, DataConfig(), cache_dir=str(tmp_path / "cache"))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"id": 0, "input": "q", "output": "a"}])
    with pytest.raises(DataError, match=r"sft.jsonl: row id 0: not a preference pair"):
        PairDataset(sft, tokenizer, DataConfig(), cache_dir=str(tmp_path / "cache"))
    empty = tmp_path / "validation.jsonl"
    empty.write_text("", encoding="utf-8")
    assert len(PairDataset(empty, tokenizer, DataConfig(), cache_dir=str(tmp_path / "cache"))) == 0


# --------------------------------------------------------------------------------------------------
# inspect


def test_inspect_shows_the_prompt_and_both_answers(tokenizer, tmp_path, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "training.jsonl", [TEXT, PAIRS[4], CHAT])
    cfg = PipelineConfig(objective=ObjectiveConfig(objective="dpo"), data=DataConfig(max_seq_length=64))
    pairs = inspect_pairs(tokenizer, path, cfg, 2)
    assert len(pairs) == 2
    first = pairs[0]
    assert first["prompt"] == PROMPT and first["prompt_tokens"] == 12 and first["drop"] is None
    assert first["chosen"]["trained_spans"] == ["Hi there!<|im_end|>"]
    assert first["rejected"]["trained_spans"] == ["Go away.<|im_end|>"]
    assert (first["chosen"]["tokens"], first["chosen"]["trained_tokens"], first["truncated_tokens"]) == (
        16,
        4,
        0,
    )
    assert pairs[1]["drop"] == "identical"

    # the command: --json, then the text view (prepare and the tokenizer stubbed: the pairs are prepared)
    monkeypatch.setattr("ftpipe.data.prepare.prepare_data", lambda cfg: SimpleNamespace(train_file=str(path)))
    monkeypatch.setattr("ftpipe.model.tokenizer.load_tokenizer", lambda model_cfg: tokenizer)
    capsys.readouterr()
    inspect(cfg, InspectOptions(n=3, json=True))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3 and "pieces" not in records[0]["chosen"]
    assert records[0]["chosen"]["input_ids"] == PROMPT_IDS + CHOSEN_IDS + [EOS]
    assert records[2]["row_id"] == 5 and records[2]["chosen"]["trained_spans"] == ["Apple.<|im_end|>"]
    assert records[2]["prompt"].endswith("<|im_start|>user\nName a fruit<|im_end|>\n<|im_start|>assistant\n")
    inspect(cfg, InspectOptions(n=1))
    out = capsys.readouterr().out
    assert "pair 1 of 1 (row id 1, source demo): prompt 12 tokens; chosen 4 tokens (4 trained)" in out
    assert "[[Hi there!<|im_end|>]]" in out and "[[Go away.<|im_end|>]]" in out and "### Instruction:" in out
    assert "(trained spans are between [[ and ]])" in out
    stream = io.StringIO()
    print_pairs([pairs[1]], stream, colour=False)
    assert "; dropped: identical" in stream.getvalue()


@pytest.mark.timeout(120)
def test_lengths_skip_pairs_and_samples_dropped_mid_split(tokenizer, tmp_path):
    """``lengths`` (what packing and length grouping index by) has one entry per served item, also when
    a dropped row sits between kept ones (``select`` then maps indices over the whole table)."""
    from ftpipe.data.dataset import SFTDataset

    cache = str(tmp_path / "cache")
    path = write_jsonl(tmp_path / "pairs.jsonl", [TEXT, PAIRS[4], PAIRS[1]])
    ds = PairDataset(path, tokenizer, DataConfig(max_seq_length=24), cache_dir=cache)
    assert len(ds) == 2 and ds.lengths == [
        len(ds[i]["chosen_input_ids"]) + len(ds[i]["rejected_input_ids"]) for i in range(2)
    ]
    rows = [
        {"id": 0, "input": "Q", "output": "a b c"},
        {"id": 1, "messages": [{"role": "user", "content": "no answer"}]},  # dropped
        {"id": 2, "input": "Q", "output": "a"},
    ]
    sft = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", rows), tokenizer, DataConfig(), cache_dir=cache)
    assert len(sft) == 2 and sft.lengths == [len(sft[i]["input_ids"]) for i in range(2)]
