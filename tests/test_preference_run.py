"""Proof that preferences are learned, and the SFT-then-DPO path, through ``ftpipe run``.

1. ``configs/dpo.yaml`` on the project's seeded pairs (``examples/preference``): the embedded
   SmolLM2-135M-Instruct, whose answers rarely open with "In short:", is tuned by DPO to do so on the
   held-out test prompts; the run's own evaluation reports the preference accuracy rising, the model card
   says how it was trained. (Shortened here; the full recipe's figures are in README.md.)
2. ``sft_config``: one ``ftpipe run`` trains an SFT stage, then DPO continues its adapter with the SFT
   model as the (cached) reference; running it again reuses the completed SFT stage. Each stage prepares
   its data once (train, export and evaluate take the run's preparation, they do not prepare again).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from ftpipe.config import load_config, results_root

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "dpo.yaml"


def _preparations(log: str) -> list[str]:
    """The lines of ``prepare_data`` in a run's log (one per call on rank 0)."""
    return [line for line in log.splitlines() if "Prepared data (" in line]


def _property():
    spec = importlib.util.spec_from_file_location(
        "preference_property", REPO_ROOT / "examples/preference/property.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(1200)
def test_dpo_recipe_teaches_the_preferred_property(tmp_path, run_ftpipe):
    overrides = {
        "data_dir": str(tmp_path / "data"),
        "results_dir": str(tmp_path / "results"),
        "max_eval_samples": "16",
    }
    args = ["--config", str(CONFIG)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    run_ftpipe("run", args, tmp_path / "run.log", timeout=1140)

    cfg = load_config(CONFIG, **overrides)
    root = results_root(cfg)
    report = json.loads((root / "eval" / "eval_report.json").read_text())
    assert report["objective"] == "dpo" and report["num_samples"] == 16
    prop = _property()
    base = prop.property_rate(s["base"]["prediction"] for s in report["samples"])
    tuned = prop.property_rate(s["finetuned"]["prediction"] for s in report["samples"])
    assert base <= 0.2, f"the base model already shows the property in {base:.0%} of the test prompts"
    assert tuned >= 0.6, f"only {tuned:.0%} of the tuned answers open with 'In short:'"
    agg = report["aggregates"]
    assert agg["finetuned"]["preference_accuracy"] > agg["base"]["preference_accuracy"]
    assert agg["finetuned"]["reward_accuracy"] >= 0.8
    steps = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    vals = [s for s in steps if "val_reward_accuracy" in s]
    assert vals and vals[-1]["val_reward_accuracy"] >= 0.8
    assert "rewards/margins" in steps[0]
    card = (root / "export" / "merged" / "README.md").read_text()
    assert (
        "preference tuning (dpo, loss sigmoid" in card
        and "| preference accuracy (chosen ranked above rejected) |" in card
    )
    assert (root / "eval" / "val_reward_accuracy.png").is_file()


@pytest.mark.timeout(900)
def test_sft_then_dpo_in_one_run_reuses_a_completed_sft_stage(tmp_path, tiny_llama, run_ftpipe):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": f"Question {i}: what is {i} plus {i}?",
            "chosen": f"In short: {2 * i}.",
            "rejected": f"It is {2 * i}.",
        }
        for i in range(12)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft_rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"} for i in range(12)]
    (tmp_path / "sft.json").write_text(json.dumps(sft_rows))
    common = {
        "hf_model_id": str(tiny_llama),
        "precision": "32-true",
        "data_dir": str(tmp_path / "data"),
        "gpus_per_node": 1,
        "strategy": "single",
        "max_seq_length": 64,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "micro_batch_size": 2,
        "max_steps": 2,
        "warmup_steps": 0,
        "val_check_interval": 2,
        "limit_val_batches": 1,
        "early_stopping_patience": 0,
        "num_workers": 0,
        "activation_checkpointing": False,
        "train_ratio": 0.5,
        "val_ratio": 0.25,
        "test_ratio": 0.25,
    }
    sft = {
        **common,
        "dataset": str(tmp_path / "sft.json"),
        "dataset_subset": None,
        "results_dir": str(tmp_path / "sft"),
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    dpo = {
        **common,
        "objective": "dpo",
        "sft_config": str(tmp_path / "sft.yaml"),
        "dataset": str(pairs),
        "dataset_subset": None,
        "results_dir": str(tmp_path / "dpo"),
        "use_chat_template": True,
        "eval_backend": "transformers",
        "max_new_tokens": 4,
        "max_eval_samples": 2,
    }
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    run_ftpipe("run", ["--config", str(tmp_path / "dpo.yaml")], tmp_path / "run1.log", timeout=420)
    log = (tmp_path / "run1.log").read_text()
    # one preparation per stage, counted by prepare_data's line: the SFT data, then the pairs
    assert len(_preparations(log)) == 2, _preparations(log)
    assert "sft_config: training the SFT stage first" in log
    assert "init_adapter: continuing the LoRA adapter of" in log
    assert "reference: cached" in log and "computed and cached" in log
    cfg = load_config(tmp_path / "dpo.yaml")
    steps = [json.loads(x) for x in (results_root(cfg) / "metrics.jsonl").read_text().splitlines()]
    # the SFT model is both the starting policy and the reference: step 1 is exactly ln 2
    assert steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    saved = yaml.safe_load((results_root(cfg) / "config.yaml").read_text())
    assert saved["init_adapter"].endswith(".ckpt") and saved.get("sft_config") is None

    run_ftpipe("run", ["--config", str(tmp_path / "dpo.yaml")], tmp_path / "run2.log", timeout=420)
    again = (tmp_path / "run2.log").read_text()
    prepared = _preparations(again)  # the SFT stage is reused, not prepared: the pairs alone, as they were
    assert len(prepared) == 1 and "Prepared data (reused)" in prepared[0], prepared
    assert "sft_config: reusing the completed SFT run's best checkpoint" in again
    assert "training the SFT stage first" not in again
