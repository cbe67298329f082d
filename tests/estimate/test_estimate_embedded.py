"""The estimate of the embedded model against the memory of real CPU training runs (ftpipe's own training
path, one process, fp32, LoRA r=32 on all seven projections, dropout 0.05, micro-batch 2 x 256 tokens),
with and without activation checkpointing: within 25%."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.cli.main import parse
from ftpipe.estimate import estimate

REPO_ROOT = Path(__file__).resolve().parents[2]
MEASURE = Path(__file__).with_name("measure_train.py")
MICRO_BATCH, SEQ_LEN = 2, 256
TOLERANCE = 0.25
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "his",
    "her",
    "an",
    "be",
    "this",
    "are",
    "which",
    "or",
    "had",
    "not",
    "were",
    "but",
    "their",
    "it",
    "one",
    "all",
    "there",
    "been",
    "have",
    "has",
    "more",
    "also",
    "new",
    "first",
    "two",
    "who",
    "after",
    "into",
    "river",
    "mountain",
    "city",
]


def _long_rows(path: Path, n: int = 40) -> Path:
    """Alpaca rows whose answers alone exceed 256 tokens: every batch is a full 2 x 256 (no padding) and
    almost every position has a label, the case the estimate describes."""
    rng = random.Random(0)
    rows = [
        {
            "instruction": f"Write text {i}.",
            "input": "",
            "output": " ".join(rng.choice(WORDS) for _ in range(400)),
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _args(dataset: Path, out: Path, checkpointing: bool) -> list[str]:
    return [
        "--config",
        str(REPO_ROOT / "configs" / "benchmark.yaml"),
        "--dataset",
        str(dataset),
        "--data_dir",
        str(out / "data"),
        "--results_dir",
        str(out / "results"),
        "--use_chat_template",
        "false",
        "--input_template",
        "{instruction}",
        "--max_samples",
        "null",
        "--strategy",
        "single",
        "--gpus_per_node",
        "1",
        "--accelerator",
        "cpu",
        "--precision",
        "32-true",
        "--lora_rank",
        "32",
        "--lora_alpha",
        "32",
        "--lora_dropout",
        "0.05",
        "--micro_batch_size",
        str(MICRO_BATCH),
        "--max_seq_length",
        str(SEQ_LEN),
        "--max_steps",
        "2",  # the second step runs with the optimizer state of the first
        "--warmup_steps",
        "1",
        "--val_check_interval",
        "1000",
        "--limit_val_batches",
        "1",
        "--early_stopping_patience",
        "0",
        "--num_workers",
        "0",
        "--activation_checkpointing",
        str(checkpointing).lower(),
    ]


@pytest.fixture(scope="module")
def measured(tmp_path_factory, embedded_model_path) -> dict[bool, dict]:
    """One run with and one without checkpointing, at the same time, one torch thread each (each process
    measures its own resident set size: the other process does not count);
    ``{checkpointing: probe record + the run's arguments}``."""
    base = tmp_path_factory.mktemp("estimate_runs")
    dataset = _long_rows(base / "long_answers.json")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # freed large tensors go back to the OS at once, so the resident set size follows the live tensors
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "FTPIPE_MEASURE_THREADS": "1",  # two threads on a shared two-core machine: ten times slower steps
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    started = {}
    try:
        for checkpointing in (True, False):
            out = base / f"checkpointing_{checkpointing}"
            out.mkdir()
            args = _args(dataset, out, checkpointing)
            with open(out / "train.log", "w") as log:
                proc = subprocess.Popen(
                    [sys.executable, str(MEASURE), str(out / "memory.json"), *args],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            started[checkpointing] = (proc, out, args)
        deadline = time.monotonic() + 280  # both at once; each took at most 280 s alone
        results = {}
        for checkpointing, (proc, out, args) in started.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            tail = (out / "train.log").read_text(errors="replace")[-4000:]
            assert code == 0, f"measured run (checkpointing {checkpointing}) exited {code}:\n{tail}"
            results[checkpointing] = {**json.loads((out / "memory.json").read_text()), "args": args}
        return results
    finally:
        for proc, _, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no_checkpointing"])
def test_estimate_matches_a_real_cpu_run(measured, checkpointing):
    record = measured[checkpointing]
    assert record["steps"] == 2 and record["batch_shape"] == [MICRO_BATCH, SEQ_LEN]
    _, cfg = parse(["train", *record["args"]])
    est = estimate(cfg)
    assert est.target.device == "cpu" and est.overhead == 0 and est.activation_checkpointing is checkpointing
    # the model as built (fp32 weights and adapters) is exact
    model = record["model_built"] - record["baseline"]
    assert abs(est.weights + est.lora_weights - model) / model < 0.03, (est.weights + est.lora_weights, model)
    peak = record["peak"] - record["baseline"]
    error = (est.total - peak) / peak
    print(
        f"checkpointing {checkpointing}: estimated {est.total / 2**20:.0f} MiB, measured {peak / 2**20:.0f} MiB "
        f"({error:+.1%})"
    )
    assert abs(error) <= TOLERANCE, f"estimate {est.total} vs measured {peak} bytes ({error:+.1%})"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkpointing_saving_matches(measured):
    """What checkpointing saves (the activation formula alone, weights and optimizer cancel out)."""
    _, cfg = parse(["train", *measured[True]["args"]])
    acts = estimate(cfg).activations
    saved = (measured[False]["peak"] - measured[False]["baseline"]) - (
        measured[True]["peak"] - measured[True]["baseline"]
    )
    expected = acts.without_checkpointing - acts.with_checkpointing
    assert saved > 0
    assert abs(expected - saved) / saved <= TOLERANCE, (expected, saved)


def _config_folder(tmp_path, embedded_model_path, **changes):
    import json

    config = json.loads((embedded_model_path / "config.json").read_text())
    folder = tmp_path / f"model-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.timeout(120)
def test_many_layers_are_counted_from_a_few_exactly(tmp_path, embedded_model_path):
    """80 decoder layers measured on 4 give the very counts of the whole model built on the meta device."""
    from ftpipe.config import PipelineConfig
    from ftpipe.estimate.shape import model_shape

    folder = _config_folder(tmp_path, embedded_model_path, num_hidden_layers=80)
    for finetuning in ("lora", "full"):
        cfg = PipelineConfig.from_flat({"hf_model_id": str(folder), "finetuning": finetuning})
        assert model_shape(cfg) == model_shape(cfg, probe_above=10**6)


@pytest.mark.timeout(120)
def test_a_model_of_20000_layers_is_estimated_in_seconds(tmp_path, embedded_model_path):
    import time

    from ftpipe.config import PipelineConfig
    from ftpipe.estimate import estimate

    folder = _config_folder(tmp_path, embedded_model_path, num_hidden_layers=20_000)
    start = time.monotonic()
    result = estimate(PipelineConfig.from_flat({"hf_model_id": str(folder), "gpu_memory_gib": 80.0}))
    assert time.monotonic() - start < 10
    assert result.shape.num_layers == 20_000
    base = model_shape_of(embedded_model_path)
    per_layer = base.layer_params
    assert result.shape.total_params == base.total_params + (20_000 - base.num_layers) * per_layer


def model_shape_of(folder):
    from ftpipe.config import PipelineConfig
    from ftpipe.estimate.shape import model_shape

    return model_shape(PipelineConfig.from_flat({"hf_model_id": str(folder)}))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_recompute_elementwise_is_counted_exactly(embedded_model_path, device):
    """With ``recompute_elementwise`` a layer keeps, per token, one intermediate-wide tensor less (the
    activation's output) and on the CPU two hidden-wide copies less for q, k, v and one for gate, up (the
    shared input once instead of a dropped-out copy per adapter, ftpipe.model.recompute)."""
    from ftpipe.config import PipelineConfig
    from ftpipe.estimate.activations import activation_bytes
    from ftpipe.estimate.shape import model_shape

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = PipelineConfig.from_flat(
        {"hf_model_id": str(embedded_model_path), "lora_dropout": 0.1, "lora_target_modules": targets}
    )
    shape = model_shape(cfg)
    kwargs = dict(
        micro_batch_size=2, seq_len=256, compute_bytes=4, attn="sdpa", device=device, loss_chunk_size=256
    )
    on = activation_bytes(shape, recompute_elementwise=True, **kwargs)
    off = activation_bytes(shape, recompute_elementwise=False, **kwargs)
    per_token = shape.intermediate_size + (3 * shape.hidden_size if device == "cpu" else 0)
    assert off.layer - on.layer == 2 * 256 * 4 * per_token
    assert off.without_checkpointing - on.without_checkpointing == shape.num_layers * (off.layer - on.layer)
