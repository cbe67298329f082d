"""A careless or hostile user, table-driven: every bad input to every sub-command is one message naming the
culprit, exit status 2, no traceback, and nothing outside the command's own new output changes.

Each case runs ``ftpipe.cli.main.main`` in this process (the console entry point's own code) with its
log handler writing to a buffer; the files of the case's folder are hashed before and after, and
only ``out/`` (the command's own output) may change. Three cases also run as real console commands to
check what reaches the terminal. Add a case here for every new way to fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ROW = {"instruction": "Say hi.", "input": "", "output": "Hi."}
GOOD_ROWS = [{**ROW, "output": f"Hi {i}."} for i in range(12)]


@dataclass
class Case:
    """One bad input: the command line (``{name}`` placeholders are paths the setup made), what the
    message must name, and the files to make first."""

    id: str
    argv: list[str]
    expect: list[str]
    setup: Callable[[Path], None] | None = None
    needs: tuple[str, ...] = field(default_factory=tuple)  # fixtures: "model", "export"


# --------------------------------------------------------------------------------------------------
# setups


def write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))

    return make


def jsonl(rel: str, rows: list) -> Callable[[Path], None]:
    return write(rel, "".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))


def both(*makers: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        for maker in makers:
            maker(tmp)

    return make


def model_config(**changes) -> Callable[[Path], None]:
    """A folder ``badmodel`` holding the tiny Llama's config.json with ``changes``."""

    def make(tmp: Path) -> None:
        config = json.loads((Path(os.environ["FTPIPE_TEST_TINY"]) / "config.json").read_text())
        folder = tmp / "badmodel"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return make


def ckpt(value) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        torch.save(value, tmp / "bad.ckpt")

    return make


def yaml(text: str) -> Callable[[Path], None]:
    return write("bad.yaml", text)


def converter_module(body: str) -> Callable[[Path], None]:
    return both(write("convmods/hostile_conv.py", body), jsonl("good.jsonl", GOOD_ROWS))


def copy_tiny(rel: str) -> Callable[[Path], None]:
    """A copy of the tiny Llama's folder (another model for ftpipe: another path)."""

    def make(tmp: Path) -> None:
        shutil.copytree(os.environ["FTPIPE_TEST_TINY"], tmp / rel)

    return make


def earlier_run(rel: str) -> Callable[[Path], None]:
    """The results folder of an earlier run of the tiny Llama: its config.yaml and TensorBoard events."""

    def make(tmp: Path) -> None:
        from ftpipe.config.paths import model_slug

        root = tmp / rel / model_slug(os.environ["FTPIPE_TEST_TINY"])
        (root / "tb_logs" / "version_0").mkdir(parents=True)
        (root / "tb_logs" / "version_0" / "events.out.tfevents.1.host").write_bytes(b"\x00events")
        (root / "config.yaml").write_text("lora_rank: 4\n")

    return make


PREP = ["prepare", "--dataset", "{tmp}/good.jsonl", "--data_dir", "{tmp}/out"]
TRAIN = [
    "train",
    "--hf_model_id",
    "{model}",
    "--dataset",
    "{tmp}/good.jsonl",
    "--data_dir",
    "{tmp}/out",
    "--gpus_per_node",
    "1",
    "--strategy",
    "single",
]
GOOD = jsonl("good.jsonl", GOOD_ROWS)


def prep(*extra: str) -> list[str]:
    return [*PREP, *extra]


def data(rel: str, *extra: str) -> list[str]:
    return ["prepare", "--dataset", f"{{tmp}}/{rel}", "--data_dir", "{tmp}/out", *extra]


def export(*extra: str) -> list[str]:
    return [
        "export",
        "--hf_model_id",
        "{model}",
        "--results_dir",
        "{tmp}/out",
        "--lora_rank",
        "4",
        "--lora_alpha",
        "8",
        "--lora_dropout",
        "0",
        *extra,
    ]


def estimate(*extra: str) -> list[str]:
    return ["estimate", "--hf_model_id", "{model}", "--gpus_per_node", "1", "--strategy", "single", *extra]


def launch(*extra: str) -> list[str]:
    return ["sagemaker", "launch", "--dry_run", "--hf_model_id", "Qwen/Qwen3-8B", *extra]


CONFIG_CASES = [
    Case(
        "nan-learning-rate",
        prep("--learning_rate", "nan"),
        ["learning_rate: 'nan' is not allowed (expected a number)"],
        GOOD,
    ),
    Case(
        "inf-yaml",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["learning_rate: inf is not a usable number"],
        both(GOOD, yaml("learning_rate: .inf\n")),
    ),
    Case(
        "nan-dropout-yaml",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["lora_dropout: nan"],
        both(GOOD, yaml("lora_dropout: .nan\n")),
    ),
    Case(
        "duplicate-yaml-key",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["'max_steps' is given twice (lines 1 and 2)"],
        both(GOOD, yaml("max_steps: 5\nmax_steps: 7\n")),
    ),
    Case(
        "yaml-list",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["bad.yaml: expected a mapping of field: value, got list"],
        both(GOOD, yaml("- 1\n- 2\n")),
    ),
    Case(
        "yaml-not-utf8",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["bad.yaml is not UTF-8 text"],
        both(GOOD, write("bad.yaml", b"max_steps: \xff\xfe\n")),
    ),
    Case(
        "yaml-syntax",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["bad.yaml: line 2", "not valid YAML"],
        both(GOOD, yaml("a:\n\tb: 1\n")),
    ),
    Case("config-missing", [*PREP, "--config", "{tmp}/nope.yaml"], ["nope.yaml does not exist"], GOOD),
    Case("config-folder", [*PREP, "--config", "{tmp}"], ["is a folder"], GOOD),
    Case(
        "yaml-unknown-key",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["max_stepz: unknown configuration field"],
        both(GOOD, yaml("max_stepz: 5\n")),
    ),
    Case("unknown-flag", prep("--max_stepz", "5"), ["unrecognized arguments: --max_stepz"], GOOD),
    Case(
        "yaml-no-is-boolean",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["dataset_subset: expected text or null, got a boolean (False)", "quote the value"],
        both(GOOD, yaml("dataset_subset: no\n")),
    ),
    Case(
        "yaml-number-for-text",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["hf_model_id: expected text, got a whole number (123)"],
        both(GOOD, yaml("hf_model_id: 123\n")),
    ),
    Case(
        "text-for-int",
        prep("--max_steps", "ten"),
        ["max_steps: 'ten' is not allowed (expected a whole number)"],
        GOOD,
    ),
    Case(
        "float-for-int-yaml",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["max_steps: expected a whole number, got a number (5.5)"],
        both(GOOD, yaml("max_steps: 5.5\n")),
    ),
    Case(
        "bool-for-int-yaml",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["micro_batch_size: expected a whole number, got a boolean (True)"],
        both(GOOD, yaml("micro_batch_size: true\n")),
    ),
    Case("ratios-sum", prep("--val_ratio", "0.5"), ["must sum to 1"], GOOD),
    Case(
        "warmup-too-long",
        prep("--max_steps", "5", "--warmup_steps", "5"),
        ["warmup_steps: 5 must be below max_steps 5"],
        GOOD,
    ),
    Case("min-lr-above-lr", prep("--min_lr", "0.1"), ["min_lr: 0.1 is above learning_rate"], GOOD),
    Case(
        "field-mapping-key",
        prep("--field_mapping", '{"in struction": "instruction", "output": "output"}'),
        ["field_mapping: key 'in struction' is not a template field name"],
        GOOD,
    ),
    Case(
        "field-mapping-empty-column",
        prep("--field_mapping", '{"instruction": "", "input": "input", "output": "output"}'),
        ["field_mapping: 'instruction' maps to an empty column name"],
        GOOD,
    ),
    Case(
        "text-replacement-empty-key",
        prep("--text_replacements", '{"": "x"}'),
        ["text_replacements: an empty key"],
        GOOD,
    ),
    Case(
        "lora-target-twice",
        prep("--lora_target_modules", "[q_proj,q_proj]"),
        ["lora_target_modules: 'q_proj' is listed twice"],
        GOOD,
    ),
    Case(
        "datasets-unknown-field",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["datasets[0].colour: unknown field"],
        both(GOOD, yaml("datasets:\n  - dataset: a.json\n    colour: red\n")),
    ),
    Case(
        "datasets-weight-and-count",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["datasets[0].weight / num_samples: give one of them"],
        both(GOOD, yaml("datasets:\n  - dataset: a.json\n    weight: 1\n    num_samples: 3\n")),
    ),
    Case(
        "datasets-weight-nan",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["datasets[0].weight: nan is not a usable number"],
        both(GOOD, yaml("datasets:\n  - dataset: a.json\n    weight: .nan\n")),
    ),
    Case(
        "datasets-not-a-list",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["datasets: expected a list of entries"],
        both(GOOD, yaml("datasets: a.json\n")),
    ),
    Case(
        "chat-template-unknown",
        prep("--chat_template", "chatml-toolz"),
        ["chat_template: 'chatml-toolz' is neither a chat template shipped"],
        GOOD,
    ),
    Case(
        "converter-no-colon",
        prep("--converter", "mymodule"),
        ["converter: 'mymodule' must be an import path"],
        GOOD,
    ),
    Case(
        "optional-field-unknown",
        prep("--optional_fields", "[context]"),
        ["optional_fields: 'context' is not a key of field_mapping"],
        GOOD,
    ),
    Case(
        "template-brace",
        prep("--input_template", "{instruction"),
        ["input_template: malformed template"],
        GOOD,
    ),
    Case("gpus-zero", prep("--gpus_per_node", "0"), ["gpus_per_node: 0 is not allowed"], GOOD),
    Case("precision-unknown", prep("--precision", "fp8"), ["precision: 'fp8' is not allowed"], GOOD),
    Case(
        "single-with-two",
        prep("--strategy", "single", "--gpus_per_node", "2"),
        ["strategy: 'single' runs one process"],
        GOOD,
    ),
    Case("temperature-negative", prep("--temperature", "-1"), ["temperature: -1.0 is not allowed"], GOOD),
    Case("top-p-zero", prep("--top_p", "0"), ["top_p: 0.0 is outside (0, 1]"], GOOD),
    Case(
        "max-wait-without-spot",
        prep("--max_wait_s", "100"),
        ["max_wait_s: only applies to spot training"],
        GOOD,
    ),
    Case(
        "s3-uri",
        prep("--training_data_s3_uri", "https://bucket/x"),
        ["training_data_s3_uri: 'https://bucket/x' is not an S3 URI"],
        GOOD,
    ),
    Case(
        "timeout-nan",
        prep("--process_group_timeout_s", "nan"),
        ["process_group_timeout_s: 'nan' is not allowed (expected a number)"],
        GOOD,
    ),
    Case(
        "min-delta-negative",
        prep("--early_stopping_min_delta", "-1"),
        ["early_stopping_min_delta: -1.0 is not allowed"],
        GOOD,
    ),
    Case("lora-rank-zero", prep("--lora_rank", "0"), ["lora_rank: 0 is not allowed"], GOOD),
    Case(
        "field-mapping-value-list",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["field_mapping['output']: expected text, got a list"],
        both(GOOD, yaml("field_mapping:\n  instruction: instruction\n  input: input\n  output: [a, b]\n")),
    ),
    Case(
        "clip-inf",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["gradient_clip_val: inf is not a usable number"],
        both(GOOD, yaml("gradient_clip_val: .inf\n")),
    ),
    Case("no-subcommand", [], ['expected "subcommand"']),
    Case("unknown-subcommand", ["frobnicate"], ["invalid choice: 'frobnicate'"]),
]

DATA_CASES = [
    Case("dataset-missing", data("nope.jsonl"), ["dataset: '", "nope.jsonl' does not exist"]),
    Case("empty-json", data("e.json"), ["e.json: the file is empty"], write("e.json", "")),
    Case("empty-jsonl", data("e.jsonl"), ["e.jsonl: the file is empty"], write("e.jsonl", "")),
    Case("blank-jsonl", data("e.jsonl"), ["e.jsonl: the file is empty"], write("e.jsonl", "\n  \n\n")),
    Case("json-invalid", data("b.json"), ["b.json: not valid JSON"], write("b.json", '[{"instruction": }]')),
    Case(
        "json-object",
        data("b.json"),
        ["b.json: no column 'instruction'", "its columns are ['a']"],
        write("b.json", '{"a": 1}'),
    ),
    Case(
        "all-rows-bad",
        data("b.jsonl"),
        ["b.jsonl: no column 'output'"],
        jsonl("b.jsonl", [{"instruction": "a", "input": ""}] * 2),
    ),
    Case("csv-empty", data("e.csv"), ["e.csv: the file is empty"], write("e.csv", "")),
    Case(
        "csv-header-only",
        data("h.csv"),
        ["h.csv: holds no rows"],
        write("h.csv", "instruction,input,output\n"),
    ),
    Case(
        "csv-not-utf8",
        data("n.csv"),
        ["n.csv: not UTF-8 text (it holds NUL bytes"],
        write("n.csv", "instruction,input,output\na,b,c\nd,e,f\n".encode("utf-16")[2:]),
    ),
    Case(
        "parquet-garbage",
        data("g.parquet"),
        ["g.parquet: not a Parquet file"],
        write("g.parquet", b"\x00\x01garbage" * 50),
    ),
    Case(
        "unsupported-suffix",
        data("d.xlsx"),
        ["d.xlsx has an unsupported type '.xlsx'"],
        write("d.xlsx", b"PK\x03\x04"),
    ),
    Case(
        "glob-no-match",
        data("*.jsonl"),
        ["dataset: no .json/.jsonl/.csv/.parquet/.arrow/.txt file matches the glob"],
    ),
    Case(
        "folder-no-data",
        data("empty_dir"),
        ["holds neither a save_to_disk data set nor data files"],
        write("empty_dir/notes.md", "x"),
    ),
    Case(
        "utf16-json",
        data("u.json"),
        ["u.json: not UTF-8 text", "UTF-16?"],
        write("u.json", "\n".join(json.dumps(r) for r in GOOD_ROWS).encode("utf-16")),
    ),
    Case(
        "binary-jsonl",
        data("bin.jsonl"),
        ["bin.jsonl: not UTF-8 text"],
        write("bin.jsonl", bytes(range(256)) * 4),
    ),
    Case(
        "converter-module-missing",
        prep("--converter", "no_such_mod_xyz:f"),
        ["converter no_such_mod_xyz:f: cannot import module"],
        GOOD,
    ),
    Case(
        "converter-function-missing",
        prep("--converter", "json:nope"),
        ["converter json:nope: module 'json' has no function 'nope'"],
        GOOD,
    ),
    Case(
        "converter-import-raises",
        prep("--converter", "hostile_conv:f"),
        ["converter hostile_conv:f: importing module 'hostile_conv' failed (ZeroDivisionError"],
        converter_module("x = 1 / 0\n"),
    ),
    Case(
        "converter-syntax-error",
        prep("--converter", "hostile_conv:f"),
        ["converter hostile_conv:f: importing module 'hostile_conv' failed (SyntaxError"],
        converter_module("def f(:\n"),
    ),
    Case(
        "converter-builtins-dict",
        prep("--converter", "builtins:dict"),
        ["no usable rows", "converter_bad_result=12"],
        GOOD,
    ),
    Case(
        "converter-returns-text",
        prep("--converter", "hostile_conv:f"),
        ["no usable rows", "converter_bad_result=12"],
        converter_module("def f(row):\n    return 'text'\n"),
    ),
    Case(
        "converter-raises",
        prep("--converter", "hostile_conv:f"),
        ["no usable rows", "converter_error=12"],
        converter_module("def f(row):\n    raise KeyError('question')\n"),
    ),
    Case(
        "converter-empty-prompt",
        prep("--converter", "hostile_conv:f"),
        ["no usable rows", "empty_prompt=12"],
        converter_module("def f(row):\n    return {'input': '', 'output': row['output']}\n"),
    ),
    Case(
        "data-dir-is-file",
        ["prepare", "--dataset", "{tmp}/good.jsonl", "--data_dir", "{tmp}/good.jsonl"],
        ["data_dir:", "good.jsonl", "is a file"],
        GOOD,
    ),
    Case(
        "data-dir-under-file",
        ["prepare", "--dataset", "{tmp}/good.jsonl", "--data_dir", "{tmp}/good.jsonl/sub"],
        ["data_dir:", "which is a file"],
        GOOD,
    ),
    Case(
        "column-missing",
        prep("--field_mapping", '{"instruction": "question", "input": "input", "output": "output"}'),
        ["no column 'question'"],
        GOOD,
    ),
    Case(
        "tools-without-template",
        data("agent.jsonl", "--hf_model_id", "{model}"),
        ["the data uses tools", "Set chat_template"],
        jsonl(
            "agent.jsonl",
            [
                {
                    "conversations": [
                        {"from": "human", "value": "q"},
                        {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                    ],
                    "tools": '[{"name": "f"}]',
                }
            ],
        ),
        needs=("model",),
    ),
    Case(
        "bad-row-fail",
        data("b.jsonl", "--on_bad_row", "fail"),
        ["b.jsonl: line 2: bad row (missing:output)"],
        jsonl("b.jsonl", [ROW, {"instruction": "a", "input": ""}]),
    ),
    Case(
        "hub-offline",
        ["prepare", "--dataset", "someorg/somedata", "--data_dir", "{tmp}/out"],
        ["taken as a Hugging Face hub id", "offline"],
    ),
    Case(
        "prepared-dir-incomplete",
        prep("--prepared_dir", "{tmp}/prep"),
        ["prepared_dir", "missing"],
        both(GOOD, write("prep/training.jsonl", json.dumps({"input": "a", "output": "b"}) + "\n")),
    ),
    Case(
        "datasets-entry-missing-file",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["datasets[1] (gone): dataset:", "does not exist"],
        both(
            GOOD,
            lambda t: (t / "bad.yaml").write_text(
                f"datasets:\n  - dataset: {t}/good.jsonl\n  - dataset: {t}/gone.jsonl\n"
            ),
        ),
    ),
    Case(
        "coerced-on-fail",
        data("n.jsonl", "--on_bad_row", "fail"),
        ["n.jsonl: line 1: bad row (coerced:output)"],
        jsonl("n.jsonl", [{**ROW, "output": 42}]),
    ),
    Case(
        "chat-all-out-of-order",
        data("c.jsonl"),
        ["no usable rows", "chat_role_order=2"],
        jsonl(
            "c.jsonl",
            [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}] * 2,
        ),
    ),
    Case(
        "csv-extra-cells-fail",
        data("x.csv", "--on_bad_row", "fail"),
        ["x.csv: row 0: bad row (csv_extra_cells)"],
        write("x.csv", "instruction,input,output\na,b,c,d\n"),
    ),
    Case(
        "inspect-n-zero",
        ["inspect", "--dataset", "{tmp}/good.jsonl", "--data_dir", "{tmp}/out", "--n", "0"],
        ["n: 0 is not allowed"],
        GOOD,
    ),
    Case(
        "inspect-bad-split",
        ["inspect", "--dataset", "{tmp}/good.jsonl", "--data_dir", "{tmp}/out", "--split", "train"],
        ["split: 'train' is not allowed"],
        GOOD,
    ),
]

EXPORT_CASES = [
    Case(
        "export-dir-is-file",
        export("--checkpoint", "{ckpt}", "--export_dir", "{tmp}/prev/config.json"),
        ["export_dir:", "config.json is a file"],
        needs=("model", "export"),
    ),
    Case(
        "export-dir-foreign",
        export("--checkpoint", "{ckpt}", "--export_dir", "{tmp}/foreign"),
        ["export_dir:", "foreign exists and is not an ftpipe export"],
        write("foreign/mine.txt", "keep me"),
        needs=("model", "export"),
    ),
    Case(
        "export-dir-under-file",
        export("--checkpoint", "{ckpt}", "--export_dir", "{tmp}/prev/config.json/x"),
        ["export_dir:", "which is a file"],
        needs=("model", "export"),
    ),
    Case(
        "checkpoint-missing",
        export("--checkpoint", "{tmp}/none.ckpt"),
        ["checkpoint:", "none.ckpt does not exist"],
        needs=("model",),
    ),
    Case(
        "checkpoint-random-bytes",
        export("--checkpoint", "{tmp}/bad.ckpt"),
        ["bad.ckpt: not a checkpoint file (neither a zip archive"],
        write("bad.ckpt", os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk")),
        needs=("model",),
    ),
    Case(
        "checkpoint-list",
        export("--checkpoint", "{tmp}/bad.ckpt"),
        ["bad.ckpt: holds a list, not a checkpoint"],
        ckpt([1, 2, 3]),
        needs=("model",),
    ),
    Case(
        "checkpoint-non-tensor",
        export("--checkpoint", "{tmp}/bad.ckpt"),
        ["state_dict entry 'model.x' holds a str, not a tensor"],
        ckpt({"state_dict": {"model.x": "hello"}}),
        needs=("model",),
    ),
    Case(
        "checkpoint-empty-state",
        export("--checkpoint", "{tmp}/bad.ckpt"),
        ["bad.ckpt: no model weights"],
        ckpt({"state_dict": {}}),
        needs=("model",),
    ),
    Case(
        "checkpoint-keys-mismatch",
        export("--checkpoint", "{badckpt}", "--export_dir", "{tmp}/prev"),
        ["has shape (3, 64) but the model's is"],
        needs=("model", "export", "badckpt"),
    ),
    Case("checkpoint-best-no-run", export(), ["checkpoint: no training run under"], needs=("model",)),
    Case(
        "checkpoint-folder-not-dcp",
        export("--checkpoint", "{tmp}/folder"),
        ["is neither a checkpoint file nor a distributed-checkpoint folder"],
        write("folder/x.txt", "x"),
        needs=("model",),
    ),
    Case(
        "export-model-config-bad",
        ["export", "--hf_model_id", "{tmp}/badmodel", "--checkpoint", "{ckpt}", "--results_dir", "{tmp}/out"],
        [
            "config.json holds values transformers refuses",
            "hidden size (64) is not a multiple of the number of attention heads (5)",
        ],
        model_config(num_attention_heads=5, num_key_value_heads=5),
        needs=("model", "export"),
    ),
]

ESTIMATE_CASES = [
    Case(
        "estimate-lora-target",
        estimate("--lora_target_modules", "[q_projj]"),
        ["lora_target_modules: ['q_projj'] not found"],
        needs=("model",),
    ),
    Case(
        "estimate-layer-class",
        estimate("--decoder_layer_cls", "NoSuchLayer"),
        ["NoSuchLayer"],
        needs=("model",),
    ),
    Case(
        "estimate-heads",
        ["estimate", "--hf_model_id", "{tmp}/badmodel"],
        [
            "config.json holds values transformers refuses",
            "hidden size (64) is not a multiple of the number of attention heads (5)",
        ],
        model_config(num_attention_heads=5, num_key_value_heads=5),
        needs=("model",),
    ),
    Case(
        "estimate-kv-heads",
        ["estimate", "--hf_model_id", "{tmp}/badmodel"],
        ["num_key_value_heads 3 does not divide num_attention_heads 4"],
        model_config(num_key_value_heads=3),
        needs=("model",),
    ),
    Case(
        "estimate-zero-layers",
        ["estimate", "--hf_model_id", "{tmp}/badmodel"],
        ["num_hidden_layers is 0"],
        model_config(num_hidden_layers=0),
        needs=("model",),
    ),
    Case(
        "estimate-negative-vocab",
        ["estimate", "--hf_model_id", "{tmp}/badmodel"],
        ["vocab_size is -5"],
        model_config(vocab_size=-5),
        needs=("model",),
    ),
    Case(
        "estimate-config-json-invalid",
        ["estimate", "--hf_model_id", "{tmp}/m"],
        ["m/config.json is not valid JSON"],
        write("m/config.json", "{not json"),
        needs=("model",),
    ),
    Case(
        "estimate-folder-without-config",
        ["estimate", "--hf_model_id", "{tmp}/m"],
        ["hf_model_id: cannot load"],
        write("m/readme.txt", "x"),
        needs=("model",),
    ),
    Case(
        "estimate-gpu-memory-negative",
        estimate("--gpu_memory_gib", "-1"),
        ["gpu_memory_gib: -1.0 is not allowed"],
        needs=("model",),
    ),
    Case(
        "estimate-text-for-float",
        estimate("--gpu_memory_gib", "lots"),
        ["gpu_memory_gib: 'lots' is not allowed"],
        needs=("model",),
    ),
]

SAGEMAKER_CASES = [
    Case(
        "sm-instance-shell",
        launch("--instance_type", "ml.p4d; rm -rf /"),
        ["instance_type: 'ml.p4d; rm -rf /' is not a SageMaker instance type"],
    ),
    Case(
        "sm-cpu-instance",
        launch("--instance_type", "ml.m5.xlarge"),
        ["gpus_per_node: 8 processes per instance, but ml.m5.xlarge is a CPU instance"],
    ),
    Case(
        "sm-too-few-gpus",
        launch("--instance_type", "ml.g5.12xlarge"),
        ["ml.g5.12xlarge has 4 GPU(s): set --gpus_per_node 4"],
    ),
    Case(
        "sm-data-uri",
        launch("--training_data_s3_uri", "/local/data"),
        ["training_data_s3_uri: '/local/data' is not an S3 URI"],
    ),
    Case("sm-instance-count", launch("--instance_count", "0"), ["instance_count: 0 is not allowed"]),
    Case(
        "sm-max-wait",
        launch("--use_spot", "--max_wait_s", "10", "--max_run_s", "100"),
        ["max_wait_s: 10 is below max_run_s 100"],
    ),
    Case(
        "sm-output-uri", launch("--output_s3_uri", "http://x"), ["output_s3_uri: 'http://x' is not an S3 URI"]
    ),
    Case("sm-source-dir", launch("--source_dir", "{tmp}/nosrc"), ["source_dir"]),
]

RUN_CASES = [
    Case(
        "train-results-dir-is-file",
        [
            "train",
            "--hf_model_id",
            "{model}",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--results_dir",
            "{tmp}/good.jsonl",
            "--gpus_per_node",
            "1",
            "--strategy",
            "single",
        ],
        ["results_dir:", "is a file"],
        GOOD,
        needs=("model",),
    ),
    Case(
        "train-unknown-model",
        [
            "train",
            "--hf_model_id",
            "{tmp}/no-model",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--results_dir",
            "{tmp}/out/results",
            "--gpus_per_node",
            "1",
            "--strategy",
            "single",
        ],
        ["hf_model_id: cannot load the tokenizer"],
        GOOD,
    ),
    Case(
        "evaluate-eval-dir-is-file",
        [
            "evaluate",
            "--hf_model_id",
            "{model}",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--eval_dir",
            "{tmp}/good.jsonl",
        ],
        ["eval_dir:", "is a file"],
        GOOD,
        needs=("model",),
    ),
    Case(
        "evaluate-no-test-split",
        [
            "evaluate",
            "--hf_model_id",
            "{model}",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--results_dir",
            "{tmp}/out/r",
            "--train_ratio",
            "1",
            "--val_ratio",
            "0",
            "--test_ratio",
            "0",
        ],
        ["the test split", "is empty"],
        GOOD,
        needs=("model",),
    ),
]

# Runs meeting each other and the inputs of the never-cross-wire round, one list per area.
#: run identity, ownership, locks, resume compatibility, stale exports (train / export / evaluate / run)
RUNS_MEET_CASES: list[Case] = [
    Case(
        "resume-other-lora-rank",
        [*TRAIN, "--results_dir", "{tmp}/res", "--resume_from_checkpoint", "{ckpt}", "--lora_rank", "8"],
        ["resume_from_checkpoint:", "lora_rank: the checkpoint was trained with 4, this run has 8"],
        both(GOOD, earlier_run("res")),  # the earlier run's config.yaml and TensorBoard logs stay as they are
        needs=("model",),
    ),
    Case(
        "resume-other-model",
        [
            *TRAIN,
            "--hf_model_id",
            "{tmp}/othermodel",
            "--results_dir",
            "{tmp}/out/r",
            "--resume_from_checkpoint",
            "{ckpt}",
            "--lora_rank",
            "4",
            "--lora_alpha",
            "8",
        ],
        ["resume_from_checkpoint:", "hf_model_id: the checkpoint was trained with"],
        both(GOOD, copy_tiny("othermodel")),
        needs=("model",),
    ),
    Case(
        "evaluate-export-dir-missing",
        [
            "evaluate",
            "--hf_model_id",
            "{model}",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--results_dir",
            "{tmp}/out/r",
            "--export_dir",
            "{tmp}/nope",
        ],
        ["export_dir:", "nope does not exist"],
        GOOD,
        needs=("model",),
    ),
    Case(
        "evaluate-export-dir-adapter",
        [
            "evaluate",
            "--hf_model_id",
            "{model}",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--results_dir",
            "{tmp}/out/r",
            "--export_dir",
            "{tmp}/adapter",
        ],
        ["export_dir:", "holds no merged model"],
        both(GOOD, write("adapter/adapter_config.json", "{}")),
        needs=("model",),
    ),
    Case(
        "run-foreign-export-dir",
        [
            "run",
            "--hf_model_id",
            "{model}",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--results_dir",
            "{tmp}/out/r",
            "--gpus_per_node",
            "1",
            "--strategy",
            "single",
            "--export_dir",
            "{tmp}/mine",
        ],
        ["export_dir:", "exists and is not an ftpipe export"],  # before any data is prepared or trained
        both(GOOD, write("mine/thesis.tex", "\\documentclass{article}")),
        needs=("model",),
    ),
    Case(
        "export-unknown-run-id",
        export("--run_id", "20260101-000000-abcdef"),
        ["run_id: no run '20260101-000000-abcdef'", "(runs there: none)"],
        needs=("model",),
    ),
    Case(
        "export-run-id-path-missing",
        export("--run_id", "{tmp}/runs/run-x.json"),
        ["run_id:", "run-x.json does not exist"],
        needs=("model",),
    ),
    Case(
        "export-run-id-folder-without-runs",
        export("--run_id", "{tmp}/empty"),
        ["run_id:", "holds no ftpipe run manifest"],
        write("empty/notes.txt", "x"),
        needs=("model",),
    ),
    Case(
        "export-run-manifest-broken",
        export("--run_id", "{tmp}/run-x.json"),
        ["run manifest", "run-x.json is not an ftpipe run manifest"],
        write("run-x.json", "[1, 2]"),
        needs=("model",),
    ),
]
#: prepared data keyed by the source's identity, data_dir inside the data set, prepared_dir checks
PREPARED_DATA_CASES: list[Case] = [
    Case(
        "data-dir-inside-dataset-folder",
        ["prepare", "--dataset", "{tmp}/raw", "--data_dir", "{tmp}/raw/prepared"],
        [
            "data_dir: ",
            "/raw/prepared is inside the folder ",
            "/raw of dataset",
            "give data_dir a folder outside",
        ],
        jsonl("raw/good.jsonl", GOOD_ROWS),
    ),
    Case(
        "data-dir-is-dataset-folder",
        ["prepare", "--dataset", "{tmp}/raw/", "--data_dir", "{tmp}/raw"],
        ["data_dir: ", "/raw is inside the folder ", "/raw of dataset"],
        jsonl("raw/good.jsonl", GOOD_ROWS),
    ),
    Case(
        "data-dir-inside-recursive-glob",
        ["prepare", "--dataset", "{tmp}/raw/**/*.jsonl", "--data_dir", "{tmp}/raw/p"],
        ["data_dir: ", "/raw/p is inside the folder ", "would be read back as source data"],
        jsonl("raw/good.jsonl", GOOD_ROWS),
    ),
    Case(
        "prepared-dir-raw-alpaca-rows",
        ["prepare", "--prepared_dir", "{tmp}/raw", "--data_dir", "{tmp}/out"],
        ["prepared_dir: ", "/raw/training.jsonl: line 1 has the keys", "point `dataset` at it instead"],
        both(*(jsonl(f"raw/{name}.jsonl", GOOD_ROWS) for name in ("training", "validation", "test"))),
    ),
    Case(
        "prepared-dir-not-objects",
        ["prepare", "--prepared_dir", "{tmp}/raw", "--data_dir", "{tmp}/out"],
        ["prepared_dir: ", "/raw/validation.jsonl: line 2 is a JSON list, not a prepared row"],
        both(
            jsonl("raw/training.jsonl", [{"id": 0, "source": "s", "input": "q", "output": "a"}]),
            jsonl("raw/validation.jsonl", [{"id": 1, "source": "s", "input": "q", "output": "a"}, "[1, 2]"]),
            write("raw/test.jsonl", ""),
        ),
    ),
]
#: user files and code: templates, nested JSON, converters raising BaseException, odd paths
USER_INPUT_CASES: list[Case] = [
    Case(
        "chat-template-syntax-error",
        [
            "inspect",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--hf_model_id",
            "{model}",
            "--chat_template",
            "{tmp}/t.jinja",
        ],
        ["chat_template:", "t.jinja: line 2: Jinja syntax error: unexpected '}'"],
        both(GOOD, write("t.jinja", "{% for m in messages %}\n{{ m.content }\n{% endfor %}\n")),
    ),
    Case(
        "chat-template-raise-exception",
        [
            "inspect",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--hf_model_id",
            "{model}",
            "--chat_template",
            "{tmp}/t.jinja",
        ],
        ["t.jinja: the template raised an error: this template renders nothing"],
        both(GOOD, write("t.jinja", "{{ raise_exception('this template renders nothing') }}")),
    ),
    Case(
        "chat-template-empty-file",
        [
            "inspect",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--hf_model_id",
            "{model}",
            "--chat_template",
            "{tmp}/t.jinja",
        ],
        ["t.jinja: the file is empty"],
        both(GOOD, write("t.jinja", "\n  \n")),
    ),
    Case(
        "chat-template-file-breaks-on-tools",
        data("agent.jsonl", "--hf_model_id", "{model}", "--chat_template", "{tmp}/t.jinja"),
        ["the chat template file", "t.jinja (chat_template) cannot render them", "UndefinedError"],
        both(
            write(
                "t.jinja",
                "{% for m in messages %}{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls[0].no.such }}"
                "{% endif %}{% endfor %}",
            ),
            jsonl(
                "agent.jsonl",
                [
                    {
                        "conversations": [
                            {"from": "human", "value": "q"},
                            {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
                            {"from": "observation", "value": "r"},
                            {"from": "gpt", "value": "done"},
                        ],
                        "tools": '[{"name": "f"}]',
                    }
                ],
            ),
        ),
        needs=("model",),
    ),
    Case(
        "deep-jsonl-row",
        data("d.jsonl", "--on_bad_row", "fail"),
        ["d.jsonl: line 2: bad row (too_deep): values nested more than 100 levels deep"],
        write(
            "d.jsonl",
            json.dumps(ROW) + '\n{"instruction": "a", "input": ' + "[" * 100000 + "]" * 100000 + "}\n",
        ),
    ),
    Case(
        "deep-json-array-row",
        data("d.json", "--on_bad_row", "fail"),
        ["d.json: row 1: bad row (too_deep)"],
        write("d.json", "[" + json.dumps(ROW) + ', {"x": ' + "[" * 100000 + "]" * 100000 + "}]"),
    ),
    Case(
        "converter-sys-exit-0",
        prep("--converter", "hostile_conv:f"),
        ["good.jsonl: line 1: the converter hostile_conv:f called sys.exit (SystemExit: 0)"],
        converter_module("import sys\n\ndef f(row):\n    sys.exit(0)\n"),
    ),
    Case(
        "converter-keyboard-interrupt",
        prep("--converter", "hostile_conv:f"),
        ["good.jsonl: line 1: the converter hostile_conv:f raised KeyboardInterrupt"],
        converter_module("def f(row):\n    raise KeyboardInterrupt\n"),
    ),
    Case(
        "converter-base-exception",
        prep("--converter", "hostile_conv:f"),
        ["good.jsonl: line 1: the converter hostile_conv:f raised Stop: mine"],
        converter_module("class Stop(BaseException):\n    pass\n\ndef f(row):\n    raise Stop('mine')\n"),
    ),
    Case(
        "converter-import-keyboard-interrupt",
        prep("--converter", "hostile_conv:f"),
        ["converter hostile_conv:f: importing module 'hostile_conv' failed (KeyboardInterrupt"],
        converter_module("raise KeyboardInterrupt\n"),
    ),
    Case(
        "dataset-symlink-loop",
        data("loop.jsonl"),
        ["dataset: '", "loop.jsonl' is a symbolic link loop"],
        lambda t: (
            (t / "loop.jsonl").symlink_to(t / "back.jsonl"),
            (t / "back.jsonl").symlink_to(t / "loop.jsonl"),
        ),
    ),
    Case(
        "dataset-dangling-symlink",
        data("link.jsonl"),
        ["link.jsonl' is a symbolic link to", "gone.jsonl, which does not exist"],
        lambda t: (t / "link.jsonl").symlink_to(t / "gone.jsonl"),
    ),
    Case(
        "dataset-fifo",
        data("pipe.jsonl"),
        ["pipe.jsonl' is a pipe", "not a regular file", "Save it to a file first"],
        lambda t: os.mkfifo(t / "pipe.jsonl"),
    ),
    Case(
        "evaluate-export-without-tokenizer",
        [
            "evaluate",
            "--hf_model_id",
            "{model}",
            "--dataset",
            "{tmp}/good.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--results_dir",
            "{tmp}/out/r",
            "--export_dir",
            "{tmp}/prev",
            "--eval_backend",
            "transformers",
        ],
        ["export_dir:", "prev holds no tokenizer (tokenizer.json and tokenizer_config.json missing)"],
        both(
            GOOD, lambda t: [(t / "prev" / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")]
        ),
        needs=("model", "export"),
    ),
    Case(
        "chat-export-without-tokenizer",
        [
            "chat",
            "--hf_model_id",
            "{model}",
            "--model_dir",
            "{tmp}/prev",
            "--prompt",
            "hi",
            "--eval_backend",
            "transformers",
        ],
        ["model_dir:", "prev holds no tokenizer (tokenizer.json and tokenizer_config.json missing)"],
        lambda t: [(t / "prev" / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
        needs=("model", "export"),
    ),
    Case(
        "chat-prompt-not-utf8",
        [
            "chat",
            "--hf_model_id",
            "{model}",
            "--model_dir",
            "{tmp}/prev",
            "--prompt",
            "caf\udce9",
            "--eval_backend",
            "transformers",
        ],
        ["prompt is not UTF-8 text (an invalid byte at character 4)"],
        needs=("model", "export"),
    ),
]


def model_config_without(*keys: str) -> Callable[[Path], None]:
    """A folder ``badmodel`` holding the tiny Llama's config.json less ``keys``."""

    def make(tmp: Path) -> None:
        config = json.loads((Path(os.environ["FTPIPE_TEST_TINY"]) / "config.json").read_text())
        (tmp / "badmodel").mkdir()
        (tmp / "badmodel" / "config.json").write_text(
            json.dumps({k: v for k, v in config.items() if k not in keys})
        )

    return make


#: configuration values, YAML forms, seeds, estimate, export files, SageMaker dry run
CONFIG_TOOL_CASES: list[Case] = [
    Case(
        "split-seed-negative", prep("--split_seed", "-1"), ["split_seed: -1 is outside 0..4294967295"], GOOD
    ),
    Case("seed-negative", prep("--seed", "-5"), ["seed: -5 is outside 0..4294967295"], GOOD),
    Case(
        "seed-beyond-32-bits",
        prep("--seed", "4294967296"),
        ["seed: 4294967296 is outside 0..4294967295"],
        GOOD,
    ),
    Case(
        "eval-seed-yaml-negative",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["eval_seed: -1 is outside 0..4294967295"],
        both(GOOD, yaml("eval_seed: -1\n")),
    ),
    Case(
        "yaml-empty",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["bad.yaml is empty", "leave out --config"],
        both(GOOD, yaml("")),
    ),
    Case(
        "yaml-only-comments",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["bad.yaml is empty (or holds only comments)"],
        both(GOOD, yaml("# max_steps: 5\n")),
    ),
    Case(
        "yaml-merge-key-then-duplicate",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["'name' is given twice (lines 4 and 5)"],
        both(GOOD, yaml("datasets:\n  - &b {dataset: good.jsonl}\n  - <<: *b\n    name: x\n    name: y\n")),
    ),
    Case(
        "yaml-text-for-float",
        [*PREP, "--config", "{tmp}/bad.yaml"],
        ["learning_rate: expected a number, got text ('1e-4x')"],
        both(GOOD, yaml("learning_rate: 1e-4x\n")),
    ),
    Case(
        "max-seq-length-1",
        prep("--max_seq_length", "1"),
        ["max_seq_length: 1 is too small (must be >= 3"],
        GOOD,
    ),
    Case(
        "estimate-no-hidden-size",
        ["estimate", "--hf_model_id", "{tmp}/badmodel"],
        [
            "badmodel/config.json does not give hidden_size (model type llama)",
            "add the key(s) to config.json",
        ],
        model_config_without("hidden_size"),
        needs=("model",),
    ),
    Case(
        "sm-region-malformed",
        launch("--region", "mars-west-1"),
        ["region: 'mars-west-1' is not an AWS region name"],
    ),
    Case(
        "sm-region-unknown",
        launch("--region", "xx-west-9"),
        ["region: the SageMaker SDK", "no PyTorch training image in 'xx-west-9'"],
    ),
    Case(
        "sm-user-arn-as-role",
        launch("--role", "arn:aws:iam::123456789012:user/bob"),
        ["role: 'arn:aws:iam::123456789012:user/bob' is not an IAM role ARN"],
    ),
    Case(
        "sm-job-name-80-chars",
        launch("--base_job_name", "my job/" * 11 + "abc"),
        ["base_job_name: 'my job/", "has 80 characters; allowed: 1-48 letters, digits and dashes"],
    ),
    Case(
        "sm-job-name-slash",
        launch("--base_job_name", "my job/x"),
        ["base_job_name: 'my job/x' makes the job name 'my job/x-", "which SageMaker refuses"],
    ),
    Case(
        "sm-s3-no-bucket",
        launch("--training_data_s3_uri", "s3://"),
        ["training_data_s3_uri: 's3://' names no bucket"],
    ),
    Case(
        "sm-s3-bad-bucket",
        launch("--output_s3_uri", "s3://My_Bucket/out"),
        ["output_s3_uri: 's3://My_Bucket/out': 'My_Bucket' is not an S3 bucket name"],
    ),
]

PAIR = {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."}
PAIRS = jsonl("pairs.jsonl", [{**PAIR, "chosen": f"Hi {i}!"} for i in range(12)])


def dpo(*extra: str) -> list[str]:
    return [
        "prepare",
        "--dataset",
        "{tmp}/pairs.jsonl",
        "--data_dir",
        "{tmp}/out",
        "--objective",
        "dpo",
        *extra,
    ]


PREFERENCE_CASES: list[Case] = [
    Case(
        "dpo-on-sft-rows",
        prep("--objective", "dpo"),
        ["objective is 'dpo', but it has no 'chosen' or 'rejected' column", "set objective: sft"],
        GOOD,
    ),
    Case(
        "sft-on-pairs",
        ["prepare", "--dataset", "{tmp}/pairs.jsonl", "--data_dir", "{tmp}/out"],
        ["its rows hold 'chosen' and 'rejected' (preference pairs)", "Set objective: dpo"],
        PAIRS,
    ),
    Case("dpo-beta-zero", dpo("--dpo_beta", "0"), ["dpo_beta: 0"], PAIRS),
    Case(
        "dpo-setting-without-dpo",
        prep("--dpo_beta", "0.5"),
        ["dpo_beta: preference settings, but objective is 'sft'"],
        GOOD,
    ),
    Case(
        "dpo-smoothing-ipo",
        dpo("--dpo_loss", "ipo", "--dpo_label_smoothing", "0.1"),
        ["dpo_label_smoothing: applies to dpo_loss 'sigmoid' and 'simpo', not 'ipo'"],
        PAIRS,
    ),
    Case(
        "dpo-smoothing-half",
        dpo("--dpo_label_smoothing", "0.5"),
        ["dpo_label_smoothing: 0.5 is outside [0, 0.5)"],
        PAIRS,
    ),
    Case(
        "dpo-adapter-reference-full",
        dpo("--reference", "adapter", "--finetuning", "full"),
        ["reference: 'adapter' disables the LoRA adapter, but finetuning is 'full'"],
        PAIRS,
    ),
    Case(
        "dpo-copy-reference-fsdp1",
        dpo("--reference", "copy", "--strategy", "fsdp1"),
        ["reference: 'copy' is not available with strategy fsdp1"],
        PAIRS,
    ),
    Case("dpo-packing", dpo("--packing", "true"), ["packing: preference pairs are not packed"], PAIRS),
    Case(
        "monitor-reward-accuracy-sft",
        prep("--monitor", "val_reward_accuracy"),
        ["monitor: 'val_reward_accuracy' needs a preference objective"],
        GOOD,
    ),
    Case(
        "dpo-sft-config-and-init-adapter",
        dpo("--sft_config", "{tmp}/sft.yaml", "--init_adapter", "{tmp}/a.ckpt"),
        ["sft_config / init_adapter: give one"],
        PAIRS,
    ),
    Case(
        "dpo-all-pairs-identical",
        dpo(),
        ["identical_pair"],
        jsonl("pairs.jsonl", [{**PAIR, "rejected": PAIR["chosen"]}] * 4),
    ),
    Case(
        "dpo-init-adapter-missing",
        [
            *TRAIN[:4],
            "{tmp}/pairs.jsonl",
            *TRAIN[5:],
            "--objective",
            "dpo",
            "--init_adapter",
            "{tmp}/nope.ckpt",
        ],
        ["init_adapter: ", "nope.ckpt does not exist"],
        PAIRS,
        needs=("model",),
    ),
    Case(
        "dpo-sft-config-missing",
        [
            "run",
            "--hf_model_id",
            "{model}",
            "--dataset",
            "{tmp}/pairs.jsonl",
            "--data_dir",
            "{tmp}/out",
            "--results_dir",
            "{tmp}/out/r",
            "--objective",
            "dpo",
            "--sft_config",
            "{tmp}/nope.yaml",
        ],
        ["sft_config: ", "nope.yaml is not a file"],
        PAIRS,
        needs=("model",),
    ),
]

CASES = (
    CONFIG_CASES
    + DATA_CASES
    + EXPORT_CASES
    + ESTIMATE_CASES
    + SAGEMAKER_CASES
    + RUN_CASES
    + RUNS_MEET_CASES
    + PREPARED_DATA_CASES
    + USER_INPUT_CASES
    + CONFIG_TOOL_CASES
    + PREFERENCE_CASES
)


def test_the_suite_is_large_and_its_ids_unique():
    assert len(CASES) >= 160
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------------
# running a case


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, tiny_llama) -> Path:
    """A LoRA checkpoint (rank 4) of the tiny Llama, as ``ftpipe train`` writes one."""
    from transformers import AutoModelForCausalLM

    from ftpipe.config import PipelineConfig
    from ftpipe.model.lora import apply_lora

    cfg = PipelineConfig.from_flat(
        {"hf_model_id": str(tiny_llama), "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    )
    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), cfg, announce=False
    )
    gen = torch.Generator().manual_seed(3)
    state = {
        "model." + n: torch.randn(p.shape, generator=gen) * 0.1
        for n, p in model.named_parameters()
        if "lora_" in n
    }
    path = tmp_path_factory.mktemp("ckpt") / "step=2-val_loss=1.0.ckpt"
    meta = {"config": cfg.to_flat(), "finetuning": "lora", "state_dict_prefix": "model."}
    torch.save({"state_dict": state, "global_step": 2, "epoch": 0, "ftpipe": meta}, path)
    return path


@pytest.fixture(scope="module")
def mismatched_checkpoint(tmp_path_factory, lora_checkpoint) -> Path:
    """The LoRA checkpoint with one adapter of the wrong shape: keys that do not fit the model."""
    ckpt = torch.load(lora_checkpoint, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if "lora_A" in k)
    ckpt["state_dict"][key] = torch.zeros(3, 64)
    path = tmp_path_factory.mktemp("badckpt") / "step=2-val_loss=1.0.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def previous_export(tmp_path_factory, tiny_llama, lora_checkpoint) -> Path:
    """A merged export of the checkpoint: the user's earlier work that no failure may touch."""
    from ftpipe.config import PipelineConfig
    from ftpipe.export.export import export_model

    folder = tmp_path_factory.mktemp("export") / "merged"
    cfg = PipelineConfig.from_flat(
        {
            "hf_model_id": str(tiny_llama),
            "lora_rank": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "checkpoint": str(lora_checkpoint),
            "export_dir": str(folder),
            "export_dtype": "float32",
        }
    )
    export_model(cfg)
    return folder


def snapshot(root: Path) -> dict[str, str]:
    """Path -> content hash of every file under ``root`` except the command's own ``out/`` and its own log
    (``logs/ftpipe-<command>-<time>.log`` in a results folder)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == "out" or not path.is_file():
            continue
        if rel.parent.name == "logs" and rel.name.startswith("ftpipe-") and rel.suffix == ".log":
            continue
        found[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@contextlib.contextmanager
def captured_log():
    """The ftpipe root handler writing to a buffer (what the terminal would show)."""
    from ftpipe.utils.logging import setup_logging

    setup_logging()
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_ftpipe", False))
    buffer = io.StringIO()
    # swapped without setStream's flush: an earlier test may have left it on a capture stream now closed
    previous, handler.stream = handler.stream, buffer
    try:
        yield buffer
    finally:
        handler.stream = previous


def run_case(case: Case, tmp: Path, paths: dict[str, str]) -> tuple[int | None, str]:
    from ftpipe.cli.main import main

    values = {"tmp": str(tmp), **paths}
    argv = []
    for arg in case.argv:
        for name, value in values.items():
            arg = arg.replace(f"{{{name}}}", value)
        argv.append(arg)
    out, err = io.StringIO(), io.StringIO()
    with captured_log() as log, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code: int | None = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, log.getvalue() + err.getvalue() + out.getvalue()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path, request, monkeypatch, tiny_llama):
    monkeypatch.setenv("FTPIPE_TEST_TINY", str(tiny_llama))
    monkeypatch.syspath_prepend(str(tmp_path / "convmods"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "out" / "hf_cache"))
    sys.modules.pop("hostile_conv", None)
    paths = {"model": str(tiny_llama)}
    if "model" in case.needs:
        paths["ckpt"] = str(request.getfixturevalue("lora_checkpoint"))
    if "badckpt" in case.needs:
        paths["badckpt"] = str(request.getfixturevalue("mismatched_checkpoint"))
    if "export" in case.needs:
        shutil.copytree(request.getfixturevalue("previous_export"), tmp_path / "prev")
    if case.setup is not None:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    code, output = run_case(case, tmp_path, paths)
    assert code == 2, f"exit {code}; output:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output[-3000:]  # one message (its problems may follow on their own lines)
    for expected in case.expect:
        assert expected in output, f"{expected!r} not in:\n{output[-3000:]}"
    assert snapshot(tmp_path) == before  # nothing outside the command's own output changed
    assert not list((tmp_path / "out").rglob(".data_ready")) or case.id.startswith("evaluate")


# --------------------------------------------------------------------------------------------------
# what reaches a real terminal


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["prepare", "--dataset", "nope.jsonl", "--learning_rate", "nan"],
            "learning_rate: 'nan' is not allowed",
        ),
        (
            ["sagemaker", "launch", "--dry_run", "--instance_type", "ml.p4d; rm -rf /"],
            "is not a SageMaker instance type",
        ),
        (
            ["estimate", "--hf_model_id", "{model}", "--lora_target_modules", "[q_projj]"],
            "lora_target_modules: ['q_projj'] not found",
        ),
    ],
    ids=["config", "sagemaker", "estimate"],
)
def test_console_shows_one_message_and_exits_2(argv, expected, tiny_llama, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ftpipe", *(a.format(model=tiny_llama) for a in argv)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and expected in output
    assert sum(" ERROR " in line for line in output.splitlines()) == 1


@pytest.mark.timeout(60)
def test_a_bug_is_one_line_pointing_at_the_traceback_file(monkeypatch, tmp_path):
    """Anything that escapes as an unexpected exception: exit status 1, one line, the traceback in a file."""
    from ftpipe.cli import main as cli

    def broken(cfg):
        raise KeyError("internal")

    monkeypatch.setitem(cli.COMMANDS, "prepare", ("json:loads", "x"))
    monkeypatch.setattr(cli, "resolve_entry", lambda command: broken)
    with captured_log() as log, pytest.raises(SystemExit) as info:
        cli.main(["prepare", "--dataset", str(tmp_path / "x.jsonl")])
    assert info.value.code == 1
    text = log.getvalue()
    assert "ftpipe failed unexpectedly (KeyError: 'internal'). This is a bug in ftpipe" in text
    crash = Path(text.split("the traceback is in ")[1].split(" ")[0])
    assert "Traceback" in crash.read_text() and "KeyError: 'internal'" in crash.read_text()
    assert "Traceback" not in text
    crash.unlink()


@pytest.mark.timeout(60)
def test_a_file_system_error_on_a_configured_folder_names_the_field(monkeypatch, tmp_path):
    """An OSError on a configured folder that no up-front check caught: one message naming the field."""
    from ftpipe.cli import main as cli

    target = tmp_path / "data"

    def denied(cfg):
        raise PermissionError(13, "Permission denied", str(target / "x" / "training.jsonl"))

    monkeypatch.setattr(cli, "resolve_entry", lambda command: denied)
    with captured_log() as log, pytest.raises(SystemExit) as info:
        cli.main(["prepare", "--dataset", str(tmp_path / "x.jsonl"), "--data_dir", str(target)])
    assert info.value.code == 2
    assert f"data_dir: {target} cannot be used: it is not writable (permission denied)" in log.getvalue()


@pytest.mark.timeout(60)
def test_a_data_dir_the_system_refuses_is_one_message(tmp_path):
    """/sys refuses new folders even to root: the mkdir's error is mapped to data_dir."""
    probe = Path("/sys/ftpipe-probe")
    try:
        probe.mkdir()
    except OSError:
        pass
    else:  # pragma: no cover - a system where /sys is writable
        probe.rmdir()
        pytest.skip("/sys is writable here")
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD_ROWS))
    case = Case("sys", ["prepare", "--dataset", "{tmp}/good.jsonl", "--data_dir", "/sys/ftpipe-data"], [])
    code, output = run_case(case, tmp_path, {})
    assert code == 2 and "Traceback" not in output
    assert "data_dir: /sys/ftpipe-data" in output
