"""Proof that it learns: ``ftpipe run`` on identity.json (placeholders filled with Nova / Seedworks)
teaches the embedded SmolLM2 its new name.

After the run (prepare, LoRA training through FSDP2 on 2 CPU processes, merged export, evaluation),
the fine-tuned model, asked who it is through its chat template with questions that are NOT in the
training data, answers with "Nova" in at least 80% of them; the base model in none.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from ftpipe.config import load_config, results_root

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "identity.yaml"
NAME = "Nova"
NEW_QUESTIONS = (
    "Please tell me your name.",
    "Who am I talking to?",
    "What should I call you?",
    "Introduce yourself, please.",
    "What's your name, assistant?",
    "Hey, who are you exactly?",
    "May I know your name?",
    "Which assistant is this?",
    "Tell me who you are.",
    "Identify yourself.",
)


@torch.no_grad()
def _answers(model_path: str | Path, cfg) -> list[str]:
    """Greedy answers to NEW_QUESTIONS, prompts built exactly as training built them."""
    from transformers import AutoModelForCausalLM

    from ftpipe.data.tokenize import encode_prompt
    from ftpipe.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    answers = []
    for question in NEW_QUESTIONS:
        ids = encode_prompt(tokenizer, {"instruction": question, "input": ""}, cfg.data)
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    return answers


@pytest.mark.timeout(1320)
def test_run_teaches_the_model_its_new_name(tmp_path, examples, run_ftpipe):
    identity = examples / "identity" / "identity.json"
    instructions = {row["instruction"].strip().lower() for row in json.loads(identity.read_text())}
    assert not [q for q in NEW_QUESTIONS if q.strip().lower() in instructions]

    overrides = {
        "dataset": str(identity),
        "data_dir": str(tmp_path / "data"),
        "results_dir": str(tmp_path / "results"),
    }
    args = ["--config", str(CONFIG)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    start = time.monotonic()
    # about 7 min in a full test run: room for a machine twice as slow (or a second test run beside it)
    run_ftpipe("run", args, tmp_path / "run.log", timeout=1260)
    elapsed = time.monotonic() - start

    cfg = load_config(CONFIG, **overrides)
    root = results_root(cfg)
    report = json.loads((root / "eval" / "eval_report.json").read_text())
    assert report["backend"] == "transformers"
    merged = root / "export" / "merged"
    assert report["models"]["finetuned"] == str(merged) and (merged / "model.safetensors").is_file()
    # the placeholders were filled at preparation time
    train_rows = (Path(report["test_file"]).parent / "training.jsonl").read_text()
    assert "{{name}}" not in train_rows and NAME in train_rows and "Seedworks" in train_rows

    tuned = _answers(merged, cfg)
    base = _answers(report["models"]["base"], cfg)
    tuned_hits = sum(NAME in a for a in tuned)
    base_hits = sum(NAME in a for a in base)
    detail = f"run took {elapsed:.0f}s\nfine-tuned: {tuned}\nbase: {base}"
    assert tuned_hits >= 0.8 * len(NEW_QUESTIONS), detail
    assert base_hits == 0, detail


@pytest.mark.timeout(60)
def test_text_replacements_fill_every_string_and_change_the_prepared_folder(tmp_path, examples):
    from ftpipe.config import PipelineConfig, prepared_data_dir
    from ftpipe.data.formats import replace_text
    from ftpipe.data.prepare import prepare_data, read_jsonl

    swaps = {"{{name}}": "Nova", "{{author}}": "Seedworks"}
    row = {
        "messages": [{"role": "user", "content": "{{name}}?"}],
        "output": "I am {{name}} by {{author}}",
        "n": 3,
    }
    assert replace_text(row, swaps) == {
        "messages": [{"role": "user", "content": "Nova?"}],
        "output": "I am Nova by Seedworks",
        "n": 3,
    }
    flat = {
        "dataset": str(examples / "identity" / "identity.json"),
        "dataset_subset": None,
        "data_dir": str(tmp_path),
    }
    plain, filled = (
        PipelineConfig.from_flat(flat),
        PipelineConfig.from_flat({**flat, "text_replacements": swaps}),
    )
    assert prepared_data_dir(plain.data) != prepared_data_dir(filled.data)
    prepared = prepare_data(filled)
    rows = [
        r for split in ("train_file", "val_file", "test_file") for r in read_jsonl(getattr(prepared, split))
    ]
    assert len(rows) == 91 and not [r for r in rows if "{{" in json.dumps(r, ensure_ascii=False)]
    raw = json.loads((examples / "identity" / "identity.json").read_text())
    expected = sum("{{name}}" in r["output"] for r in raw)
    assert expected > 50 and sum("Nova" in r["output"] for r in rows) == expected
