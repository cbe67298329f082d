"""``objective: dpo`` in ``ftpipe prepare``: every preference layout normalised to the prepared pair record,
bad pairs counted by reason (or failing with the row named), mixes, the prepared folder's identity, and the
errors for data of the other objective.

Every data file is written here from a seeded ``random.Random``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from chat_samples import WEATHER

from ftpipe.config import PipelineConfig, validate_config
from ftpipe.config.paths import prepare_settings, prepared_data_dir
from ftpipe.data.errors import BadRow, BadRowError, DataError
from ftpipe.data.formats import Converter
from ftpipe.data.preference import convert_pair, detect_layout, normalize_pair
from ftpipe.data.prepare import PreparedData, prepare_data, read_jsonl

pytestmark = pytest.mark.timeout(120)
WORDS = ("amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "heron", "iris", "juniper")
SPLIT_RATIOS = {"train_ratio": 0.8, "val_ratio": 0.1, "test_ratio": 0.1}


def words(rng: random.Random, n: int = 4) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dpo_config(dataset: Path | None, data_dir: Path, **flat: Any) -> PipelineConfig:
    given = {"dataset": str(dataset)} if dataset is not None else {}
    return validate_config(
        PipelineConfig.from_flat(
            {**given, "data_dir": str(data_dir), "objective": "dpo", **SPLIT_RATIOS, **flat}
        )
    )


def prepared_rows(result: PreparedData) -> dict[int, dict]:
    rows = [r for f in (result.train_file, result.val_file, result.test_file) for r in read_jsonl(f)]
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows)  # no row in two splits
    return by_id


def manifest(result: PreparedData) -> dict:
    return json.loads((result.folder / "manifest.json").read_text())


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str, **extra: Any) -> dict:
    return {"role": "assistant", "content": text, **extra}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# --------------------------------------------------------------------------------------------------
# the layouts


def test_explicit_text_layout_gives_text_pairs_in_their_own_folder(tmp_path):
    rng = random.Random(1)
    rows, expected = [], {}
    for i in range(20):
        row = {
            "prompt": f"Q{i}: {words(rng)}?",
            "chosen": f"good {words(rng)}",
            "rejected": f"bad {words(rng)}",
        }
        rows.append(row)
        expected[i] = {"id": i, "source": "pairs", **row}
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = dpo_config(path, tmp_path / "out")
    result = prepare_data(cfg)
    assert prepared_rows(result) == expected
    assert list(read_jsonl(result.train_file)[0]) == ["id", "source", "prompt", "chosen", "rejected"]
    meta = manifest(result)
    assert (meta["objective"], meta["format"], meta["rows_usable"], meta["rows_dropped"]) == (
        "dpo",
        "pairs:explicit",
        20,
        {},
    )
    assert result.counts == {"train": 16, "validation": 2, "test": 2}
    # the objective is part of the prepared folder's identity; SFT keys are as they were
    sft = validate_config(cfg.replace(objective="sft"))
    assert prepared_data_dir(sft.data) == prepared_data_dir(sft.data, "sft") != result.folder
    assert result.folder == prepared_data_dir(cfg.data, "dpo")
    assert result.folder.parent == prepared_data_dir(sft.data).parent
    assert result.folder.name.startswith(prepared_data_dir(sft.data).name + "-cfg")
    assert "objective" not in prepare_settings(sft.data) and meta["settings"]["objective"] == "dpo"
    assert prepare_data(cfg).reused  # the same preparation is reused


def test_explicit_message_layout_takes_lists_objects_texts_and_whole_conversations(tmp_path):
    rng = random.Random(2)
    rows, expected = [], {}
    for i in range(24):
        q, good, bad = f"Q{i} {words(rng)}", f"good {words(rng)}", f"bad {words(rng)}"
        variant = i % 4
        if variant == 0:  # lists of turns
            row = {"prompt": [user(q)], "chosen": [assistant(good)], "rejected": [assistant(bad)]}
            prompt = [user(q)]
        elif variant == 1:  # a multi-turn prompt; a text and one message object as the answers
            history = [system("Be brief."), user("hi"), assistant("hello"), user(q)]
            row = {"prompt": history, "chosen": good, "rejected": assistant(bad)}
            prompt = history
        elif variant == 2:  # chosen as the whole conversation that starts with the prompt
            row = {"prompt": [user(q)], "chosen": [user(q), assistant(good)], "rejected": [assistant(bad)]}
            prompt = [user(q)]
        else:  # a reasoning trace in a think tag, the prompt as a text
            row = {"prompt": q, "chosen": f"<think>plan {i}</think>{good}", "rejected": [assistant(bad)]}
            prompt = [user(q)]
        rows.append(row)
        chosen = assistant(good, reasoning_content=f"plan {i}") if variant == 3 else assistant(good)
        expected[i] = {
            "id": i,
            "source": "chat",
            "prompt": prompt,
            "chosen": [chosen],
            "rejected": [assistant(bad)],
        }
    result = prepare_data(dpo_config(write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "out"))
    assert prepared_rows(result) == expected
    assert manifest(result)["format"] == "pairs:explicit"


def test_implicit_layout_takes_the_shared_turns_as_the_prompt(tmp_path):
    rng = random.Random(3)
    rows, expected = [], {}
    for i in range(20):
        q, good, bad = f"Q{i} {words(rng)}", f"good {words(rng)}", f"bad {words(rng)}"
        shared = [user(q)] if i % 2 else [user("start"), assistant(words(rng)), user(q)]
        rows.append({"chosen": [*shared, assistant(good)], "rejected": [*shared, assistant(bad)]})
        expected[i] = {
            "id": i,
            "source": "implicit",
            "prompt": shared,
            "chosen": [assistant(good)],
            "rejected": [assistant(bad)],
        }
    result = prepare_data(dpo_config(write_jsonl(tmp_path / "implicit.jsonl", rows), tmp_path / "out"))
    assert prepared_rows(result) == expected
    assert manifest(result)["format"] == "pairs:implicit"


def test_sharegpt_layout_with_a_system_column(tmp_path):
    rng = random.Random(4)
    rows, expected = [], {}
    for i in range(20):
        q, good, bad = f"Q{i} {words(rng)}", f"good {words(rng)}", f"bad {words(rng)}"
        turns = [{"from": "human", "value": q}]
        prompt = [user(q)]
        if i % 3 == 0:
            turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}, *turns]
            prompt = [user("hi"), assistant("hello"), *prompt]
        row = {
            "conversations": turns,
            "chosen": {"from": "gpt", "value": good},
            "rejected": {"from": "gpt", "value": bad},
        }
        if i % 2:
            row["system"] = f"persona {i}"
            prompt = [system(f"persona {i}"), *prompt]
        rows.append(row)
        expected[i] = {
            "id": i,
            "source": "sharegpt",
            "prompt": prompt,
            "chosen": [assistant(good)],
            "rejected": [assistant(bad)],
        }
    result = prepare_data(dpo_config(write_jsonl(tmp_path / "sharegpt.jsonl", rows), tmp_path / "out"))
    assert prepared_rows(result) == expected
    assert manifest(result)["format"] == "pairs:sharegpt"


def test_alpaca_layout_renders_the_prompt_with_the_templates_only(tmp_path):
    rng = random.Random(5)
    rows, expected = [], {}
    for i in range(20):
        question, context = f"task {i} {words(rng)}", words(rng) if i % 2 else ""
        row = {"question": question, "context": context, "chosen": f"good {i}", "rejected": f"bad {i}"}
        rows.append(row)
        prompt = f"Q: {question}\nC: {context}\nA:" if context else f"Q: {question}\nA:"
        expected[i] = {
            "id": i,
            "source": "alpaca",
            "prompt": prompt,
            "chosen": f"good {i}",
            "rejected": f"bad {i}",
        }
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    cfg = dpo_config(
        path,
        tmp_path / "out",
        input_template="Q: {instruction}\nC: {input}\nA:",
        input_template_no_input="Q: {instruction}\nA:",
        output_template="ANSWER {output}",  # not applied to chosen / rejected
        field_mapping={"instruction": "question", "input": "context", "output": "answer"},
    )
    result = prepare_data(cfg)
    assert prepared_rows(result) == expected
    assert manifest(result)["format"] == "pairs:alpaca"


def test_tools_and_system_columns_give_chat_pairs_with_tool_calls(tmp_path):
    rng = random.Random(6)
    tools = json.dumps([WEATHER])
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    called = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    rows, expected = [], {}
    for i in range(10):
        q, bad = f"Weather in Paris? ({words(rng, 2)})", f"bad {words(rng)}"
        if i % 2:  # texts only, but the data set has tools and system columns: the chat form
            row = {"prompt": q, "chosen": f"good {i}", "rejected": bad, "system": "Be brief."}
            chosen = [assistant(f"good {i}")]
        else:  # a tool call, its result and the answer
            row = {
                "prompt": [user(q)],
                "chosen": [
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "content": '{"t": 20}'},
                    assistant("20 degrees."),
                ],
                "rejected": [assistant(bad)],
                "tools": tools,
                "system": "Be brief.",
            }
            chosen = [
                assistant("", tool_calls=[called]),
                {"role": "tool", "content": '{"t": 20}'},
                assistant("20 degrees."),
            ]
        rows.append(row)
        expected[i] = {
            "id": i,
            "source": "agent",
            "prompt": [system("Be brief."), user(q)],
            "chosen": chosen,
            "rejected": [assistant(bad)],
            **({"tools": [{"type": "function", "function": WEATHER}]} if i % 2 == 0 else {}),
        }
    path = write_jsonl(tmp_path / "agent.jsonl", rows)
    result = prepare_data(
        dpo_config(path, tmp_path / "out", hf_model_id="embedded", chat_template="chatml-tools")
    )
    assert prepared_rows(result) == expected
    assert manifest(result)["rows_with_tools"] == 5


def to_pair(row: dict) -> dict | None:
    """A converter (used through ``test_preference_layouts:to_pair``): q/good/bad rows -> text pairs."""
    if row.get("skip"):
        return None
    if row.get("sft"):
        return {"input": row["q"], "output": row["good"]}
    return {"prompt": f"Q: {row['q']}", "chosen": row["good"], "rejected": row["bad"]}


def test_converter_returns_pairs_in_any_layout(tmp_path):
    rows = [{"q": f"q{i}", "good": f"g{i}", "bad": f"b{i}"} for i in range(8)]
    rows[3]["skip"] = True
    rows[5]["sft"] = True
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    result = prepare_data(dpo_config(path, tmp_path / "out", converter="test_preference_layouts:to_pair"))
    got = prepared_rows(result)
    assert got[0] == {"id": 0, "source": "qa", "prompt": "Q: q0", "chosen": "g0", "rejected": "b0"}
    assert sorted(got) == [0, 1, 2, 4, 6, 7]
    meta = manifest(result)
    assert meta["rows_dropped"] == {"converter_bad_result": 1, "converter_dropped": 1}
    assert meta["format"] == "pairs:converter"
    conv = Converter("conv", lambda row: row)
    implicit = {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}
    assert convert_pair(conv, implicit) == {
        "prompt": [user("q")],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
    }
    with pytest.raises(BadRow) as err:
        convert_pair(conv, {**implicit, "score": 3})
    assert err.value.reason == "converter_bad_result" and "['score']" in err.value.detail


def test_layout_detection():
    assert detect_layout(["prompt", "chosen", "rejected"]) == "explicit"
    assert detect_layout(["chosen", "rejected"], prompt_columns=["instruction"]) == "implicit"
    assert (
        detect_layout(["instruction", "input", "chosen", "rejected"], prompt_columns=["instruction"])
        == "alpaca"
    )
    assert detect_layout(["conversations", "chosen", "rejected", "system"]) == "sharegpt"
    # a prompt column the templates read is the alpaca layout's
    assert detect_layout(["prompt", "chosen", "rejected"], prompt_columns=["prompt"]) == "alpaca"
    assert detect_layout(["prompt", "chosen", "rejected"], "messages", ["prompt"]) == "explicit"
    assert detect_layout(["chosen", "rejected"], "messages") == "implicit"


# --------------------------------------------------------------------------------------------------
# bad pairs

Q = [user("q")]
#: (row, reason) of the explicit layout; each bad row follows good ones in the file.
BAD_EXPLICIT = [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "identical_pair"),
    ({"prompt": Q, "chosen": [assistant("x")], "rejected": assistant("x")}, "identical_pair"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty:chosen"),
    ({"prompt": Q, "chosen": [assistant("a")], "rejected": [assistant("")]}, "empty:rejected"),
    ({"prompt": "q", "rejected": "b"}, "missing:chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "missing:rejected"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "missing:prompt"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty:prompt"),
    ({"prompt": Q, "chosen": [user("other"), assistant("a")], "rejected": "b"}, "prompt_mismatch"),
    ({"prompt": [user("q"), assistant("a")], "chosen": "a", "rejected": "b"}, "chat_role_order"),
    ({"prompt": Q, "chosen": [assistant("a"), user("more")], "rejected": "b"}, "chat_role_order"),
]
BAD_IMPLICIT = [
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("p"), assistant("b")]}, "prompt_mismatch"),
    (
        {
            "chosen": [user("q"), assistant("a")],
            "rejected": [user("q"), assistant("a"), user("r"), assistant("b")],
        },
        "prompt_mismatch",
    ),
    ({"chosen": "a", "rejected": "b"}, "missing:prompt"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("a")]}, "identical_pair"),
]


def good_rows(n: int, implicit: bool = False) -> list[dict]:
    if implicit:
        return [
            {"chosen": [user(f"q{i}"), assistant("yes")], "rejected": [user(f"q{i}"), assistant("no")]}
            for i in range(n)
        ]
    return [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(n)]


def test_bad_pairs_are_counted_by_reason(tmp_path, caplog):
    explicit = write_jsonl(tmp_path / "explicit.jsonl", [*good_rows(5), *(row for row, _ in BAD_EXPLICIT)])
    result = prepare_data(dpo_config(explicit, tmp_path / "a"))
    meta = manifest(result)
    assert meta["rows_dropped"] == dict(Counter(reason for _, reason in BAD_EXPLICIT))
    assert meta["rows_usable"] == 5 and sorted(prepared_rows(result)) == list(range(5))
    assert (
        "first prompt_mismatch: " in caplog.text
        and "explicit.jsonl: line 14: chosen is a whole conversation" in caplog.text
    )
    implicit = write_jsonl(
        tmp_path / "implicit.jsonl", [*good_rows(5, True), *(row for row, _ in BAD_IMPLICIT)]
    )
    meta = manifest(prepare_data(dpo_config(implicit, tmp_path / "b")))
    assert meta["rows_dropped"] == dict(Counter(reason for _, reason in BAD_IMPLICIT))
    assert "implicit.jsonl: line 6: chosen and rejected share no prompt: they differ at turn 0" in caplog.text


@pytest.mark.parametrize(
    ("row", "reason", "implicit"),
    [(row, reason, False) for row, reason in BAD_EXPLICIT]
    + [(row, reason, True) for row, reason in BAD_IMPLICIT],
    ids=[f"explicit-{i}-{r}" for i, (_, r) in enumerate(BAD_EXPLICIT)]
    + [f"implicit-{i}-{r}" for i, (_, r) in enumerate(BAD_IMPLICIT)],
)
def test_on_bad_row_fail_names_the_row_and_the_reason(tmp_path, row, reason, implicit):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*good_rows(2, implicit), row])
    with pytest.raises(BadRowError) as err:
        prepare_data(dpo_config(path, tmp_path / "out", on_bad_row="fail"))
    assert f"{path}: line 3: bad row ({reason}): " in str(err.value)
    assert not any((tmp_path / "out").rglob(".data_ready"))


def test_allow_empty_prompt_keeps_pairs_without_a_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl", [*good_rows(3), {"prompt": "", "chosen": "a", "rejected": "b"}]
    )
    rows = prepared_rows(prepare_data(dpo_config(path, tmp_path / "out", allow_empty_prompt=True)))
    assert rows[3] == {"id": 3, "source": "pairs", "prompt": "", "chosen": "a", "rejected": "b"}
    # a conversation starts with the user's turn: no empty prompt in the chat form
    for prompt in ([], [system("s")]):
        with pytest.raises(BadRow) as err:
            normalize_pair(
                {"prompt": prompt, "chosen": "a", "rejected": "b"}, "explicit", allow_empty_prompt=True
            )
        assert err.value.reason == "empty:prompt" and "chat form" in err.value.detail
    with pytest.raises(BadRow, match="empty:prompt"):
        normalize_pair(
            {"prompt": "", "chosen": "a", "rejected": "b", "system": "s"}, "explicit", allow_empty_prompt=True
        )


# --------------------------------------------------------------------------------------------------
# mixes and the wrong objective


def test_mix_of_two_pair_sources_with_weights(tmp_path):
    rng = random.Random(7)
    text = write_jsonl(
        tmp_path / "text.jsonl",
        [{"prompt": f"t{i} {words(rng)}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)],
    )
    share = write_jsonl(
        tmp_path / "share.jsonl",
        [
            {
                "conversations": [{"from": "human", "value": f"s{i} {words(rng)}"}],
                "chosen": {"from": "gpt", "value": f"good {i}"},
                "rejected": {"from": "gpt", "value": f"bad {i}"},
            }
            for i in range(40)
        ],
    )
    entries = [{"dataset": str(text), "weight": 1}, {"dataset": str(share), "weight": 3}]
    cfg = dpo_config(None, tmp_path / "out", datasets=entries)
    result = prepare_data(cfg)
    meta = manifest(result)
    assert {name: entry["rows_selected"] for name, entry in meta["sources"].items()} == {
        "text": 13,
        "share": 40,
    }
    assert meta["format"] == "mixed" and meta["formats"] == {
        str(text): "pairs:explicit",
        str(share): "pairs:sharegpt",
    }
    rows = prepared_rows(result)
    assert Counter(r["source"] for r in rows.values()) == {"text": 13, "share": 40}
    for row in rows.values():
        is_text = row["source"] == "text"
        assert isinstance(row["prompt"], str) == is_text and row["id"] >= (0 if is_text else 40)
    for name, entry in meta["sources"].items():
        assert sum(entry["counts"].values()) == entry["rows_selected"], name
    again = prepare_data(cfg.replace(data_dir=str(tmp_path / "again")))
    assert again.train_file.read_bytes() == result.train_file.read_bytes()
    capped = prepare_data(cfg.replace(data_dir=str(tmp_path / "capped"), max_samples=20))
    assert sum(capped.counts.values()) == 20


def test_sft_data_for_dpo_is_one_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 4)
    with pytest.raises(DataError) as err:
        prepare_data(dpo_config(path, tmp_path / "out"))
    text = str(err.value)
    assert f"{path}: objective is 'dpo', but it has no 'chosen' or 'rejected' column" in text
    assert "['instruction', 'input', 'output']" in text and "prompt + chosen + rejected" in text
    assert "set objective: sft" in text


def test_pair_data_for_sft_is_one_clear_error(tmp_path):
    rows = [
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        }
    ]
    for name, row in (("share", rows[0]), ("pairs", {"prompt": "q", "chosen": "a", "rejected": "b"})):
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row] * 4)
        cfg = validate_config(
            PipelineConfig.from_flat({"dataset": str(path), "data_dir": str(tmp_path / "out")})
        )
        with pytest.raises(
            DataError, match=r"'chosen' and 'rejected' \(preference pairs\).*Set objective: dpo"
        ):
            prepare_data(cfg)


def test_prepared_dir_holds_rows_of_the_objective(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", good_rows(10))
    folder = prepare_data(dpo_config(path, tmp_path / "out")).folder
    given = prepare_data(dpo_config(path, tmp_path / "out", prepared_dir=str(folder)))
    assert given.reused and sum(given.counts.values()) == 10
    sft = validate_config(PipelineConfig.from_flat({"prepared_dir": str(folder)}))
    with pytest.raises(DataError, match=r"is a preference pair, but objective is 'sft'; set objective: dpo"):
        prepare_data(sft)
