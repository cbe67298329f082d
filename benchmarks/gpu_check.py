"""The GPU check: ftpipe on one GPU in one command (about 8 minutes on one H200), with a CPU dry mode.

What it does, in a fresh working folder:

1. builds a tokenizer (byte-level BPE trained on the repository's own alpaca rows, ChatML template) and a
   randomly initialised Llama of about 1B parameters from a config (``--tiny``: 2 layers, hidden 64): no
   download;
2. trains LoRA through ``ftpipe train`` with FSDP2 on one device: bf16 (``precision: auto``), packing,
   the chunked loss, activation checkpointing, ``--steps`` optimizer steps; reads real tokens/s, MFU
   against ``--peak_tflops`` (790 TFLOP/s: the dense bf16 matmul peak measured on the H200) and the peak
   memory (``train_summary.json``);
3. puts ``ftpipe estimate``'s prediction for the same run beside the measured peak;
4. checks that a packed row gives the summed loss of its samples unpacked, within the dtype's
   tolerance (bf16 on the GPU), on the freshly built model;
5. when TRL is importable (and not ``--skip_trl``), trains TRL's SFTTrainer + PEFT on the same rows with
   the same LoRA, length, rows per step and steps (``trl_sft_run.py``);
6. writes a JSON report (``--out``) and prints a summary; exit status 1 when a check fails.

The GPU machine has no network and lacks a few packages ftpipe needs (datasets and its xxhash, dill and
multiprocess, jsonargparse, docstring-parser, torchdata): ``python benchmarks/gpu_check.py
--fetch_wheels`` (here, where the package index is reachable) downloads them for its Python 3.12 into
``benchmarks/gpu_wheels/`` (not tracked by git), and on the GPU machine the check installs them into
its working folder before anything else. ftpipe itself runs from ``src/``; vLLM is never imported.

    python benchmarks/gpu_check.py --fetch_wheels                 # once, here: the wheels to carry
    python benchmarks/gpu_check.py                                # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --steps 3  # the dry mode (tests/benchmarks)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "benchmarks" / "gpu_wheels"
DATA = REPO / "examples" / "alpaca" / "instructions.json"
TRL_RUNNER = REPO / "benchmarks" / "trl_sft_run.py"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_check.json"
#: What the GPU machine lacks among ftpipe's training dependencies: (import name, pinned distribution).
MISSING_THERE = {
    "datasets": "datasets==5.2.0",
    "xxhash": "xxhash==3.6.0",
    "dill": "dill==0.4.0",
    "multiprocess": "multiprocess==0.70.18",
    "jsonargparse": "jsonargparse==4.53.0",
    "docstring_parser": "docstring-parser==0.18.0",
    "torchdata": "torchdata==0.11.0",
}
#: A Llama of about 1B parameters (TinyLlama's shape with this tokenizer's vocabulary), and a tiny one.
MODELS = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GIB = 1024**3


# ------------------------------------------------------------------------------------------------ set-up


def fetch_wheels(folder: Path = WHEELS) -> list[Path]:
    """Download the wheels of ``MISSING_THERE`` for the GPU machine (CPython 3.12, x86_64 Linux)."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64"]
    subprocess.run([*cmd, *MISSING_THERE.values()], check=True)
    return sorted(folder.glob("*.whl"))


def bootstrap(work: Path) -> dict[str, str]:
    """Make ftpipe and its missing dependencies importable here and in the subprocesses: ``src/`` on the
    path, and the carried wheels installed into ``work/site`` when a dependency is missing. Returns the
    environment of the subprocesses."""
    paths = [str(REPO / "src")]
    missing = [name for name in MISSING_THERE if importlib.util.find_spec(name) is None]
    if missing:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            raise SystemExit(
                f"missing here: {', '.join(missing)}; fetch the wheels where the package index is reachable "
                f"(python benchmarks/gpu_check.py --fetch_wheels) and bring {WHEELS} along"
            )
        site = work / "site"
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target"]
        subprocess.run([*pip, str(site), *map(str, wheels)], check=True)
        paths.append(str(site))
    for path in reversed(paths):
        sys.path.insert(0, path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def build_model(folder: Path, size: str, device: str) -> dict[str, Any]:
    """A BPE tokenizer trained on the repository's alpaca rows and a random Llama of ``size``, saved as a
    Hugging Face folder; returns the parameter count and the tokenizer's vocabulary size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = json.loads(DATA.read_text(encoding="utf-8"))
    texts = [" ".join(str(r.get(k, "")) for k in ("instruction", "input", "output")) for r in rows]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    vocab = 512 if size == "tiny" else 8192
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **MODELS[size],
    )
    torch.manual_seed(0)
    with torch.device("cuda" if device == "cuda" else "cpu"):
        model = LlamaForCausalLM(config)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"parameters": params, "vocab_size": len(tokenizer), "config": MODELS[size]}


# ------------------------------------------------------------------------------------------------ runs


def run_settings(args: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    """The flat configuration of the ftpipe run (the estimate and TRL take the same values)."""
    tiny = args.tiny
    return {
        "hf_model_id": str(model),
        "dataset": str(DATA),
        "data_dir": str(work / "data"),
        "results_dir": str(work / "results"),
        "accelerator": args.device,
        "precision": "auto" if args.device == "cuda" else "32-true",
        "strategy": "fsdp2",
        "num_nodes": 1,
        "gpus_per_node": 1,
        "finetuning": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "max_seq_length": 128 if tiny else 2048,
        "packing": True,
        "loss_chunk_size": 256,
        "activation_checkpointing": True,
        "micro_batch_size": 2 if tiny else 8,
        "accumulate_grad_batches": 1,
        "max_steps": args.steps,
        "warmup_steps": 1,
        "learning_rate": 2e-4,
        "min_lr": 2e-5,
        "val_check_interval": args.steps,
        "limit_val_batches": 1,
        "early_stopping_patience": 0,
        "num_workers": 0,
        "peak_tflops_per_device": args.peak_tflops if args.device == "cuda" else None,
        "gpu_memory_gib": None,
    }


def run_ftpipe(
    settings: dict[str, Any], env: dict[str, str], log_path: Path, timeout: float
) -> dict[str, Any]:
    """``ftpipe train`` with ``settings``; its summary (tokens/s, MFU, peak memory) and step records."""
    cmd = [sys.executable, "-m", "ftpipe", "train"]
    for key, value in settings.items():
        cmd += [f"--{key}", "null" if value is None else str(value)]
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        return {"ok": False, "exit_status": proc.returncode, "seconds": seconds, "log_tail": tail}
    root = Path(settings["results_dir"])
    summary = json.loads(next(root.rglob("train_summary.json")).read_text())
    steps = [json.loads(line) for line in next(root.rglob("metrics.jsonl")).read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    return {
        "ok": True,
        "seconds": seconds,
        "summary": summary,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def estimate_gib(settings: dict[str, Any]) -> dict[str, Any]:
    """``ftpipe estimate``'s per-device prediction for the run (no weights are loaded)."""
    from ftpipe.config import load_config
    from ftpipe.estimate.memory import plan

    result = plan(load_config(None, **settings))
    return {"total_gib": result.total / GIB, "fits": result.fits, "device": result.target.device}


def packed_equality(
    model_dir: Path, settings: dict[str, Any], device: str, samples: int = 6
) -> dict[str, Any]:
    """The summed loss of ``samples`` training rows packed into one row (positions restarting at every
    sample, no attention mask, the first label of each sample masked) against the same rows one by one."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftpipe.config import load_config, prepared_data_dir
    from ftpipe.data.build import SPLIT_FILES
    from ftpipe.data.prepare import read_jsonl
    from ftpipe.data.tokenize import IGNORE_INDEX, encode_example
    from ftpipe.model.tokenizer import load_tokenizer
    from ftpipe.train.loss import shifted_token_loss_sum

    cfg = load_config(None, **settings)
    tokenizer = load_tokenizer(cfg.model)
    rows = read_jsonl(prepared_data_dir(cfg.data) / SPLIT_FILES["train"])[:samples]
    encoded = [e for e in (encode_example(tokenizer, row, cfg.data) for row in rows) if e is not None]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(
        device
    )
    model.eval()
    with torch.no_grad():
        alone = 0.0
        for e in encoded:
            ids = torch.tensor([e.input_ids], device=device)
            logits = model(input_ids=ids, use_cache=False).logits
            alone += float(shifted_token_loss_sum(logits, torch.tensor([e.labels])))
        ids = torch.tensor([[t for e in encoded for t in e.input_ids]], device=device)
        positions = torch.tensor([[p for e in encoded for p in range(len(e.input_ids))]], device=device)
        labels = torch.tensor([[lab for e in encoded for lab in [IGNORE_INDEX, *e.labels[1:]]]])
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        packed = float(shifted_token_loss_sum(logits, labels))
    rel = abs(packed - alone) / max(abs(alone), 1e-12)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    return {
        "samples": len(encoded),
        "tokens": int(ids.shape[1]),
        "dtype": str(dtype).removeprefix("torch."),
        "loss_sum_alone": alone,
        "loss_sum_packed": packed,
        "relative_difference": rel,
        "tolerance": tolerance,
        "ok": rel <= tolerance,
    }


def run_trl(
    settings: dict[str, Any], env: dict[str, str], work: Path, device: str, timeout: float
) -> dict[str, Any]:
    """TRL's SFTTrainer + PEFT on ftpipe's prepared rows, with the run's LoRA, length, rows and steps."""
    from ftpipe.config import load_config, prepared_data_dir
    from ftpipe.data.build import SPLIT_FILES

    cfg = load_config(None, **settings)
    out = work / "trl"
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": settings["hf_model_id"],
        "train_file": str(prepared_data_dir(cfg.data) / SPLIT_FILES["train"]),
        "out_dir": str(out),
        "steps": settings["max_steps"],
        "micro_batch_size": settings["micro_batch_size"],
        "accumulation": 1,
        "learning_rate": settings["learning_rate"],
        "min_lr": settings["min_lr"],
        "warmup_steps": settings["warmup_steps"],
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": cfg.train.weight_decay,
        "max_grad_norm": cfg.train.gradient_clip_val,
        "seed": cfg.train.seed,
        "gradient_checkpointing": settings["activation_checkpointing"],
        "max_length": settings["max_seq_length"],
        "packing": True,
        "threads": os.cpu_count() or 1,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": list(cfg.lora.lora_target_modules)},
        "device": device,
        "bf16": device == "cuda",
    }
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    log_path = work / "trl.log"
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(TRL_RUNNER), str(spec_path)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if proc.returncode != 0:
        return {
            "ok": False,
            "exit_status": proc.returncode,
            "log_tail": log_path.read_text(errors="replace")[-4000:],
        }
    record = json.loads((out / "rank0.json").read_text())
    timed = record["steps"][1:] or record["steps"]
    seconds = sum(s["step_time_s"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    return {
        "ok": True,
        "seconds": time.perf_counter() - start,
        "tokens_per_s": tokens / seconds if seconds else None,
        "peak_memory_gib": record.get("peak_cuda_gib") or record["peak_vmhwm_gib"],
        "first_loss": record["losses"][0] if record["losses"] else None,
        "last_loss": record["losses"][-1] if record["losses"] else None,
    }


# ------------------------------------------------------------------------------------------------ main


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware of this machine."""
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Every step of the check; the report."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ftpipe-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = bootstrap(work)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "device": args.device,
        "tiny": args.tiny,
        "steps": args.steps,
        "workdir": str(work),
    }
    report["environment"] = environment(args.device)
    model_dir = work / "model"
    report["model"] = build_model(model_dir, "tiny" if args.tiny else "1b", args.device)
    settings = run_settings(args, model_dir, work)
    report["settings"] = settings
    report["ftpipe"] = run_ftpipe(settings, env, work / "ftpipe.log", timeout=args.timeout)
    report["estimate"] = estimate_gib(settings)
    if report["ftpipe"]["ok"]:
        measured = report["ftpipe"]["summary"]["peak_mem_gib_per_rank"][0]
        report["estimate"]["measured_gib"] = measured
        report["estimate"]["ratio"] = report["estimate"]["total_gib"] / measured if measured else None
    report["packed_equality"] = packed_equality(model_dir, settings, args.device)
    if args.skip_trl:
        report["trl"] = {"skipped": "--skip_trl"}
    elif importlib.util.find_spec("trl") is None:
        report["trl"] = {"skipped": "trl is not installed here"}
    else:
        report["trl"] = run_trl(settings, env, work, args.device, timeout=args.timeout)
    report["seconds"] = time.perf_counter() - started
    report["imported_vllm"] = "vllm" in sys.modules  # must stay False: the GPU machine has no vLLM
    report["ok"] = bool(
        report["ftpipe"]["ok"] and report["packed_equality"]["ok"] and not report["imported_vllm"]
    )
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The report in a few lines."""
    ft = report["ftpipe"]
    lines = [
        f"gpu check on {report['device']} ({report['environment'].get('gpu', 'CPU')}): {'ok' if report['ok'] else 'FAILED'}"
    ]
    lines.append(f"model: {report['model']['parameters'] / 1e6:.1f}M parameters")
    if ft["ok"]:
        s = ft["summary"]
        mfu = s.get("mfu")
        lines.append(
            f"ftpipe: {s['tokens_per_s']:.0f} real tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, "
            f"peak {s['peak_mem_gib_per_rank'][0]:.3f} GiB (estimate {report['estimate']['total_gib']:.3f} GiB), "
            f"loss {ft['first_loss']:.3f} -> {ft['last_loss']:.3f}"
        )
    else:
        lines.append(f"ftpipe: failed with exit status {ft['exit_status']}")
    eq = report["packed_equality"]
    lines.append(
        f"packed vs unpacked ({eq['dtype']}): relative difference {eq['relative_difference']:.2e} "
        f"(tolerance {eq['tolerance']:.0e})"
    )
    trl = report["trl"]
    if trl.get("ok"):
        lines.append(f"TRL: {trl['tokens_per_s']:.0f} real tokens/s, peak {trl['peak_memory_gib']:.2f} GiB")
    else:
        status = trl.get("skipped") or f"failed (exit status {trl.get('exit_status')})"
        lines.append(f"TRL: {status}")
    lines.append(f"in {report['seconds']:.0f} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (the dry mode)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peak_tflops", type=float, default=790.0, help="dense bf16 peak per GPU (MFU)")
    parser.add_argument("--skip_trl", action="store_true")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per training run")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--fetch_wheels", action="store_true", help="download the wheels to carry, then exit")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        for wheel in fetch_wheels():
            print(wheel)
        return 0
    report = check(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print("\n".join(summary_lines(report)))
    print(f"report: {args.out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
