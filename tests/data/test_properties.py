"""Property-based tests (hypothesis) of the tokenization, truncation, collation and template rules.

Random unicode text (empty strings, emoji, control characters, special-token strings, braces, very
long inputs and outputs) goes through the real embedded SmolLM2 tokenizer (pad == EOS, no BOS on plain
text) and a copy that adds BOS to plain text (Llama style). The rules checked are the ones the
docstrings of ``ftpipe.data.tokenize``, ``collate`` and ``formats`` state:

* labels align with input ids (same length, each label is -100 or the id at its position), the
  first label is -100, and nothing exceeds ``max_len``;
* the prompt is masked and the answer (plus EOS) is labelled;
* the prompt is cut from the left (a BOS the tokenizer adds stays), the answer is kept whole while it
  leaves ``max(head + 1, max_len // 4)`` tokens (or the whole, shorter prompt) for the prompt, else
  it is cut from the right to fit after that much prompt (and loses its EOS);
* a sample with nothing to learn is dropped (None), so no collated sample and no batch is all-masked.

Example counts are kept small (the file runs in well under a minute on 2 busy cores).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ftpipe.config.schema import DataConfig
from ftpipe.data.collate import SFTCollator
from ftpipe.data.dataset import SFTDataset
from ftpipe.data.errors import BadRow
from ftpipe.data.formats import AlpacaSpec, render_alpaca
from ftpipe.data.tokenize import (
    IGNORE_INDEX,
    MIN_PROMPT_FRACTION,
    encode_example,
    encode_prompt,
    fit_to_length,
)

pytestmark = pytest.mark.timeout(120)
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

TRICKY = [
    "",
    " ",
    "\n",
    "\r\n",
    "\t",
    "\x00",
    "\x1b[31m",
    "\x7f",
    "\u200b",
    "\u202e",
    "\ufeff",
    "e\u0301",
    "😀",
    "👩‍👩‍👧",
    "日本語",
    "{",
    "}",
    "{{",
    "}}",
    "{input}",
    "{0}",
    "%s",
    "\U0010ffff",
]
SPECIAL = ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]  # special-token strings inside user text

short_text = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(TRICKY)), max_size=6).map("".join)
# very long text: a random piece repeated (up to several thousand characters)
long_text = st.builds(lambda piece, n: piece * n, short_text.filter(bool), st.integers(20, 200))
text = st.one_of(short_text, short_text, long_text)
text_with_special = st.one_of(
    text, st.lists(st.one_of(text, st.sampled_from(SPECIAL)), max_size=4).map("".join)
)
max_lens = st.one_of(st.integers(1, 24), st.integers(25, 300))


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The embedded tokenizer made to put BOS (<|im_start|>, id 1) before plain text, Llama style."""
    tok = copy.deepcopy(tokenizer)
    tok.add_bos_token = True
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def _ids(tokenizer, value: str) -> list[int]:
    return list(tokenizer(value, add_special_tokens=False)["input_ids"])


def check_aligned(ex, max_len: int) -> None:
    """Labels align with ids, position 0 is masked, nothing exceeds max_len, something is learned."""
    assert len(ex.input_ids) == len(ex.labels) <= max_len
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ex.input_ids, ex.labels, strict=True))
    assert ex.labels[0] == IGNORE_INDEX
    assert any(label != IGNORE_INDEX for label in ex.labels)


def check_fit(ex, ctx, ctx_labels, ans, max_len: int, head: int) -> None:
    """``ex`` is ``ctx`` + ``ans`` within max_len by the documented truncation rule (None when nothing is learned)."""
    n_ctx, n_ans = len(ctx), len(ans)
    min_ctx = min(n_ctx, max(head + 1, int(max_len * MIN_PROMPT_FRACTION)))
    if n_ans + min_ctx <= max_len:  # the answer leaves enough for the prompt: kept whole
        keep_ans, keep_ctx = n_ans, min(n_ctx, max_len - n_ans)
    else:  # the answer alone is too long: cut from the right after min_ctx prompt tokens
        keep_ctx = min(min_ctx, max_len)
        keep_ans = max_len - keep_ctx
    kept_head = min(head, keep_ctx)
    positions = [*range(kept_head), *range(n_ctx - (keep_ctx - kept_head), n_ctx)]
    ids = [ctx[i] for i in positions] + ans[:keep_ans]
    labels = [ctx_labels[i] for i in positions] + ans[:keep_ans]
    if labels:
        labels[0] = IGNORE_INDEX
    if all(label == IGNORE_INDEX for label in labels):
        assert ex is None  # nothing to learn: dropped
        return
    assert ex is not None
    check_aligned(ex, max_len)
    assert ex.input_ids == ids and ex.labels == labels
    assert ex.prompt_truncated == (keep_ctx < n_ctx)
    assert ex.output_cut == (keep_ans < n_ans)
    if not ex.output_cut:
        assert ex.input_ids[len(ex.input_ids) - n_ans :] == ans  # the answer whole, EOS last
    # else the kept answer is a strict prefix of the answer (checked above): its final EOS is gone
    if n_ctx + n_ans <= max_len:
        assert not ex.prompt_truncated and not ex.output_cut


# --------------------------------------------------------------------------------------------------
# the pure truncation rule


@SETTINGS
@given(
    n_ctx=st.integers(0, 60),
    n_ans=st.integers(0, 60),
    max_len=st.integers(1, 80),
    head=st.integers(0, 2),
    data=st.data(),
)
def test_fit_to_length_follows_the_documented_rule(n_ctx, n_ans, max_len, head, data):
    ctx = list(range(1000, 1000 + n_ctx))
    ctx_labels = data.draw(st.lists(st.sampled_from([True, False]), min_size=n_ctx, max_size=n_ctx))
    ctx_labels = [token if trained else IGNORE_INDEX for token, trained in zip(ctx, ctx_labels, strict=True)]
    ans = list(range(5000, 5000 + n_ans))
    ex = fit_to_length(ctx, ctx_labels, ans, list(ans), max_len, keep_head=head)
    check_fit(ex, ctx, ctx_labels, ans, max_len, min(head, n_ctx))


# --------------------------------------------------------------------------------------------------
# alpaca rows through the real tokenizer


@SETTINGS
@given(prompt=text_with_special, output=text_with_special, max_len=max_lens, bos=st.booleans())
def test_alpaca_rows_masked_and_truncated_by_the_rule(tokenizer, bos_tokenizer, prompt, output, max_len, bos):
    tok = bos_tokenizer if bos else tokenizer
    eos = tok.eos_token_id
    row = {"id": 0, "input": prompt, "output": output}
    cfg = DataConfig(max_seq_length=max_len)
    ctx = encode_prompt(tok, row, cfg)
    # the evaluation prompt: the text's ids, after one BOS when the tokenizer adds one (never two)
    text_ids = _ids(tok, prompt)
    needs_bos = bos and (not text_ids or text_ids[0] != tok.bos_token_id)
    assert ctx == ([tok.bos_token_id] if needs_bos else []) + text_ids
    ans = _ids(tok, output)
    ans = ans if ans and ans[-1] == eos else [*ans, eos]  # EOS once, labelled
    head = 1 if bos and ctx and ctx[0] == tok.bos_token_id else 0
    ex = encode_example(tok, row, cfg)
    check_fit(ex, ctx, [IGNORE_INDEX] * len(ctx), ans, max_len, head)
    if ex is not None and head:
        assert ex.input_ids[0] == tok.bos_token_id  # BOS survives left truncation
    if ex is not None:  # the prompt is masked: the labelled positions are one run at the end (the answer)
        first = next(i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX)
        assert all(label != IGNORE_INDEX for label in ex.labels[first:])


@SETTINGS
@given(prompt=text, output=text, max_len=max_lens, system=st.one_of(st.none(), short_text))
def test_alpaca_rows_through_the_chat_template(tokenizer, prompt, output, max_len, system):
    row = {"id": 0, "input": prompt, "output": output}
    cfg = DataConfig(max_seq_length=max_len, use_chat_template=True, system_prompt=system or None)
    ctx = encode_prompt(tokenizer, row, cfg)
    assert ctx[-4:] == _ids(tokenizer, "<|im_start|>assistant\n")  # ends with the generation prompt
    ans = [*_ids(tokenizer, output), tokenizer.eos_token_id]
    check_fit(encode_example(tokenizer, row, cfg), ctx, [IGNORE_INDEX] * len(ctx), ans, max_len, 0)


# --------------------------------------------------------------------------------------------------
# chat rows


@st.composite
def conversations(draw):
    """Optional system turn, user/assistant pairs, optionally a trailing user turn (left out)."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text_with_special)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(text_with_special)})
        messages.append({"role": "assistant", "content": draw(text)})  # no special-token strings
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(text)})
    return messages


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [*runs, current] if current else runs


@SETTINGS
@given(messages=conversations(), max_len=max_lens)
def test_chat_rows_train_every_assistant_turn_and_truncate_by_the_rule(tokenizer, messages, max_len):
    eos = tokenizer.eos_token_id
    row = {"id": 3, "messages": messages}
    cfg = DataConfig(max_seq_length=max_len)
    full = encode_example(tokenizer, row, cfg, max_len=10**9)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # untruncated: exactly the assistant turns (content + EOS) are labelled, everything else masked
    assert labelled_runs(full.input_ids, full.labels) == [[*_ids(tokenizer, a), eos] for a in answers]
    ctx = encode_prompt(tokenizer, row, cfg)
    n_ctx = len(ctx)
    assert full.input_ids[:n_ctx] == ctx
    ans = full.input_ids[n_ctx:]
    assert ans == [*_ids(tokenizer, answers[-1]), eos]  # the final answer ends with one EOS
    check_fit(encode_example(tokenizer, row, cfg), ctx, full.labels[:n_ctx], ans, max_len, 0)


# --------------------------------------------------------------------------------------------------
# collation


samples = st.lists(
    st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(0, 49151), min_size=n, max_size=n),
            st.lists(st.booleans(), min_size=n, max_size=n),
        )
    ),
    min_size=1,
    max_size=6,
)


@SETTINGS
@given(batch=samples, pad=st.integers(0, 49151), multiple=st.one_of(st.none(), st.integers(1, 16)))
def test_collation_pads_right_and_keeps_every_label(batch, pad, multiple):
    rows = [
        {"input_ids": ids, "labels": [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask, strict=True)]}
        for ids, mask in batch
    ]
    out = SFTCollator(pad_token_id=pad, pad_to_multiple_of=multiple)(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // multiple) * multiple if multiple else longest
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (len(rows), width)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert out["input_ids"][i, :n].tolist() == r["input_ids"]
        assert out["labels"][i, :n].tolist() == r["labels"]
        assert out["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert out["input_ids"][i, n:].eq(pad).all() and out["labels"][i, n:].eq(IGNORE_INDEX).all()
    assert out["num_tokens"].item() == sum(len(r["input_ids"]) for r in rows)
    assert out["num_label_tokens"].item() == sum(x != IGNORE_INDEX for r in rows for x in r["labels"])


@SETTINGS
@given(
    pairs=st.lists(st.tuples(text_with_special, text_with_special), min_size=1, max_size=5),
    max_len=max_lens,
)
def test_no_collated_sample_or_batch_is_all_masked(tokenizer, pairs, max_len):
    cfg = DataConfig(max_seq_length=max_len)
    encoded = [
        encode_example(tokenizer, {"id": i, "input": p, "output": o}, cfg) for i, (p, o) in enumerate(pairs)
    ]
    kept = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if e is not None]
    assume(kept)
    batch = SFTCollator(tokenizer.pad_token_id)(kept)
    assert batch["input_ids"].shape[1] <= max_len
    assert (batch["labels"] != IGNORE_INDEX).sum(dim=1).ge(1).all()  # every sample has a label
    assert batch["num_label_tokens"].item() >= len(kept)
    # EOS == pad: an EOS inside a sample keeps its label, padding never gets one
    assert torch.equal(
        batch["labels"] != IGNORE_INDEX, (batch["labels"] != IGNORE_INDEX) & batch["attention_mask"].bool()
    )


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(text, text), min_size=1, max_size=6), max_len=st.integers(1, 40))
def test_dataset_drops_what_teaches_nothing_and_counts_it(tokenizer, pairs, max_len):
    import datasets

    rows = [{"id": i, "input": p, "output": o} for i, (p, o) in enumerate(pairs)]
    cfg = DataConfig(max_seq_length=max_len)
    ds = SFTDataset(datasets.Dataset.from_list(rows), tokenizer, cfg, name="hostile")
    expected = [e for e in (encode_example(tokenizer, r, cfg) for r in rows) if e is not None]
    assert (ds.stats.rows, ds.stats.kept, ds.stats.dropped) == (
        len(rows),
        len(expected),
        len(rows) - len(expected),
    )
    assert [ds[i] for i in range(len(ds))] == [
        {"input_ids": e.input_ids, "labels": e.labels} for e in expected
    ]
    assert ds.stats.cut_outputs == sum(e.output_cut for e in expected)
    assert ds.stats.truncated_prompts == sum(e.prompt_truncated for e in expected)


# --------------------------------------------------------------------------------------------------
# alpaca templates with braces


FIELDS = ("instruction", "input", "output")
literal = st.text(max_size=12)  # any text, braces included: escaped below as {{ and }}


@SETTINGS
@given(
    parts=st.lists(st.tuples(literal, st.sampled_from(FIELDS[:2])), max_size=4),
    tail=literal,
    out_prefix=literal,
    values=st.fixed_dictionaries({name: text_with_special for name in FIELDS}),
)
def test_templates_keep_literal_braces_and_values_verbatim(parts, tail, out_prefix, values):
    def escape(s: str) -> str:
        return s.replace("{", "{{").replace("}", "}}")

    template = "".join(escape(lit) + "{" + name + "}" for lit, name in parts) + escape(tail)
    output_template = escape(out_prefix) + "{output}"
    spec = AlpacaSpec(template, output_template, {name: f"col_{name}" for name in FIELDS})
    row = {f"col_{name}": value for name, value in values.items()}
    used = {"output", *(name for _, name in parts)}
    try:
        record = render_alpaca(row, spec)
    except BadRow as err:  # only empty required fields or an empty output are refused
        empty = {name for name in used if not values[name].strip()}
        assert err.reason in {f"empty:{name}" for name in empty} | (
            {"empty_output"} if not (out_prefix + values["output"]).strip() else set()
        )
        return
    assert all(values[name].strip() for name in used) and record["output"].strip()
    assert record["input"] == "".join(lit + values[name] for lit, name in parts) + tail
    assert record["output"] == out_prefix + values["output"]
