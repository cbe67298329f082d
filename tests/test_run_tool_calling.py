"""Proof that it learns tool calling: ``ftpipe run --config configs/tool-calling.yaml`` teaches the embedded
SmolLM2 to call functions through ftpipe's ``chatml-tools`` template.

The data (examples/tool_calling/tool_calls.jsonl, ShareGPT with function_call / observation turns and
a tools column, written by a seeded script) is prepared, trained with LoRA over 2 CPU processes (80
steps, packing), exported and evaluated on the 40 held-out requests of the test split: the share of
exact calls (right function, JSON-equal arguments) rises from the base model's (none) to at least 60%.
The exported tokenizer, loaded with plain transformers, renders every test prompt exactly as training
did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ftpipe.config import load_config, results_root

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "tool-calling.yaml"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1500)
def test_run_teaches_tool_calls_and_the_export_renders_as_training(tmp_path, run_ftpipe):
    from transformers import AutoTokenizer

    from ftpipe.data.prepare import read_jsonl

    overrides = {"data_dir": str(tmp_path / "data"), "results_dir": str(tmp_path / "results")}
    args = ["--config", str(CONFIG)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    start = time.monotonic()
    run_ftpipe("run", args, tmp_path / "run.log", timeout=1440)
    elapsed = time.monotonic() - start

    cfg = load_config(CONFIG, **overrides)
    report = json.loads((results_root(cfg) / "eval" / "eval_report.json").read_text())
    base, tuned = report["aggregates"]["base"], report["aggregates"]["finetuned"]
    detail = f"run took {elapsed:.0f}s; base {base}; fine-tuned {tuned}"
    assert report["num_samples"] == report["num_tool_call_samples"] == 40, detail
    assert base["tool_call_exact"] <= 0.1, detail
    assert tuned["tool_call_exact"] >= 0.6, detail
    assert tuned["tool_call_name"] >= 0.9 and tuned["tool_call_parsed"] >= 0.9, detail

    # serving renders as training: the export's own template, through plain transformers
    exported = AutoTokenizer.from_pretrained(report["models"]["finetuned"])
    rows = read_jsonl(report["test_file"])[:40]
    for row, sample in zip(rows, report["samples"], strict=True):
        messages = row["messages"][:-1]  # everything before the call to make
        text = exported.apply_chat_template(
            messages, tools=row["tools"], add_generation_prompt=True, tokenize=False
        )
        assert text == sample["prompt_text"], row["id"]
