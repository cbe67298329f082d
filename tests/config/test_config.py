"""Stage 1: defaults, all-at-once validation, YAML + CLI overrides, self-documenting paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftpipe.cli.main import parse
from ftpipe.config import ConfigError, PipelineConfig, load_config, save_config, validate_config
from ftpipe.config.paths import (
    EMBEDDED_MODEL_ID,
    checkpoints_dir,
    dataset_slug,
    model_slug,
    prepared_data_dir,
    tb_logs_dir,
)
from ftpipe.config.schema import field_section_map

#: The original design's flat flags and defaults: users of that design keep them.
ORIGINAL_DEFAULTS = {
    "hf_model_id": "Qwen/Qwen3-8B",
    "num_nodes": 1,
    "gpus_per_node": 8,
    "max_steps": 10000,
    "micro_batch_size": 2,
    "accumulate_grad_batches": 4,
    "lora_rank": 32,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "data_dir": "datasets",
    "results_dir": "results",
    "learning_rate": 1e-5,
    "warmup_steps": 100,
    "min_lr": 1e-7,
    "adam_beta1": 0.9,
    "adam_beta2": 0.95,
    "weight_decay": 0.01,
    "train_ratio": 0.9,
    "val_ratio": 0.05,
    "test_ratio": 0.05,
    "early_stopping_patience": 3,
    "early_stopping_min_delta": 0.001,
}


def test_defaults_are_the_original_design():
    flat = PipelineConfig().to_flat()
    for name, value in ORIGINAL_DEFAULTS.items():
        assert flat[name] == value, name
    validate_config(PipelineConfig())


def test_every_field_is_a_unique_flat_name():
    mapping = field_section_map()
    assert set(ORIGINAL_DEFAULTS) <= set(mapping)
    assert PipelineConfig.from_flat(PipelineConfig().to_flat()) == PipelineConfig()


def test_validation_reports_every_problem_at_once():
    cfg = PipelineConfig().replace(
        lora_rank=0,
        micro_batch_size=-1,
        lora_dropout=1.0,
        train_ratio=0.8,
        min_lr=1e-3,
        input_template="{instruction} {nonexistent}",
    )
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    problems = info.value.problems
    assert len(problems) == 6, problems
    text = str(info.value)
    for fragment in (
        "lora_rank: 0",
        "micro_batch_size: -1",
        "lora_dropout: 1.0 is outside [0, 1)",
        "must sum to 1",
        "min_lr: 0.001 is above learning_rate 1e-05",
        "unknown template field {nonexistent}",
    ):
        assert fragment in text, fragment
    assert "allowed: the keys of field_mapping: ['input', 'instruction', 'output']" in text


def test_malformed_template_and_strategy_combinations():
    cfg = PipelineConfig().replace(
        output_template="{output",
        strategy="single",
        sharding_strategy="HYBRID_SHARD",
        converter="not_an_import_path",
    )
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    problems = "\n".join(info.value.problems)
    assert "output_template: malformed template" in problems
    assert "strategy: 'single' runs one process but num_nodes x gpus_per_node = 8" in problems
    assert "sharding_strategy: HYBRID_SHARD is an FSDP1 setting" in problems
    assert "converter: 'not_an_import_path'" in problems


def test_literal_braces_are_allowed_in_templates():
    cfg = PipelineConfig().replace(input_template='{{"json": true}} {instruction}')
    validate_config(cfg)


def test_cli_overrides_yaml(tmp_path: Path, cli_parser):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("max_steps: 50\nlora_rank: 8\nlearning_rate: 2.0e-4\nhf_model_id: embedded\n")
    command, cfg = parse(
        [
            "prepare",
            "--config",
            str(yaml_file),
            "--max_steps",
            "7",
            "--warmup_steps",
            "2",
            "--lora_target_modules=[q_proj]",
        ],
        parser=cli_parser,
    )
    assert command == "prepare"
    assert cfg.train.max_steps == 7  # the command line wins
    assert cfg.lora.lora_rank == 8  # from the file
    assert cfg.train.learning_rate == 2e-4
    assert cfg.model.hf_model_id == "embedded"
    assert cfg.lora.lora_target_modules == ["q_proj"]
    assert cfg.train.micro_batch_size == 2  # default untouched


def test_cli_rejects_unknown_keys_and_bad_values(tmp_path: Path, cli_parser):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: max_stepz: unknown configuration field"):
        parse(["prepare", "--config", str(bad)], parser=cli_parser)
    with pytest.raises(ConfigError, match=r"strategy.*fsdp3.*\(see `ftpipe prepare --help`\)"):
        parse(["prepare", "--strategy", "fsdp3"], parser=cli_parser)


def test_cli_validation_errors_exit_with_all_problems(capsys, caplog):
    from ftpipe.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["prepare", "--lora_rank", "0", "--val_ratio", "0.5"])
    assert info.value.code == 2
    assert "lora_rank: 0" in caplog.text and "must sum to 1" in caplog.text


def test_saved_config_loads_back_identically(tmp_path: Path, cli_parser):
    cfg = PipelineConfig().replace(
        max_steps=300,
        hf_model_id="embedded",
        field_mapping={"instruction": "q", "output": "a"},
        input_template="Q: {instruction}\n",
        input_template_no_input=None,
        optional_fields=[],
    )
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg
    _, parsed = parse(["prepare", "--config", str(path)], parser=cli_parser)
    assert parsed == cfg


def test_self_documenting_paths(tmp_path: Path):
    cfg = PipelineConfig().replace(data_dir=str(tmp_path / "d"), results_dir=str(tmp_path / "r"))
    assert prepared_data_dir(cfg.data) == (
        tmp_path
        / "d"
        / "cognitivecomputations"
        / "dolphin"
        / "flan1m-alpaca-uncensored"
        / "train=90%-val=5%-test=5%"
    )
    assert checkpoints_dir(cfg) == tmp_path / "r" / "Qwen" / "Qwen3-8B" / "checkpoints"
    assert tb_logs_dir(cfg) == tmp_path / "r" / "Qwen" / "Qwen3-8B" / "tb_logs"
    assert model_slug("embedded") == Path(EMBEDDED_MODEL_ID)
    local = dataset_slug("../other/data/alpaca_en_demo.json")  # local data: its name and a hash of its path
    assert local.parent == Path("local") and re.fullmatch(r"alpaca_en_demo-[0-9a-f]{8}", local.name)
    assert (
        dataset_slug("data/*.jsonl") == Path("local/data") or dataset_slug("data/*.jsonl").parts[0] == "local"
    )

    odd = cfg.replace(train_ratio=0.8, val_ratio=0.1, test_ratio=0.1)
    assert prepared_data_dir(odd.data).name == "train=80%-val=10%-test=10%"
    # A setting that changes the rows gets its own folder; the same settings the same folder.
    reseeded = prepared_data_dir(cfg.replace(split_seed=7).data)
    assert reseeded.parent == prepared_data_dir(cfg.data).parent
    assert reseeded.name.startswith("train=90%-val=5%-test=5%-cfg") and reseeded != prepared_data_dir(
        cfg.data
    )
    assert prepared_data_dir(cfg.replace(split_seed=7).data) == reseeded
    # Tokenization-only settings do not move the prepared data.
    assert prepared_data_dir(
        cfg.replace(max_seq_length=128, use_chat_template=True).data
    ) == prepared_data_dir(cfg.data)


def test_console_command_exits_zero_on_success_and_two_on_user_errors(alpaca_demo, tmp_path):
    """The installed ``ftpipe`` script: 0 on success, 2 with a message (no traceback) on a user error."""
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("ftpipe")
    ok = subprocess.run(
        [
            str(exe),
            "prepare",
            "--dataset",
            str(alpaca_demo),
            "--data_dir",
            str(tmp_path),
            "--max_samples",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(
        [str(exe), "prepare", "--dataset", str(tmp_path / "nope.json"), "--data_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "nope.json" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], True),
        (["--merge", "false"], False),
        (["--merge=false"], False),
        (["--no_merge"], False),
        (["--merge"], True),
    ],
)
def test_boolean_fields_take_flag_and_no_flag_forms(argv, expected, cli_parser):
    _, cfg = parse(["prepare", *argv], parser=cli_parser)
    assert cfg.export.merge is expected
    _, cfg = parse(["prepare", "--no_activation_checkpointing", "--trust_remote_code"], parser=cli_parser)
    assert cfg.dist.activation_checkpointing is False and cfg.model.trust_remote_code is True


def test_resume_is_short_for_resume_from_checkpoint(cli_parser):
    _, cfg = parse(["train", "--resume", "auto"], parser=cli_parser)
    assert cfg.train.resume_from_checkpoint == "auto"
    _, cfg = parse(["train", "--resume_from_checkpoint", "/x/last.ckpt"], parser=cli_parser)
    assert cfg.train.resume_from_checkpoint == "/x/last.ckpt"
