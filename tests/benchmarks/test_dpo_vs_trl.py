"""benchmarks/dpo_vs_trl.py and trl_dpo_run.py: ftpipe's data order as its data module draws it, TRL's rows in
that order, TRL's token counts and tokenization of the rows, the rates, the loss agreement, the target, the
commands of both sides, the report writer, and (slow) a 2-step matched run of both sides on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import types
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
def dpo() -> ModuleType:
    return _load("dpo_vs_trl")


@pytest.fixture(scope="module")
def trl_run() -> ModuleType:
    return _load("trl_dpo_run")


class _Indices:
    """A dataset whose items are their indices."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [1, 2])
def test_order_is_the_one_ftpipe_data_module_draws(dpo, tokenizer, world):
    """The micro-batches computed for TRL are those ftpipe's own training loader yields, on every rank."""
    from ftpipe.config.schema import PipelineConfig
    from ftpipe.data.datamodule import SFTDataModule

    cfg = PipelineConfig.from_flat(
        {"hf_model_id": "embedded", "micro_batch_size": 3, "num_workers": 0, "seed": 42, "max_seq_length": 64}
    )
    dm = SFTDataModule(cfg, tokenizer)
    dm.datasets["train"] = _Indices(20)
    dm.train_collator = list
    expected = dpo.ftpipe_batches(20, world, 3, 42)
    for rank in range(world):
        dm.trainer = types.SimpleNamespace(world_size=world, global_rank=rank) if world > 1 else None
        assert [list(b) for b in dm.train_dataloader()] == expected[rank]
    flat = sorted(i for rank in expected for batch in rank for i in batch)
    assert len(flat) == len(set(flat)) and flat != list(range(len(flat)))  # shuffled, none twice


@pytest.mark.timeout(60)
def test_step_pairs_and_trl_order(dpo):
    batches = [[[0, 1], [2, 3], [4, 5]], [[10, 11], [12, 13], [14, 15]]]  # 2 ranks x 3 micro-batches of 2
    assert dpo.step_pairs(batches, accumulation=1, steps=2) == [[0, 1, 10, 11], [2, 3, 12, 13]]
    # accumulation: the micro-batches of a step in order, each over the ranks
    assert dpo.step_pairs([[[0], [1], [2], [3]], [[5], [6], [7], [8]]], 2, 2) == [[0, 5, 1, 6], [2, 7, 3, 8]]
    with pytest.raises(SystemExit, match="optimizer steps per epoch"):
        dpo.step_pairs(batches, accumulation=1, steps=4)
    # TRL reads the benchmarked pairs first, in the steps' order, then the rest of the split
    assert dpo.trl_order([[3, 1], [0, 5]], 7) == [3, 1, 0, 5, 2, 4, 6]


@pytest.mark.timeout(60)
def test_trl_rows_tokenize_to_ftpipe_ids(dpo, tokenizer):
    """Text rows decoded from ftpipe's ids tokenize back to them through TRL's own path; conversational rows
    give one token more per side (the template's newline after the end of turn)."""
    from ftpipe.config.schema import PipelineConfig

    cfg = PipelineConfig.from_flat(
        {"hf_model_id": "embedded", "objective": "dpo", "use_chat_template": True, "max_seq_length": 128}
    )
    rows = [
        {"id": 1, "prompt": "What is 2 plus 2?", "chosen": "In short: 4.", "rejected": "4."},
        {
            "id": 2,
            "prompt": "Define a noun.",
            "chosen": "In short: a naming word.",
            "rejected": "A naming word.",
        },
        {"id": 3, "prompt": "Same?", "chosen": "yes", "rejected": "yes"},  # nothing to prefer: dropped
    ]
    encoded = dpo.encode_split(cfg, tokenizer, rows)
    assert encoded.dropped == 1 and [r["id"] for r in encoded.rows] == [1, 2]
    assert encoded.text_rows[0]["chosen"].endswith(tokenizer.eos_token)
    assert encoded.conversational_rows[1]["prompt"] == [{"role": "user", "content": "Define a noun."}]
    check = dpo.trl_token_check(tokenizer, encoded, [0, 1])
    assert check == {"pairs": 2, "text_rows_identical": 2, "conversational_one_more": 2}


@pytest.mark.timeout(60)
def test_token_counts_of_trl_preference_batches(trl_run):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    # chosen rows 5 + 3 tokens, rejected rows 4 + 4; 4 rows of 5 positions; answers 2 + 1 + 1 + 2
    assert trl_run.batch_counts(batch) == (16, 20, 6)
    counting = trl_run.PairCountingCollator(DataCollatorForPreference(pad_token_id=0))
    counting(examples)
    counting(examples[:1])
    assert list(counting.pending) == [(16, 20, 6), (9, 10, 3)]


def _step(t: float, tokens: int, padded: int, loss: float, label_tokens: int = 10, **extra) -> dict:
    return {
        "step": extra.pop("step", 1),
        "step_time_s": t,
        "tokens": tokens,
        "padded_tokens": padded,
        "label_tokens": label_tokens,
        "loss": loss,
        "logps/chosen": -10.0,
        **extra,
    }


@pytest.mark.timeout(60)
def test_rates_leave_out_the_first_step(dpo):
    steps = [_step(100.0, 1, 1000, 0.69), _step(2.0, 300, 400, 0.6), _step(3.0, 200, 400, 0.5)]
    r = dpo.rates(steps)
    assert r["measured_steps"] == 2 and r["tokens_per_s"] == pytest.approx(100.0)
    assert r["s_per_step"] == pytest.approx(2.5) and r["padding_share"] == pytest.approx(300 / 800)
    assert r["train_time_s"] == pytest.approx(105.0)
    # the prompt computed once: real tokens count both sequences, the padding share the positions computed
    shared = [_step(1.0, 300, 400, 0.6, positions=200), _step(2.0, 300, 400, 0.5, positions=200)]
    r = dpo.rates([shared[0], *shared])
    assert r["tokens_per_s"] == pytest.approx(200.0) and r["padding_share"] == pytest.approx(0.5)
    assert r["positions_per_pair_token"] == pytest.approx(2 / 3)


def _run(losses: list[float], tps: float = 100.0, rss: float = 2.0, tokens: int = 100) -> dict:
    steps = [_step(1.0, tokens, 120, x, step=i + 1) for i, x in enumerate(losses)]
    return {"steps": steps, "losses": losses, "tokens_per_s": tps, "peak_rss_gib": [rss, rss - 0.1]}


@pytest.mark.timeout(60)
def test_cpu_time_over_the_rated_steps(dpo, tmp_path):
    """ftpipe's steps are counted from its metrics.jsonl as it grows; CPU seconds between two step ends."""
    count = dpo.logged_steps(tmp_path)
    assert count() == 0
    metrics = tmp_path / "model" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text(
        '{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n{"step": 2, "val_loss": 0.7}\n{"st'
    )
    assert count() == 2  # a validation record and a line being written do not count
    samples = [(1, 10.0), (2, 14.0), (4, 22.5)]
    assert dpo.cpu_between(samples, 1, 4) == pytest.approx(12.5)
    assert dpo.cpu_between(samples, 1, 3) is None
    record = dpo.run_record(
        1, 2, [_step(5.0, 100, 120, 0.69), _step(4.0, 90, 100, 0.6)], [(1, 2.0)], 30.0, 6.0
    )
    assert record["cpu_s_per_step"] == pytest.approx(6.0) and record["tokens_per_cpu_s"] == pytest.approx(
        15.0
    )
    assert dpo.run_record(1, 2, [_step(5.0, 100, 120, 0.69)], [], 30.0, None)["tokens_per_cpu_s"] is None


@pytest.mark.timeout(60)
def test_work_estimate(dpo, tmp_path):
    """Blocks and adapters 2 FLOPs per parameter and position in 3 passes (4 with checkpointing), the head 6."""
    no_ckpt = dpo.matmul_gflops(100, 20, blocks=10, lora=1, head=5, checkpointing=False)
    assert no_ckpt == pytest.approx((2 * 11 * 3 * 100 + 6 * 5 * 20) / 1e9)
    ckpt = dpo.matmul_gflops(100, 20, blocks=10, lora=1, head=5, checkpointing=True)
    assert ckpt == pytest.approx((2 * 11 * 4 * 100 + 6 * 5 * 20) / 1e9)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "hidden_size": 3}))
    assert dpo.head_params(tmp_path) == 30
    record = {
        "total_params": 1000,
        "trainable_params": 10,
        "gradient_checkpointing": False,
        "cpu_s_after_first": 2e-6,
        "steps": [
            {"padded_tokens": 999, "label_tokens": 1},
            {"padded_tokens": 40, "label_tokens": 10},
            {"padded_tokens": 60, "label_tokens": 20},
        ],
    }
    # ftpipe's head scores the labelled positions, TRL's every position but the last of each of the 4 rows
    ours = dpo.work(record, "ftpipe", 30, rows_per_step=4)
    per_step = [
        dpo.matmul_gflops(p, n, blocks=960, lora=10, head=30, checkpointing=False)
        for p, n in ((40, 10), (60, 20))
    ]
    assert ours["gflop_per_step"] == pytest.approx(sum(per_step) / 2)
    assert ours["gflop_per_cpu_s"] == pytest.approx(sum(per_step) / 2e-6)
    theirs = dpo.work(record, "trl", 30, rows_per_step=4)
    assert theirs["gflop_per_step"] > ours["gflop_per_step"]


@pytest.mark.timeout(60)
def test_loss_agreement(dpo):
    ln2 = math.log(2)
    a = dpo.agreement(_run([ln2, 0.68, 0.67]), _run([ln2 + 1e-8, 0.68005, 0.6699]), tolerance=2e-4)
    assert a["step1_is_ln2"] and a["losses_agree"] and a["same_tokens_every_step"]
    assert a["max_loss_diff"] == pytest.approx(1e-4)
    assert a["per_step"][1]["loss"] == [0.68, 0.68005]
    far = dpo.agreement(_run([ln2, 0.68]), _run([ln2, 0.681], tokens=116), tolerance=2e-4)
    assert not far["losses_agree"] and far["token_difference_per_step"] == [16]
    not_ln2 = dpo.agreement(_run([0.70, 0.68]), _run([0.70, 0.68]), tolerance=2e-4)
    assert not not_ln2["step1_is_ln2"] and not not_ln2["losses_agree"]
    assert dpo.agreement({"error": "x"}, _run([ln2]), 1e-4)["evaluated"] is False


@pytest.mark.timeout(60)
def test_target_at_the_defaults(dpo):
    met = dpo.targets({"ftpipe-defaults": _run([0.7], 250.0, 1.9), "trl-defaults": _run([0.7], 100.0, 2.0)})
    assert met["tokens_per_s_ratio"] == pytest.approx(2.5) and met["tokens_per_s_ratio_met"]
    assert met["peak_memory_met"] and met["peak_rss_gib_max_process"] == 1.9
    missed = dpo.targets(
        {"ftpipe-defaults": _run([0.7], 150.0, 2.1), "trl-defaults": _run([0.7], 100.0, 2.0)}
    )
    assert not missed["tokens_per_s_ratio_met"] and not missed["peak_memory_met"]
    assert met["tokens_per_cpu_s_ratio"] is None and not met["tokens_per_cpu_s_ratio_met"]
    cpu = dpo.targets(
        {
            "ftpipe-defaults": {**_run([0.7], 150.0, 1.9), "tokens_per_cpu_s": 42.0},
            "trl-defaults": {**_run([0.7], 100.0, 2.0), "tokens_per_cpu_s": 20.0},
        }
    )
    assert cpu["tokens_per_cpu_s_ratio"] == pytest.approx(2.1) and cpu["tokens_per_cpu_s_ratio_met"]
    assert dpo.targets({"ftpipe-defaults": _run([0.7])})["evaluated"] is False


@pytest.mark.timeout(60)
def test_commands_of_both_sides(dpo, tmp_path):
    args = dpo.parse_args(["--model", str(tmp_path), "--cpus", "2", "--steps", "5"])
    assert args.settings == ["defaults", "matched"]
    s = dpo.build_settings(args)
    assert (s.ftpipe_processes, s.trl_processes, s.accumulation(2)) == (2, 2, 1)
    assert s.lora == {
        "r": 16,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    assert s.optim["warmup_steps"] == 0 and s.optim["adam_beta2"] == 0.95
    defaults = dpo.ftpipe_command(s, dpo.VARIANTS["ftpipe-defaults"], tmp_path, tmp_path / "prepared")
    flags = dict(zip(defaults[4::2], defaults[5::2], strict=False))
    assert flags["--objective"] == "dpo" and flags["--dpo_loss"] == "sigmoid" and flags["--dpo_beta"] == "0.1"
    assert flags["--activation_checkpointing"] == "auto" and flags["--max_samples"] == "null"
    assert flags["--micro_batch_size"] == "4" and flags["--accumulate_grad_batches"] == "1"
    assert (
        flags["--warmup_steps"] == "0"
        and flags["--lora_dropout"] == "0.0"
        and flags["--max_seq_length"] == "128"
    )
    assert int(flags["--val_check_interval"]) > s.steps and flags["--max_steps"] == "5"
    matched = dpo.ftpipe_command(s, dpo.VARIANTS["ftpipe-matched"], tmp_path, tmp_path)
    assert matched[matched.index("--activation_checkpointing") + 1] == "false"
    spec = dpo.trl_spec(s, dpo.VARIANTS["trl-defaults"], tmp_path, tmp_path / "rows.jsonl")
    assert spec["gradient_checkpointing"] is None and spec["accumulation"] == 1 and spec["threads"] == 1
    assert spec["learning_rate"] == 5e-5 and spec["min_lr"] == 5e-6 and spec["beta"] == 0.1
    assert dpo.trl_spec(s, dpo.VARIANTS["trl-matched"], tmp_path, tmp_path)["gradient_checkpointing"] is False
    single = dpo.build_settings(dpo.parse_args(["--model", str(tmp_path), "--ftpipe-strategy", "single"]))
    assert single.trl_processes == 1 and single.accumulation(1) == 2
    with pytest.raises(SystemExit):
        dpo.parse_args(["--variants", "fastest"])
    with pytest.raises(SystemExit, match="global-batch 6"):
        dpo.build_settings(dpo.parse_args(["--model", str(tmp_path), "--global-batch", "6", "--cpus", "2"]))


@pytest.mark.timeout(60)
def test_trainer_process_recognition(dpo):
    ftpipe = [sys.executable, "-m", "ftpipe", "train", "--config", "x"]
    assert dpo.is_ftpipe_trainer(ftpipe)
    assert not dpo.is_ftpipe_trainer(["timeout", "-k", "30", "900", *ftpipe])
    runner = str(REPO / "benchmarks" / "trl_dpo_run.py")
    assert dpo.is_trl_trainer([sys.executable, runner, "spec.json"])
    assert not dpo.is_trl_trainer(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", runner]
    )
    assert not dpo.is_trl_trainer(["timeout", "900", sys.executable, runner, "spec.json"])


def _report(dpo, runs: dict) -> dict:
    settings = {
        "model": "m",
        "pairs": "pairs.jsonl",
        "steps": 2,
        "global_batch": 8,
        "micro_batch_size": 4,
        "max_length": 128,
        "ftpipe_strategy": "ddp",
        "ftpipe_processes": 2,
        "trl_processes": 2,
        "ftpipe_accumulation": 1,
        "trl_accumulation": 1,
        "matched_checkpointing": "off",
        "beta": 0.1,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj"]},
        "optim": {
            "learning_rate": 5e-5,
            "min_lr": 5e-6,
            "adam_beta1": 0.9,
            "adam_beta2": 0.95,
            "weight_decay": 0.01,
            "max_grad_norm": 1.0,
            "seed": 42,
        },
    }
    return {
        "machine": {"cpu": "cpu", "cpu_count": 2, "versions": {"trl": "1.16.0"}},
        "settings": settings,
        "runs": runs,
        "agreement": {"matched": dpo.agreement(runs["ftpipe-matched"], runs["trl-matched"], 2e-4)},
        "targets": dpo.targets(runs),
        "data": {"train_pairs": 520, "dropped": 0, "longest": 68},
        "token_check": {"pairs": 16, "text_rows_identical": 16, "conversational_one_more": 16},
        "matched_glibc_tunables": "glibc.malloc.tcache_count=0",
    }


@pytest.mark.timeout(60)
def test_markdown_report(dpo, tmp_path):
    ln2 = math.log(2)
    extra = {
        "processes": 2,
        "threads_per_process": 1,
        "gradient_checkpointing": False,
        "wall_s": 60.0,
        "train_time_s": 20.0,
        "s_per_step": 10.0,
        "cpu_s_per_step": 19.5,
        "padding_share": 0.1,
        "loadavg_before": 1.5,
        "loadavg_after": 1.7,
    }
    runs = {
        "ftpipe-matched": {**_run([ln2, 0.68], 200.0, 2.0), **extra, "tokens_per_cpu_s": 30.0},
        "trl-matched": {
            **_run([ln2, 0.68001], 80.0, 2.5),
            **extra,
            "gradient_checkpointing": True,
            "tokens_per_cpu_s": 20.0,
        },
    }
    md = dpo.markdown(_report(dpo, runs))
    row = "| ftpipe-matched | 2 x 1 | off | 200.0 | 2.50x | 30.0 | 1.50x | 2.00, 1.90 | 60 | 20 | 10.00 | 19.50 | 10.0% |"
    assert row in md
    assert "| trl-matched | 2 x 1 | on | 80.0 | 1.00x | 20.0 | 1.00x |" in md
    assert "| 0.69315, 0.68000 | 1.50 / 1.70 |" in md
    assert "losses agree" in md and "the same real and answer tokens at every step" in md
    assert "| 2 | 0.680000 | 0.680010 | 1.0e-05 |" in md
    assert "not evaluated: needs successful ftpipe-defaults and trl-defaults runs" in md
    failed = dpo.markdown(_report(dpo, {**runs, "trl-matched": {"error": "TRL run exited with 124"}}))
    assert "| trl-matched | failed: TRL run exited with 124 |" in failed and "## Failed runs" in failed
    out = tmp_path / "r.json"
    _load("vs_trl").write_report(out, {"a": 1}, md)
    assert json.loads(out.read_text()) == {"a": 1} and out.with_suffix(".md").read_text() == md


@pytest.mark.timeout(60)
def test_report_only_rewrites_the_markdown(dpo, tmp_path):
    """``--report-only``: the derived figures recomputed from the runs of the JSON, the Markdown written again."""
    ln2 = math.log(2)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "hidden_size": 3}))
    extra = {
        "processes": 2,
        "threads_per_process": 1,
        "gradient_checkpointing": False,
        "wall_s": 60.0,
        "train_time_s": 20.0,
        "s_per_step": 10.0,
        "padding_share": 0.1,
        "loadavg_before": 1.5,
        "loadavg_after": 1.7,
        "total_params": 1000,
        "trainable_params": 10,
        "cpu_s_after_first": 1e-5,
    }
    runs = {
        f"{side}-matched": {**_run([ln2, 0.68]), **extra, "side": side, "setting": "matched"}
        for side in ("ftpipe", "trl")
    }
    report = _report(dpo, runs)
    report["settings"]["model"] = str(tmp_path)
    del report["agreement"], report["targets"]
    out = tmp_path / "dpo.json"
    out.write_text(json.dumps(report))
    again = dpo.main(["--report-only", "--out", str(out)])
    assert again["agreement"]["matched"]["losses_agree"] and "gflop_per_step" in again["runs"]["trl-matched"]
    md = out.with_suffix(".md").read_text()
    assert "## Work per step (estimate)" in md and "- ftpipe-matched: 0 GFLOP per step" in md


@pytest.mark.timeout(60)
def test_runner_rejects_bad_usage():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "trl_dpo_run.py")], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "usage" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_matched_steps_on_a_tiny_model(dpo, tiny_llama, tmp_path):
    """Both sides, matched, 2 steps on a tiny Llama in one process each (micro-batch 4 pairs x accumulation 2):
    the same tokens at every step, step 1 at ln 2 on both, the losses within the tolerance, the report."""
    out = tmp_path / "dpo_vs_trl.json"
    report = dpo.main(
        [
            "--model",
            str(tiny_llama),
            "--steps",
            "2",
            "--variants",
            "matched",
            "--ftpipe-strategy",
            "single",
            "--timeout",
            "400",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    runs = report["runs"]
    assert list(runs) == ["ftpipe-matched", "trl-matched"]
    assert all("error" not in r for r in runs.values()), [r.get("log_tail") for r in runs.values()]
    for name, r in runs.items():
        assert len(r["steps"]) == 2 and r["measured_steps"] == 1, name
        assert len(r["peak_rss_gib"]) == r["processes"] == 1 and r["peak_rss_gib"][0] > 0.2, name
    trl = runs["trl-matched"]
    assert all(s["micro_batches"] == 2 for s in trl["steps"])
    assert sum(s["tokens"] for s in trl["steps"]) == trl["trl_num_tokens"]  # TRL's own count
    assert trl["reference"] == "adapter disabled" and not trl["gradient_checkpointing"]
    assert trl["tokens_per_cpu_s"] > 0 and trl["gflop_per_step"] > 0
    ours = runs["ftpipe-matched"]
    assert ours["prompt_once"] and all(s["positions"] < s["tokens"] for s in ours["steps"])
    a = report["agreement"]["matched"]
    assert a["same_tokens_every_step"] and a["same_label_tokens_every_step"]
    assert a["step1_is_ln2"] and a["losses_agree"], a["per_step"]
    assert report["token_check"]["text_rows_identical"] == report["token_check"]["pairs"] == 16
    md = out.with_suffix(".md").read_text()
    assert "| ftpipe-matched | 1 x " in md and "## Loss agreement" in md
