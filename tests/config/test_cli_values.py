"""Command-line and YAML forms of values: a list field takes one value alone, ``ftpipe --version``, and a
parser that builds without the heavy libraries."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ftpipe
from ftpipe.cli import main as cli
from ftpipe.cli.main import build_parser, command_of, package_version, parse
from ftpipe.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(60)

#: (flag, one value alone, the list it means)
ONE_VALUE = [
    ("lora_target_modules", "all-linear", ["all-linear"]),
    ("modules_to_save", "lm_head", ["lm_head"]),
    ("loggers", "csv", ["csv"]),
    ("inject_nan_steps", "3", [3]),
]


def _value(cfg, name: str):
    return cfg.to_flat()[name]


@pytest.mark.parametrize(("name", "given", "expected"), ONE_VALUE, ids=[n for n, _, _ in ONE_VALUE])
def test_a_list_flag_takes_one_value_alone(name, given, expected, cli_parser):
    _, cfg = parse(["train", f"--{name}", given], parser=cli_parser)
    assert _value(cfg, name) == expected
    _, cfg = parse(["train", f"--{name}={given}"], parser=cli_parser)
    assert _value(cfg, name) == expected
    _, listed = parse(["train", f"--{name}", f"[{given}]"], parser=cli_parser)
    assert _value(listed, name) == expected  # the list form means the same


def test_list_flags_keep_their_list_forms(cli_parser):
    _, cfg = parse(["train", "--lora_target_modules", "[q_proj, v_proj]"], parser=cli_parser)
    assert cfg.lora.lora_target_modules == ["q_proj", "v_proj"]
    _, cfg = parse(["train", "--lora_target_modules+", "lm_head"], parser=cli_parser)
    assert cfg.lora.lora_target_modules[-1] == "lm_head" and len(cfg.lora.lora_target_modules) == 8
    _, cfg = parse(["train", "--modules_to_save", "null", "--optional_fields", "[]"], parser=cli_parser)
    assert cfg.lora.modules_to_save is None and cfg.data.optional_fields == []
    _, cfg = parse(["train", "--optional_fields", "input"], parser=cli_parser)
    assert cfg.data.optional_fields == ["input"]


def test_a_wrong_value_for_a_list_flag_is_still_refused_naming_it(cli_parser):
    with pytest.raises(
        ConfigError, match=r"loggers: 'nope' is not allowed \(expected a list of one of 'tensorboard'"
    ):
        parse(["train", "--loggers", "nope"], parser=cli_parser)
    with pytest.raises(
        ConfigError, match=r"inject_nan_steps: 'x' is not allowed \(expected a list of a whole number\)"
    ):
        parse(["train", "--inject_nan_steps", "x"], parser=cli_parser)


def test_a_yaml_list_field_takes_one_value_alone(tmp_path: Path, cli_parser):
    path = tmp_path / "c.yaml"
    path.write_text(
        "lora_target_modules: all-linear\nloggers: csv\ninject_nan_steps: 3\nmodules_to_save: lm_head\n"
        "datasets:\n  - {dataset: org/a, optional_fields: input, weight: 1e-1}\n  - {dataset: org/b}\n",
        encoding="utf-8",
    )
    for cfg in (load_config(path), parse(["prepare", "--config", str(path)], parser=cli_parser)[1]):
        assert cfg.lora.lora_target_modules == ["all-linear"] and cfg.lora.modules_to_save == ["lm_head"]
        assert cfg.train.loggers == ["csv"] and cfg.debug.inject_nan_steps == [3]
        assert cfg.data.datasets[0].optional_fields == ["input"] and cfg.data.datasets[0].weight == 0.1
    _, flag = parse(
        ["prepare", "--datasets", "[{dataset: org/a, optional_fields: input}]"], parser=cli_parser
    )
    assert flag.data.datasets[0].optional_fields == ["input"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("lora_target_modules: 3", "lora_target_modules: expected a list of text, got a whole number (3)"),
        (
            "loggers: nope",
            "loggers: expected a list of one of 'tensorboard', 'mlflow', 'wandb', 'csv', got text",
        ),
        (
            "inject_nan_steps: yes",
            "inject_nan_steps: expected a list of a whole number, got a boolean (True)",
        ),
        (
            "datasets: [{dataset: a, weight: x}]",
            "datasets[0].weight: expected a number or null, got text ('x')",
        ),
    ],
)
def test_a_wrong_yaml_value_for_a_list_field_is_still_refused_naming_it(
    tmp_path: Path, text, problem, cli_parser
):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        parse(["prepare", "--config", str(path)], parser=cli_parser)
    assert any(line.endswith(problem) or problem in line for line in err.value.problems), err.value.problems


def test_version_prints_the_installed_version_and_exits_0(capsys, monkeypatch, cli_parser):
    expected = f"ftpipe {importlib.metadata.version('ftpipe')}\n"
    cli.main(["--version"])  # returns: exit status 0
    assert capsys.readouterr().out == expected
    with pytest.raises(SystemExit) as info:
        parse(["--version"], parser=cli_parser)
    assert info.value.code in (0, None) and capsys.readouterr().out == expected

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)  # run from a source tree, not installed
    assert package_version() == ftpipe.__version__


def test_the_console_command_prints_its_version():
    exe = Path(sys.executable).with_name("ftpipe")
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ftpipe {importlib.metadata.version('ftpipe')}\n"


def test_a_parse_builds_the_flags_of_its_own_command_only(cli_parser):
    assert command_of(["train", "--max_steps", "5"]) == "train"
    assert command_of(["sagemaker", "launch", "--dry_run"]) == "sagemaker"
    assert command_of(["--help"]) is None and command_of(["trian"]) is None
    for argv in (
        ["train", "--max_steps", "500", "--lora_target_modules", "all-linear"],
        ["sagemaker", "launch"],
    ):
        assert parse(argv) == parse(argv, parser=cli_parser)
    with pytest.raises(ConfigError, match=r"invalid choice: 'trian' \(choose from 'prepare', 'train'"):
        parse(["trian"])


def test_building_the_parser_imports_no_heavy_library():
    """The parser is built from the configuration classes alone: no torch, transformers or datasets."""
    code = (
        "import json, sys, time\n"
        "from ftpipe.cli.main import build_parser\n"
        "start = time.perf_counter(); build_parser(); took = time.perf_counter() - start\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'lightning') if m in sys.modules)\n"
        "print(json.dumps({'heavy': heavy, 'took': took}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["heavy"] == []


def test_the_whole_parser_still_lists_every_command():
    names = set(build_parser()._subcommands_action.choices)  # what --help lists
    assert {
        "prepare",
        "train",
        "export",
        "evaluate",
        "run",
        "estimate",
        "inspect",
        "chat",
        "sagemaker",
    } <= names
