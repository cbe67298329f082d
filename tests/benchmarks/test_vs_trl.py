"""benchmarks/vs_trl.py and trl_sft_run.py: the numbers of the report, TRL's token counts, memory polling,
and one small end-to-end invocation (tiny model, both sides, JSON and Markdown)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vs_trl() -> ModuleType:
    return _load("vs_trl")


@pytest.fixture(scope="module")
def trl_run() -> ModuleType:
    return _load("trl_sft_run")


def _step(t: float, tokens: int, padded: int) -> dict:
    return {"step_time_s": t, "tokens": tokens, "padded_tokens": padded}


@pytest.mark.timeout(60)
def test_run_metrics_leave_out_the_first_step(vs_trl):
    steps = [_step(100.0, 1, 1000), _step(2.0, 300, 400), _step(3.0, 200, 400)]
    m = vs_trl.run_metrics(steps, total_params=1000, trainable_params=10, peak_tflops=1e-6)
    assert m["measured_steps"] == 2
    assert m["tokens_per_s"] == pytest.approx(500 / 5.0)
    assert m["s_per_step"] == pytest.approx(2.5)
    assert m["padding_share"] == pytest.approx(300 / 800)
    assert m["flops_per_token"] == 4 * 1000 + 2 * 10
    # 4020 FLOPs per token x 500 tokens in 5 s against 1 MFLOP/s
    assert m["mfu"] == pytest.approx(4020 * 500 / 5.0 / 1e6)
    assert m["model_tflops_per_s"] == pytest.approx(4020 * 500 / 5.0 / 1e12)
    single = vs_trl.run_metrics([_step(4.0, 10, 20)], 1000, 10, 1e-6)
    assert single["measured_steps"] == 1 and single["tokens_per_s"] == pytest.approx(2.5)


def _run(variant: str, tps: float, rss: list[float], pad: float = 0.1) -> dict:
    return {
        "variant": variant,
        "processes": len(rss),
        "threads_per_process": 2 // len(rss),
        "tokens_per_s": tps,
        "s_per_step": 1000 / tps,
        "padding_share": pad,
        "mfu": tps / 1000,
        "peak_rss_gib": rss,
        "first_loss": 2.0,
        "last_loss": 1.5,
    }


@pytest.mark.timeout(60)
def test_summary_medians_spread_ratio_and_targets(vs_trl):
    runs = [
        _run("ftpipe-packed", 600.0, [1.0, 0.8], pad=0.01),
        _run("ftpipe-packed", 720.0, [1.2, 0.9], pad=0.02),
        _run("ftpipe-packed", 660.0, [1.1, 1.0], pad=0.03),
        _run("trl", 300.0, [2.0]),
        _run("trl", 330.0, [2.2]),
        {"variant": "trl", "error": "exit 1"},
        _run("trl", 150.0, [2.1]),
        _run("trl-packed", 440.0, [2.0]),
    ]
    summary = vs_trl.summarize(runs, ["ftpipe-packed", "trl", "trl-packed"])
    ours, base = summary["ftpipe-packed"], summary["trl"]
    assert ours["runs"] == 3 and base["runs"] == 3 and base["failed_runs"] == 1
    assert ours["tokens_per_s"] == {"median": 660.0, "min": 600.0, "max": 720.0}
    assert base["tokens_per_s"] == {"median": 300.0, "min": 150.0, "max": 330.0}
    assert ours["ratio_to_trl"] == pytest.approx(2.2) and base["ratio_to_trl"] == pytest.approx(1.0)
    assert ours["peak_rss_gib_per_process"] == [1.1, 0.9]  # median of each process over the repeats
    assert ours["peak_rss_gib_max_process"]["median"] == 1.1
    assert ours["peak_rss_gib_all_processes"] == pytest.approx({"median": 2.1, "min": 1.8, "max": 2.1})
    t = vs_trl.targets(summary)
    assert t["tokens_per_s_ratio"] == pytest.approx(2.2) and t["tokens_per_s_ratio_met"]  # >= 2.0x
    assert t["tokens_per_s_ratio_trl_packed"] == pytest.approx(1.5) and t["tokens_per_s_ratio_trl_packed_met"]
    assert t["mfu"] == pytest.approx(0.66) and t["mfu_met"]  # >= 60%
    assert t["peak_memory_met"] and t["padding_share"] == pytest.approx(0.02) and t["padding_share_met"]
    slow = vs_trl.summarize(
        [*runs[:3], _run("trl", 350.0, [1.0]), _run("trl-packed", 450.0, [1.0])],
        ["ftpipe-packed", "trl", "trl-packed"],
    )
    t = vs_trl.targets(slow)
    assert t["tokens_per_s_ratio"] == pytest.approx(660 / 350) and not t["tokens_per_s_ratio_met"]
    assert (
        t["tokens_per_s_ratio_trl_packed"] == pytest.approx(660 / 450)
        and not t["tokens_per_s_ratio_trl_packed_met"]
    )
    assert not t["peak_memory_met"]
    low = [dict(r, mfu=0.59) if r.get("variant") == "ftpipe-packed" else r for r in runs]
    assert not vs_trl.targets(vs_trl.summarize(low, ["ftpipe-packed", "trl"]))["mfu_met"]
    assert vs_trl.targets(vs_trl.summarize(runs[:3], ["ftpipe-packed"]))["evaluated"] is False


@pytest.mark.timeout(60)
def test_variants_alternate_sides(vs_trl):
    names = ["ftpipe-packed", "ftpipe-grouped", "trl", "trl-packed"]
    assert vs_trl.interleave(names) == ["ftpipe-packed", "trl", "ftpipe-grouped", "trl-packed"]
    assert vs_trl.interleave(["trl", "ftpipe-packed", "trl-grouped"]) == [
        "ftpipe-packed",
        "trl",
        "trl-grouped",
    ]


@pytest.mark.timeout(60)
def test_trainer_process_recognition(vs_trl):
    assert vs_trl.is_ftpipe_trainer([sys.executable, "-m", "ftpipe", "train", "--config", "x"])
    assert vs_trl.is_ftpipe_trainer([sys.executable, "-m", "ftpipe.__main__", "train", "--config", "x"])
    assert not vs_trl.is_ftpipe_trainer([sys.executable, "-m", "ftpipe", "prepare"])
    runner = str(REPO / "benchmarks" / "trl_sft_run.py")
    assert vs_trl.is_trl_trainer([sys.executable, "-u", runner, "spec.json"])
    assert not vs_trl.is_trl_trainer(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", runner, "spec.json"]
    )


@pytest.mark.timeout(120)
def test_peak_memory_of_a_child_process(vs_trl, tmp_path):
    """A child that holds 400 MiB for a second: its polled VmHWM is at least that, and not the parent's."""
    script = "import time; x = b'\\x01' * (400 * 1024**2); time.sleep(1.5)"
    code, wall, peaks = vs_trl.run_child(
        [sys.executable, "-c", script], tmp_path / "child.log", lambda argv: "-c" in argv
    )
    assert code == 0 and wall >= 1.5
    assert len(peaks) == 1
    assert 0.39 < peaks[0][1] < 0.39 + 0.25  # 400 MiB plus the interpreter


@pytest.mark.timeout(60)
def test_accumulation_reaches_the_same_global_batch(vs_trl, tmp_path):
    args = vs_trl.parse_args(
        ["--ftpipe-strategy", "single", "--trl-processes", "1", "--model", str(tmp_path)]
    )
    s = vs_trl.build_settings(args, tmp_path)
    assert (s.micro_batch_size, s.global_batch) == (2, 4)  # configs/benchmark.yaml: 2 rows x 2 processes
    assert s.accumulation(1) == 2 and s.accumulation(2) == 1
    assert s.warmup_steps == 3 and s.lora["r"] == 32 and s.optim["learning_rate"] == 3e-4
    cmd = vs_trl.ftpipe_command(s, vs_trl.VARIANTS["ftpipe-packed"], tmp_path)
    flags = dict(zip(cmd[4::2], cmd[5::2], strict=False))
    assert flags["--accumulate_grad_batches"] == "2" and flags["--gpus_per_node"] == "1"
    assert flags["--micro_batch_size"] == "2" and flags["--packing"] == "true"
    assert int(flags["--val_check_interval"]) > s.steps  # no validation
    spec = vs_trl.trl_spec(s, vs_trl.VARIANTS["trl-packed"], tmp_path)
    assert spec["accumulation"] == 2 and spec["threads"] == 2 and spec["packing"] is True
    # each side's default unless told: ftpipe auto, TRL's own (None leaves SFTConfig's default)
    assert flags["--activation_checkpointing"] == "auto" and spec["gradient_checkpointing"] is None
    both_off = vs_trl.build_settings(
        vs_trl.parse_args(["--activation-checkpointing", "off", "--model", str(tmp_path)]), tmp_path
    )
    off_cmd = vs_trl.ftpipe_command(both_off, vs_trl.VARIANTS["ftpipe-packed"], tmp_path)
    assert off_cmd[off_cmd.index("--activation_checkpointing") + 1] == "false"
    assert vs_trl.trl_spec(both_off, vs_trl.VARIANTS["trl"], tmp_path)["gradient_checkpointing"] is False
    short = vs_trl.build_settings(vs_trl.parse_args(["--steps", "2", "--model", str(tmp_path)]), tmp_path)
    assert short.warmup_steps == 1  # ftpipe needs warmup_steps < max_steps
    # by default TRL runs as many processes as ftpipe: ddp on 2 cores -> 2 x micro 2 x accumulation 1
    assert (short.ftpipe_strategy, short.ftpipe_processes, short.trl_processes) == ("ddp", 2, 2)
    assert vs_trl.trl_spec(short, vs_trl.VARIANTS["trl"], tmp_path)["accumulation"] == 1
    odd = vs_trl.parse_args(["--global-batch", "6", "--ftpipe-strategy", "fsdp2", "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="global-batch 6"):
        vs_trl.build_settings(odd, tmp_path)


@pytest.mark.timeout(60)
def test_prompt_completion_rows(trl_run, tmp_path):
    path = tmp_path / "training.jsonl"
    rows = [
        {"id": 1, "input": "Say hi", "output": "hi"},
        {
            "id": 2,
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = trl_run.prompt_completion_rows(path)
    assert out[0] == {
        "prompt": [{"role": "user", "content": "Say hi"}],
        "completion": [{"role": "assistant", "content": "hi"}],
    }
    assert out[1]["prompt"] == rows[1]["messages"][:3]
    assert out[1]["completion"] == [{"role": "assistant", "content": "d"}]


@pytest.mark.timeout(60)
def test_token_counts_of_trl_batches(trl_run):
    """TRL's own collator, padded and padding-free: real tokens are the sample lengths."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    samples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]}, {"input_ids": [1, 2]}]
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(samples)
    assert trl_run.batch_token_counts(padded) == (7, 10)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(samples)
    assert trl_run.batch_token_counts(flat) == (7, 7)
    counting = trl_run.CountingCollator(DataCollatorForLanguageModeling(pad_token_id=0))
    counting(samples)
    counting(samples[1:])
    assert list(counting.pending) == [(7, 10), (2, 2)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_end_to_end_tiny_model(vs_trl, tiny_llama, tmp_path):
    """Both sides on a tiny Llama for 2 steps: per-step records, TRL's counts equal TRL's own token
    counter, rates recomputed from the steps, peaks for every process, the Markdown table."""
    out = tmp_path / "vs_trl.json"
    report = vs_trl.main(
        [
            "--model",
            str(tiny_llama),
            "--steps",
            "2",
            "--repeats",
            "1",
            "--variants",
            "ftpipe-packed,trl,trl-packed",
            "--ftpipe-strategy",
            "single",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["summary"].keys() == report["summary"].keys()
    runs = {r["variant"]: r for r in report["runs"]}
    assert all("error" not in r for r in runs.values()), [r.get("log_tail") for r in runs.values()]
    for name, r in runs.items():
        assert len(r["steps"]) == 2 and r["measured_steps"] == 1, name
        last = r["steps"][1]
        assert r["tokens_per_s"] == pytest.approx(last["tokens"] / last["step_time_s"]), name
        assert r["padding_share"] == pytest.approx(1 - last["tokens"] / last["padded_tokens"]), name
        assert len(r["peak_rss_gib"]) == r["processes"] == 1 and r["peak_rss_gib"][0] > 0.2, name
    for name in ("trl", "trl-packed"):
        r = runs[name]
        assert sum(s["tokens"] for s in r["steps"]) == r["trl_num_tokens"], name
        assert all(s["micro_batches"] == 2 for s in r["steps"]), name  # micro 2 x accumulation 2
        assert r["self_reported_peak_gib"][0] == pytest.approx(r["peak_rss_gib"][0], rel=0.05), name
    assert runs["trl"]["padding_share"] > 0 and runs["trl-packed"]["padding_free"]
    assert runs["trl-packed"]["padding_share"] == 0
    assert runs["ftpipe-packed"]["padding_share"] < 0.05
    # at their defaults: ftpipe's auto turns checkpointing off for a model that fits, TRL keeps it on
    assert runs["ftpipe-packed"]["gradient_checkpointing"] is False and runs["trl"]["gradient_checkpointing"]
    assert (
        report["peak_tflops"] == max(report["peak_tflops_samples"])
        and len(report["peak_tflops_samples"]) == 4
    )
    md = out.with_suffix(".md").read_text()
    for name in runs:
        assert f"| {name} | 1 x " in md
    assert "ratio to TRL default" in md and "## Known differences" in md and "each side's default" in md


@pytest.mark.timeout(60)
def test_runner_rejects_bad_usage():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "trl_sft_run.py")], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "usage" in proc.stderr
