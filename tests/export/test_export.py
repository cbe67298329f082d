"""``ftpipe export``: merged LoRA, adapter folder and full fine-tune, checked by their logits.

Tolerance: fp32 throughout; the merged model's logits equal the PEFT model's within atol 1e-4 (the
merge reorders a sum: W x + B A x vs (W + B A) x), the adapter re-applied and the full fine-tune
within atol 1e-5. Each test also checks the fine-tuned logits differ from the base model's by far
more than the tolerance, so a no-op export fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftpipe.config import PipelineConfig, checkpoints_dir
from ftpipe.config.runs import RunManifest
from ftpipe.export.export import base_model_name, export_model
from ftpipe.model.checkpoint import hf_name, read_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
MERGE_ATOL = 1e-4
EXACT_ATOL = 1e-5
#: weight-file suffixes of pickled formats, which an export must never contain
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INPUT_IDS = torch.tensor([[1, 504, 3456, 88, 12, 9001, 77, 2], [1, 42, 4242, 17, 600, 31, 5, 900]])


def _cfg(tmp_path: Path, model: Path, **overrides) -> PipelineConfig:
    return PipelineConfig.from_flat(
        {
            "hf_model_id": str(model),
            "results_dir": str(tmp_path / "results"),
            "data_dir": str(tmp_path / "data"),
            "lora_rank": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "export_dtype": "float32",
            "precision": "32-true",
            **overrides,
        }
    )


def _base(model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=INPUT_IDS).logits.float()


def _write_ckpt(path: Path, state: dict[str, torch.Tensor], cfg: PipelineConfig, step: int) -> None:
    """A checkpoint in the layout ``ftpipe train`` writes for one device / DDP (module keys under
    ``state_dict`` with the LightningModule's ``model.`` prefix, ftpipe's metadata under ``ftpipe``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": cfg.to_flat(), "finetuning": cfg.model.finetuning, "state_dict_prefix": "model."}
    torch.save({"state_dict": state, "global_step": step, "epoch": 0, "ftpipe": meta}, path)


def _write_manifest(folder: Path, cfg: PipelineConfig, *, best=None, last=None, run_id=None) -> RunManifest:
    """The run manifest ``ftpipe train`` writes beside its checkpoints: ``best`` (name, step, val_loss) and
    ``last`` (name, step)."""
    manifest = RunManifest.create(folder, cfg, run_id or "20260101-000000-000001")
    if best:
        manifest.record_checkpoint(folder / best[0], best[1], best[2])
        manifest.best, manifest.best_val_loss = best[0], best[2]
    if last:
        manifest.record_checkpoint(folder / last[0], last[1], None)
        manifest.last = last[0]
    manifest.status = "completed"
    manifest.save()
    return manifest


@pytest.fixture
def lora_run(tmp_path, tiny_model):
    """A LoRA 'run' with a best checkpoint (random non-zero adapters) and a last one (other adapters);
    returns (cfg, reference logits of the best checkpoint's PEFT model, base logits)."""
    from ftpipe.model.lora import apply_lora

    cfg = _cfg(tmp_path, tiny_model)
    base = _base(tiny_model)
    base_logits = _logits(base)
    peft_model = apply_lora(base, cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    lora_state = {"model." + n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    run = checkpoints_dir(cfg) / "version_0"
    _write_ckpt(run / "step=4-val_loss=1.2345.ckpt", lora_state, cfg, 4)
    _write_ckpt(run / "last.ckpt", {k: torch.zeros_like(v) for k, v in lora_state.items()}, cfg, 6)
    _write_manifest(run, cfg, best=("step=4-val_loss=1.2345.ckpt", 4, 1.2345), last=("last.ckpt", 6))
    return cfg, _logits(peft_model), base_logits


@pytest.mark.timeout(120)
def test_merged_lora_logits_equal_the_peft_model(lora_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg, reference, base_logits = lora_run
    result = export_model(cfg)
    out = Path(result.path)
    assert result.kind == "merged" and out.name == "merged"
    assert Path(result.checkpoint).name == "step=4-val_loss=1.2345.ckpt"  # "best" = lowest val_loss
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "config.yaml",
    } <= names
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]  # safetensors only
    tokenizer_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_cfg or (out / "chat_template.jinja").is_file()
    assert not [k for k in load_file(out / "model.safetensors") if "lora" in k]
    assert result.size_bytes == sum(p.stat().st_size for p in out.iterdir())

    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    logits = _logits(merged)
    assert (reference - base_logits).abs().max() > 100 * MERGE_ATOL  # the adapters matter
    torch.testing.assert_close(logits, reference, atol=MERGE_ATOL, rtol=0)


@pytest.mark.timeout(120)
def test_adapter_folder_reapplied_to_the_base_gives_the_same_logits(lora_run, tiny_model):
    from peft import PeftModel

    cfg, reference, _ = lora_run
    result = export_model(cfg.replace(merge=False))
    out = Path(result.path)
    assert result.kind == "adapter" and out.name == "adapter"
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_model)
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert not [p.name for p in out.iterdir() if p.suffix in PICKLE_SUFFIXES]  # safetensors only
    info = json.loads((out / "ftpipe_export.json").read_text())
    assert Path(info["base_model_local_path"]) == tiny_model.resolve()

    model = PeftModel.from_pretrained(_base(Path(info["base_model_local_path"])), out).eval()
    torch.testing.assert_close(_logits(model), reference, atol=EXACT_ATOL, rtol=0)


def test_embedded_adapter_names_the_hub_model():
    cfg = PipelineConfig.from_flat({"hf_model_id": "embedded"})
    assert base_model_name(cfg) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_keys_lose_lightning_and_peft_prefixes_and_the_adapter_name():
    key = "model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert hf_name(key) == "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert hf_name("model.lm_head.weight") == "lm_head.weight"


@pytest.mark.timeout(120)
def test_full_finetune_round_trips(tmp_path, tiny_model):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_model, finetuning="full")
    model = _base(tiny_model)
    base_logits = _logits(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    state = {"model." + k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = tmp_path / "full.ckpt"
    _write_ckpt(ckpt, state, cfg, 3)
    result = export_model(
        cfg.replace(checkpoint=str(ckpt), merge=False)
    )  # merge is moot for a full fine-tune
    assert result.kind == "full"
    exported = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    saved = load_file(Path(result.path) / "model.safetensors")
    assert not [p.name for p in Path(result.path).iterdir() if p.suffix in PICKLE_SUFFIXES]
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, state["model." + name], atol=0, rtol=0)
    reference = _logits(model)
    assert (reference - base_logits).abs().max() > 100 * EXACT_ATOL
    torch.testing.assert_close(_logits(exported), reference, atol=EXACT_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------
# a real distributed checkpoint written by `ftpipe train` (FSDP2, 2 processes)


@pytest.mark.timeout(400)
def test_export_of_a_real_fsdp2_distributed_checkpoint(tmp_path, tiny_model, alpaca_demo, run_ftpipe):
    from transformers import AutoModelForCausalLM

    from ftpipe.model.lora import apply_lora

    cfg = _cfg(tmp_path, tiny_model, dataset=str(alpaca_demo))
    flat = {
        "hf_model_id": tiny_model,
        "dataset": alpaca_demo,
        "data_dir": tmp_path / "data",
        "results_dir": tmp_path / "results",
        "strategy": "fsdp2",
        "gpus_per_node": 2,
        "max_steps": 2,
        "max_seq_length": 64,
        "max_samples": 40,
        "micro_batch_size": 2,
        "val_check_interval": 2,
        "limit_val_batches": 1,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "learning_rate": 0.01,
        "warmup_steps": 0,
        "num_workers": 0,
        "peak_tflops_per_device": 1.0,  # the MFU peak given: no matmul benchmark at each start
    }
    args = ["--config", str(REPO_ROOT / "configs" / "benchmark.yaml")]
    for key, value in flat.items():
        args += [f"--{key}", str(value)]
    run_ftpipe("train", args, tmp_path / "train.log", timeout=300, settle_s=1.0)

    result = export_model(cfg)
    ckpt = Path(result.checkpoint)
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file() and list(ckpt.glob("*.distcp"))
    assert "val_loss=" in ckpt.name
    read = read_checkpoint(ckpt)
    assert read.global_step == 2 and read.is_lora and read.meta["finetuning"] == "lora"
    assert any(v.abs().sum() > 0 for k, v in read.weights.items() if "lora_B" in k)  # training moved B

    # Reference: the adapter tensors loaded into a PEFT model by PEFT's own parameter names.
    peft_model = apply_lora(_base(tiny_model), cfg).eval()
    adapters = {n: read.weights[hf_name(n)] for n, _ in peft_model.named_parameters() if ".lora_" in n}
    loaded = peft_model.load_state_dict(adapters, strict=False)
    assert not loaded.unexpected_keys and len(adapters) == len(read.weights) == 28  # 2 layers x 7 x (A, B)
    reference = _logits(peft_model)
    assert (reference - _logits(_base(tiny_model))).abs().max() > 10 * MERGE_ATOL
    merged = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), reference, atol=MERGE_ATOL, rtol=0)


@pytest.mark.timeout(120)
def test_export_replaces_only_a_previous_export(lora_run, tmp_path):
    from ftpipe.export.export import ExportError

    cfg, _, _ = lora_run
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="is not an ftpipe export"):
        export_model(cfg.replace(export_dir=str(foreign)))
    assert (foreign / "notes.txt").read_text() == "keep me"
    first = export_model(cfg.replace(checkpoint="last"))  # zero adapters
    second = export_model(cfg)  # the best checkpoint into the same folder
    assert first.path == second.path and Path(second.checkpoint).name.startswith("step=4")
    info = json.loads((Path(second.path) / "ftpipe_export.json").read_text())
    assert info["checkpoint"] == second.checkpoint and info["kind"] == "merged"


@pytest.mark.timeout(120)
def test_export_keeps_the_training_chat_template_for_serving(lora_run):
    """The exported tokenizer, loaded with plain transformers (as vLLM and the SageMaker handler load it),
    renders a tool conversation token for token as training did."""
    import sys

    from transformers import AutoTokenizer

    from ftpipe.data.chat import normalize_chat_row
    from ftpipe.data.tokenize import encode_example, encode_prompt
    from ftpipe.model import serving_handler as inference
    from ftpipe.model.tokenizer import load_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from chat_samples import OPENAI, SHAREGPT

    cfg, _, _ = lora_run
    cfg = cfg.replace(chat_template="chatml-tools")
    out = Path(export_model(cfg).path)
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text()
    )
    served = AutoTokenizer.from_pretrained(out)
    training = load_tokenizer(cfg.model)
    row = {"id": 0, **normalize_chat_row(SHAREGPT, "sharegpt")}
    ex = encode_example(training, row, cfg.data.__class__(max_seq_length=4096))
    full = served.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert served(full, add_special_tokens=False)["input_ids"][: len(ex.input_ids)] == ex.input_ids
    prompt = encode_prompt(training, row, cfg.data)
    text = served.apply_chat_template(
        row["messages"][:-1], tools=row["tools"], add_generation_prompt=True, tokenize=False
    )
    assert served(text, add_special_tokens=False)["input_ids"] == prompt
    # the SageMaker handler, given the OpenAI request of the same conversation, builds the same prompt
    request = inference.input_fn(
        json.dumps({"messages": OPENAI["messages"][:-1], "tools": OPENAI["tools"]}), "application/json"
    )
    handler_text, templated = inference._render(served, request["prompts"][0], False, request["tools"])
    assert templated and served(handler_text, add_special_tokens=False)["input_ids"] == prompt


def _tree_hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.timeout(120)
def test_a_failing_export_leaves_the_previous_export_whole(lora_run, tmp_path):
    from ftpipe.export.export import ExportError

    cfg, _, _ = lora_run
    out = Path(export_model(cfg).path)
    before = _tree_hashes(out)
    bad = torch.load(next(Path(cfg.train.results_dir).rglob("step=4-*.ckpt")), weights_only=True)
    key = next(k for k in bad["state_dict"] if "lora_A" in k)
    bad["state_dict"][key] = torch.zeros(3, 64)
    path = tmp_path / "mismatched.ckpt"
    torch.save(bad, path)
    with pytest.raises(ExportError, match="has shape"):
        export_model(cfg.replace(checkpoint=str(path)))
    assert _tree_hashes(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".merged.")]  # no staging left


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["staging-created", "weights-written"])
def test_kill_9_during_an_export_leaves_the_previous_export_whole(lora_run, tiny_model, when):
    """``ftpipe export`` killed with SIGKILL at a point of its work: the previous export is untouched; the
    next export removes the leftover and replaces the export."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg, _, _ = lora_run
    out = Path(export_model(cfg).path)
    before = _tree_hashes(out)
    ckpt = next(Path(cfg.train.results_dir).rglob("step=4-*.ckpt"))
    args = [
        sys.executable,
        "-m",
        "ftpipe",
        "export",
        "--hf_model_id",
        str(tiny_model),
        "--results_dir",
        cfg.train.results_dir,
        "--lora_rank",
        "4",
        "--lora_alpha",
        "8",
        "--lora_dropout",
        "0",
        "--export_dtype",
        "float32",
        "--checkpoint",
        str(ckpt),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out.parent / f".merged.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if staging.is_dir() and (when == "staging-created" or (staging / "model.safetensors").is_file()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the export finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staging.exists()  # killed in the middle of its work
    assert _tree_hashes(out) == before  # the previous export is whole
    again = Path(export_model(cfg.replace(checkpoint=str(ckpt))).path)
    assert again == out and (out / "model.safetensors").is_file()
    assert not staging.exists()  # the leftover of the killed run is gone


LORA_VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian-init": {"init_lora_weights": "gaussian"},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "all-linear": {"lora_target_modules": ["all-linear"]},
    "modules-to-save": {"modules_to_save": ["lm_head"]},
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("variant", sorted(LORA_VARIANTS))
def test_every_lora_variant_merges_to_the_logits_of_its_adapter_model(variant, tmp_path, tiny_model):
    """Trained weights of each PEFT variant (random, non-zero), saved as ftpipe saves them (trainable
    tensors only), exported merged: the merged model's logits are the adapter model's. PiSSA and OLoRA move
    part of the base weights into the adapters at initialisation; export rebuilds that residual."""
    from transformers import AutoModelForCausalLM

    from ftpipe.model.lora import apply_lora

    cfg = _cfg(tmp_path, tiny_model, **LORA_VARIANTS[variant])
    base = _base(tiny_model)
    base_logits = _logits(base)
    peft_model = apply_lora(base, cfg).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    reference = _logits(peft_model)
    assert (reference - base_logits).abs().max() > 100 * MERGE_ATOL  # the trained weights matter
    state = {"model." + n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    _write_ckpt(checkpoints_dir(cfg) / "version_0" / "last.ckpt", state, cfg, 3)
    _write_manifest(checkpoints_dir(cfg) / "version_0", cfg, last=("last.ckpt", 3))
    result = export_model(cfg.replace(checkpoint="last"))
    merged = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), reference, atol=MERGE_ATOL, rtol=0)


@pytest.mark.timeout(120)
def test_every_export_has_a_model_card_that_parses_and_takes_the_evaluation(lora_run, tiny_model):
    from huggingface_hub import ModelCard

    from ftpipe.export.card import update_evaluation

    cfg, _, _ = lora_run
    for merge, library in ((True, "transformers"), (False, "peft")):
        out = Path(export_model(cfg.replace(merge=merge)).path)
        card = ModelCard.load(out / "README.md")
        assert card.data.base_model == str(tiny_model) and card.data.library_name == library
        assert {"ftpipe", "lora", "text-generation"} <= set(card.data.tags)
        assert "r=4, alpha=8" in card.text and "Not evaluated yet" in card.text
        assert ("PeftModel.from_pretrained" in card.text) == (not merge)
    aggregates = {
        "base": {"tool_call_exact": 0.0, "bertscore_f1": 0.41, "loss": 0.77},
        "finetuned": {"tool_call_exact": 0.85, "bertscore_f1": 0.99, "loss": 0.02},
    }
    assert update_evaluation(out, aggregates, 40)
    card = ModelCard.load(out / "README.md")
    assert "| exact tool calls | 0% | 85% |" in card.text and "On 40 samples" in card.text
    assert "Not evaluated yet" not in card.text and card.data.library_name == "peft"


def test_the_embedded_models_card_names_its_hub_id_and_license(tmp_path):
    from huggingface_hub import ModelCardData

    from ftpipe.config import PipelineConfig
    from ftpipe.export.card import model_card

    cfg = PipelineConfig.from_flat(
        {"hf_model_id": "embedded", "dataset": "org/chat-data", "chat_template": "chatml-tools"}
    )
    text = model_card(cfg, "merged", "step=40.ckpt", str(tmp_path))
    data = ModelCardData(**__import__("yaml").safe_load(text.split("---")[1]))
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.license == "apache-2.0"
    assert data.datasets == ["org/chat-data"] and "tool-calling" in data.tags
