"""YAML forms a configuration file may take (merge keys, numbers YAML 1.1 reads as text, an empty file) and
the ranges of values that have one (seeds, ``max_seq_length``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftpipe.cli.main import parse
from ftpipe.config import ConfigError, PipelineConfig, load_config, validate_config
from ftpipe.config.io import read_config_file


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "text", ["", "\n\n", "# max_steps: 5\n", "---\n"], ids=["empty", "blank", "comments", "marker"]
)
def test_an_empty_file_is_one_message_naming_it(tmp_path, text, cli_parser):
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError, match=r"c\.yaml is empty \(or holds only comments\)"):
        read_config_file(path)
    with pytest.raises(ConfigError, match=r"c\.yaml is empty"):
        parse(["prepare", "--config", str(path)], parser=cli_parser)
    assert read_config_file(_file(tmp_path, "{}\n")) == {}  # an explicit empty mapping sets nothing


@pytest.mark.timeout(60)
def test_merge_keys_give_defaults_that_the_mapping_overrides(tmp_path, cli_parser):
    path = _file(
        tmp_path,
        "datasets:\n"
        "  - &base {dataset: a.jsonl, weight: 1.0, input_template: 'Q: {instruction}'}\n"
        "  - <<: *base\n"
        "    dataset: b.jsonl\n"
        "    name: b\n"
        "field_mapping: &fm {instruction: instruction, input: input, output: output}\n",
    )
    values = read_config_file(path)
    assert values["datasets"][1] == {
        "dataset": "b.jsonl",
        "weight": 1.0,
        "input_template": "Q: {instruction}",
        "name": "b",
    }
    _, cfg = parse(["prepare", "--config", str(path)], parser=cli_parser)
    assert [e.dataset for e in cfg.data.datasets] == ["a.jsonl", "b.jsonl"]
    assert cfg.data.datasets[1].input_template == "Q: {instruction}"


@pytest.mark.timeout(60)
def test_a_key_given_twice_beside_a_merge_is_still_refused(tmp_path):
    path = _file(tmp_path, "datasets:\n  - &b {dataset: a.jsonl}\n  - <<: *b\n    name: x\n    name: y\n")
    with pytest.raises(ConfigError, match=r"'name' is given twice \(lines 4 and 5\)"):
        read_config_file(path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-4", 1e-4), ("1E-4", 1e-4), ("2.0e5", 2.0e5), ("'3e-5'", 3e-5), ("+5e-1", 0.5), (".5e-3", 0.5e-3)],
)
def test_number_fields_take_numbers_yaml_reads_as_text_like_their_flags(tmp_path, text, value, cli_parser):
    path = _file(tmp_path, f"learning_rate: {text}\ndatasets:\n  - {{dataset: a.jsonl, weight: {text}}}\n")
    cfg = load_config(path)
    assert cfg.train.learning_rate == pytest.approx(value)
    assert cfg.data.datasets[0].weight == pytest.approx(value)
    _, from_cli = parse(["prepare", "--config", str(path)], parser=cli_parser)
    _, from_flag = parse(["prepare", "--learning_rate", text.strip("'")], parser=cli_parser)
    assert from_cli.train.learning_rate == from_flag.train.learning_rate == pytest.approx(value)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", ["fast", "1e-4x", "nan", "1,5", "'1e-4 per step'"])
def test_number_fields_still_refuse_text(tmp_path, text, cli_parser):
    path = _file(tmp_path, f"learning_rate: {text}\n")
    with pytest.raises(ConfigError, match=r"learning_rate: expected a number, got text"):
        parse(["prepare", "--config", str(path)], parser=cli_parser)


@pytest.mark.timeout(60)
def test_only_number_fields_take_text_as_numbers(tmp_path):
    path = _file(tmp_path, "dataset_subset: 1e-4\nsystem_prompt: '2e5'\nmax_steps: '5'\n")
    assert read_config_file(path) == {"dataset_subset": "1e-4", "system_prompt": "2e5", "max_steps": "5"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["seed", "split_seed", "eval_seed"])
def test_seeds_are_0_to_2_to_the_32_minus_1(name):
    for good in (0, 2**32 - 1):
        validate_config(PipelineConfig().replace(**{name: good}))
    for bad in (-1, 2**32):
        with pytest.raises(ConfigError) as err:
            validate_config(PipelineConfig().replace(**{name: bad}))
        assert err.value.problems == [
            f"{name}: {bad} is outside 0..4294967295 (a seed is a whole number 0 to 2**32 - 1)"
        ]


@pytest.mark.timeout(60)
def test_max_seq_length_leaves_room_for_a_prompt_and_an_answer_token():
    validate_config(PipelineConfig().replace(max_seq_length=3))
    for bad in (1, 2):
        with pytest.raises(ConfigError, match=rf"max_seq_length: {bad} is too small \(must be >= 3"):
            validate_config(PipelineConfig().replace(max_seq_length=bad))
    with pytest.raises(ConfigError) as err:
        validate_config(PipelineConfig().replace(max_seq_length=0))
    assert err.value.problems == ["max_seq_length: 0 is not allowed (must be > 0)"]  # one line, not two
