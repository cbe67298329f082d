"""ftpipe against TRL's SFTTrainer with PEFT LoRA, on the same machine in one invocation.

Both sides train the same base model (the embedded SmolLM2-135M-Instruct, fp32, CPU) with the same LoRA,
data (ftpipe's prepared split of ``configs/benchmark.yaml``), maximum length, micro-batch rows, global batch
(rows per optimizer step), optimizer (AdamW), schedule (linear warm-up, cosine to ``min_lr``), clipping
and step count, without evaluation. Activation checkpointing is each side's default unless
``--activation-checkpointing on|off`` sets it for both (ftpipe: ``auto``, which the memory estimate turns
off when the run fits without it; TRL: on). The data is prepared once with ``ftpipe
prepare``; then every variant runs ``--repeats`` times, interleaved (ftpipe, TRL, ftpipe, TRL, ...) so
that drift of a shared machine hits both sides, each run in its own subprocess (``ftpipe train``, or
``trl_sft_run.py`` for TRL).

Per run, over the optimizer steps after the first (warm-up) one: real (non-padding) tokens/s, padding share
(padded positions - real tokens) / padded positions, seconds per step, MFU = model FLOPs / (time x the
machine's matmul peak: the highest of the rates measured in this process with all cores before, between and
after the runs), model FLOPs from
``ftpipe.train.callbacks.step_flops`` for both sides; over the whole run: the peak resident memory of every
training process (``VmHWM``, polled from /proc for both sides alike) and the first and last loss. The
report gives per variant the median over repeats with the min-max spread and the ratio to TRL's default.

    python benchmarks/vs_trl.py                                     # 4 variants x 3 repeats
    python benchmarks/vs_trl.py --steps 3 --repeats 1 --variants ftpipe-packed,trl   # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRL_RUNNER = Path(__file__).resolve().with_name("trl_sft_run.py")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "vs_trl.json"
GIB = 1024**3
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "lightning", "datasets", "ftpipe")


@dataclass(frozen=True)
class Variant:
    """One benchmarked set-up: ``side`` is ``ftpipe`` or ``trl``; ``ftpipe_flags`` go to ``ftpipe train``."""

    name: str
    side: str
    description: str
    ftpipe_flags: tuple[str, ...] = ()
    trl_packing: bool = False
    trl_group_by_length: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("ftpipe-packed", "ftpipe", "ftpipe, packing (best-fit decreasing)", ("--packing", "true")),
        Variant(
            "ftpipe-grouped",
            "ftpipe",
            "ftpipe, no packing, length-grouped batches",
            ("--group_by_length", "true"),
        ),
        Variant("trl", "trl", "TRL SFTTrainer defaults (no packing, random batches)"),
        Variant("trl-packed", "trl", "TRL packing=True (bfd, padding-free)", trl_packing=True),
        Variant(
            "trl-grouped",
            "trl",
            "TRL, train_sampling_strategy=group_by_length",
            trl_group_by_length=True,
        ),
    )
}
DEFAULT_VARIANTS = ("ftpipe-packed", "ftpipe-grouped", "trl", "trl-packed")
#: The variant every ratio is taken against.
BASELINE = "trl"


@dataclass(frozen=True)
class Settings:
    """What both sides share, and how each side uses the cores."""

    model: str  # folder given to TRL (and to ftpipe unless hf_model_id is "embedded")
    hf_model_id: str
    config: Path
    prepared_dir: Path
    steps: int
    warmup_steps: int
    max_length: int
    micro_batch_size: int
    global_batch: int
    ftpipe_strategy: str
    ftpipe_processes: int
    trl_processes: int
    activation_checkpointing: str  # "default" (each side's own), "on" or "off" for both
    cpu_count: int
    lora: dict[str, Any]
    optim: dict[str, Any]

    def accumulation(self, processes: int) -> int:
        return self.global_batch // (self.micro_batch_size * processes)


# ------------------------------------------------------------------------------------------ metrics


def run_metrics(
    steps: Sequence[dict[str, Any]], total_params: int, trainable_params: int, peak_tflops: float
) -> dict[str, Any]:
    """Rates of one run over its steps after the first (all of them when there is only one).

    ``steps`` holds per optimizer step ``step_time_s``, ``tokens`` (real tokens over all processes) and
    ``padded_tokens`` (positions including padding).
    """
    from ftpipe.train.callbacks import step_flops

    measured = list(steps[1:] if len(steps) > 1 else steps)
    time_s = sum(s["step_time_s"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    padded = sum(s["padded_tokens"] for s in measured)
    flops = step_flops(total_params, trainable_params, tokens)
    achieved = flops / time_s / 1e12 if time_s > 0 else None
    return {
        "measured_steps": len(measured),
        "tokens_per_s": tokens / time_s if time_s > 0 else None,
        "s_per_step": time_s / len(measured) if measured else None,
        "padding_share": (padded - tokens) / padded if padded else None,
        "model_tflops_per_s": achieved,
        "mfu": achieved / peak_tflops if achieved is not None and peak_tflops > 0 else None,
        "flops_per_token": step_flops(total_params, trainable_params, 1),
        "real_tokens": tokens,
        "padded_tokens": padded,
    }


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that are not None."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarize(runs: Sequence[dict[str, Any]], variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per variant: medians and spreads over its successful runs, and the ratio of median real tokens/s to
    the TRL default's (``BASELINE``)."""
    out: dict[str, dict[str, Any]] = {}
    for name in variants:
        ok = [r for r in runs if r["variant"] == name and "error" not in r]
        failed = [r for r in runs if r["variant"] == name and "error" in r]
        per_process = [r["peak_rss_gib"] for r in ok]
        width = max((len(p) for p in per_process), default=0)
        out[name] = {
            "runs": len(ok),
            "failed_runs": len(failed),
            "processes": ok[0]["processes"] if ok else None,
            "threads_per_process": ok[0]["threads_per_process"] if ok else None,
            "tokens_per_s": spread([r["tokens_per_s"] for r in ok]),
            "s_per_step": spread([r["s_per_step"] for r in ok]),
            "padding_share": spread([r["padding_share"] for r in ok]),
            "mfu": spread([r["mfu"] for r in ok]),
            "peak_rss_gib_per_process": [
                statistics.median(p[i] for p in per_process if len(p) > i) for i in range(width)
            ],
            "peak_rss_gib_max_process": spread([max(p) for p in per_process if p]),
            "peak_rss_gib_all_processes": spread([sum(p) for p in per_process if p]),
            "activation_checkpointing": sorted(
                {"on" if r.get("gradient_checkpointing") else "off" for r in ok}
            ),
            "first_loss": spread([r["first_loss"] for r in ok]),
            "last_loss": spread([r["last_loss"] for r in ok]),
        }
    base = out.get(BASELINE, {}).get("tokens_per_s", {}).get("median")
    for entry in out.values():
        mine = entry["tokens_per_s"]["median"]
        entry["ratio_to_trl"] = mine / base if mine is not None and base else None
    return out


#: The targets for ``ftpipe-packed``: real tokens/s at least this many times TRL's default and TRL's
#: packing, MFU at least this, peak memory per process at most TRL default's, padding under this share.
TARGET_VS_TRL = 2.0
TARGET_VS_TRL_PACKED = 1.5
TARGET_MFU = 0.60
TARGET_PADDING = 0.05


def targets(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The targets for ``ftpipe-packed``: >= 2.0x TRL's default and >= 1.5x TRL's packing in real tokens/s,
    >= 60% MFU, at most TRL default's peak memory per process, padding under 5%."""
    ours, base, packed = summary.get("ftpipe-packed"), summary.get(BASELINE), summary.get("trl-packed")
    if not ours or not base or not ours["runs"] or not base["runs"]:
        return {"evaluated": False, "why": "needs successful runs of ftpipe-packed and trl"}
    ratio = ours["ratio_to_trl"]
    mine, theirs = ours["tokens_per_s"]["median"], (packed or {}).get("tokens_per_s", {}).get("median")
    ratio_packed = mine / theirs if mine is not None and theirs else None
    mfu = ours["mfu"]["median"]
    mem, base_mem = ours["peak_rss_gib_max_process"]["median"], base["peak_rss_gib_max_process"]["median"]
    pad = ours["padding_share"]["median"]
    return {
        "evaluated": True,
        "tokens_per_s_ratio": ratio,
        "tokens_per_s_ratio_met": ratio is not None and ratio >= TARGET_VS_TRL,
        "tokens_per_s_ratio_trl_packed": ratio_packed,
        "tokens_per_s_ratio_trl_packed_met": ratio_packed is not None
        and ratio_packed >= TARGET_VS_TRL_PACKED,
        "mfu": mfu,
        "mfu_met": mfu is not None and mfu >= TARGET_MFU,
        "peak_rss_gib_max_process": mem,
        "trl_peak_rss_gib_max_process": base_mem,
        "peak_memory_met": mem is not None and base_mem is not None and mem <= base_mem,
        "padding_share": pad,
        "padding_share_met": pad is not None and pad < TARGET_PADDING,
    }


# ------------------------------------------------------------------------------------------ memory


def _status_bytes(pid: int, name: str = "VmHWM") -> int | None:
    """A memory line of ``/proc/<pid>/status`` in bytes (``VmHWM``: peak resident set; ``RssAnon``: its
    anonymous part now, without file pages such as memory-mapped Arrow files)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class PeakMemory(threading.Thread):
    """Polls the peak resident set (``VmHWM``) of a process and its descendants until stopped.

    ``VmHWM`` belongs to the process image, so unlike ``ru_maxrss`` it does not include the resident set
    of the parent that started the process. Polled every ``interval_s``: growth in the last interval
    before a process exits is missed. ``anon_peaks`` keeps the highest polled ``RssAnon`` (the resident
    set without file-backed pages: memory-mapped files count in ``VmHWM`` but the kernel can drop them).
    """

    def __init__(self, root_pid: int, interval_s: float = 0.25):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self.anon_peaks: dict[int, int] = {}
        self.cmdlines: dict[int, list[str]] = {}
        self._stop_event = threading.Event()

    def _poll(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            value = _status_bytes(proc.pid)
            if value is None:
                continue
            self.peaks[proc.pid] = max(value, self.peaks.get(proc.pid, 0))
            anon = _status_bytes(proc.pid, "RssAnon") or 0
            self.anon_peaks[proc.pid] = max(anon, self.anon_peaks.get(proc.pid, 0))
            if proc.pid not in self.cmdlines:
                try:
                    self.cmdlines[proc.pid] = proc.cmdline()
                except psutil.Error:
                    self.cmdlines[proc.pid] = []

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._poll()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def training_processes(self, is_trainer: Callable[[list[str]], bool]) -> list[tuple[int, float]]:
        """``(pid, peak GiB)`` of the processes whose command line ``is_trainer`` accepts, in pid order."""
        return [(pid, self.peaks[pid] / GIB) for pid in sorted(self.peaks) if is_trainer(self.cmdlines[pid])]


def is_ftpipe_trainer(argv: list[str]) -> bool:
    """``python -m ftpipe train ...`` and the ranks Lightning starts (``python -m ftpipe.__main__ train ...``)."""
    return "train" in argv and any(a in ("ftpipe", "ftpipe.__main__") for a in argv)


def is_trl_trainer(argv: list[str]) -> bool:
    """A process running ``trl_sft_run.py``, not the ``torch.distributed.run`` launcher that starts them."""
    return any(a.endswith(TRL_RUNNER.name) for a in argv) and "torch.distributed.run" not in argv


def run_child(
    cmd: list[str],
    log_path: Path,
    is_trainer: Callable[[list[str]], bool],
    anon_peaks: dict[int, float] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, float, list[tuple[int, float]]]:
    """Run ``cmd`` (with ``env`` added to the environment) with its output in ``log_path`` while polling
    memory; (exit code, seconds, peak GiB of each training process). ``anon_peaks``, when given, receives
    the polled anonymous peak (GiB) of each."""
    env = {**os.environ, **CHILD_ENV, **(env or {})}
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        poller = PeakMemory(proc.pid)
        poller.start()
        code = proc.wait()
        poller.stop()
    peaks = poller.training_processes(is_trainer)
    if anon_peaks is not None:
        anon_peaks.update({pid: poller.anon_peaks.get(pid, 0) / GIB for pid, _ in peaks})
    return code, time.monotonic() - start, peaks


# ------------------------------------------------------------------------------------------ runs


def ftpipe_command(settings: Settings, variant: Variant, results: Path) -> list[str]:
    """``ftpipe train`` on the prepared split with the shared settings and the variant's flags."""
    s, n = settings, settings.ftpipe_processes
    return [
        sys.executable,
        "-m",
        "ftpipe",
        "train",
        "--config",
        str(s.config),
        "--hf_model_id",
        s.hf_model_id,
        "--prepared_dir",
        str(s.prepared_dir),
        "--results_dir",
        str(results),
        "--strategy",
        s.ftpipe_strategy,
        "--num_nodes",
        "1",
        "--gpus_per_node",
        str(n),
        "--precision",
        "32-true",
        "--max_seq_length",
        str(s.max_length),
        "--micro_batch_size",
        str(s.micro_batch_size),
        "--accumulate_grad_batches",
        str(s.accumulation(n)),
        "--max_steps",
        str(s.steps),
        "--warmup_steps",
        str(s.warmup_steps),
        "--val_check_interval",
        str(s.steps + 1),  # no validation
        "--early_stopping_patience",
        "0",
        "--activation_checkpointing",
        {"default": "auto", "on": "true", "off": "false"}[s.activation_checkpointing],
        "--lora_rank",
        str(s.lora["r"]),
        *variant.ftpipe_flags,
    ]


#: What a TRL run reports about itself and the benchmark keeps in its record.
TRL_FACTS = ("trl_num_tokens", "train_rows", "padding_free", "completion_only_loss", "gradient_checkpointing")


def run_record(
    settings: Settings,
    processes: int,
    threads: int,
    steps: list[dict[str, Any]],
    params: tuple[int, int],
    peaks: Sequence[tuple[int, float]],
    wall: float,
    peak_tflops: float,
    **extra: Any,
) -> dict[str, Any]:
    """The record of one run, either side: layout, steps, losses, parameters, memory and the rates."""
    total, trainable = params
    return {
        "processes": processes,
        "threads_per_process": threads,
        "accumulation": settings.accumulation(processes),
        "steps": steps,
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "total_params": total,
        "trainable_params": trainable,
        "peak_rss_gib": [gib for _, gib in peaks],
        **extra,
        "wall_s": wall,
        **run_metrics(steps, total, trainable, peak_tflops),
    }


def run_ftpipe(settings: Settings, variant: Variant, workdir: Path, peak_tflops: float) -> dict[str, Any]:
    """One ``ftpipe train`` run: its ``metrics.jsonl`` and ``train_summary.json`` as a run record."""
    results = workdir / "results"
    code, wall, peaks = run_child(
        ftpipe_command(settings, variant, results), workdir / "train.log", is_ftpipe_trainer
    )
    if code != 0:
        return {"error": f"ftpipe train exited with {code}", "log_tail": _tail(workdir / "train.log")}
    metrics = next(results.rglob("metrics.jsonl"))
    summary = json.loads(metrics.with_name("train_summary.json").read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [
        {k: r[k] for k in ("step", "step_time_s", "tokens", "padded_tokens", "label_tokens", "loss")}
        for r in records
        if "val_loss" not in r
    ]
    n = settings.ftpipe_processes
    chosen = re.search(r"activation checkpointing (on|off) \(auto\)", (workdir / "train.log").read_text())
    return run_record(
        settings,
        n,
        max(1, settings.cpu_count // n),
        steps,
        (summary["total_params"], summary["trainable_params"]),
        peaks,
        wall,
        peak_tflops,
        self_reported_peak_gib=summary["peak_mem_gib_per_rank"],  # ru_maxrss per rank
        self_reported_mfu=summary["mfu"],
        gradient_checkpointing=(chosen.group(1) == "on")
        if chosen
        else settings.activation_checkpointing == "on",
    )


def trl_spec(settings: Settings, variant: Variant, out_dir: Path) -> dict[str, Any]:
    """The JSON spec that ``trl_sft_run.py`` trains from."""
    s, n = settings, settings.trl_processes
    return {
        "model": s.model,
        "train_file": str(s.prepared_dir / "training.jsonl"),
        "out_dir": str(out_dir),
        "steps": s.steps,
        "micro_batch_size": s.micro_batch_size,
        "accumulation": s.accumulation(n),
        "warmup_steps": s.warmup_steps,
        "max_length": s.max_length,
        "packing": variant.trl_packing,
        "group_by_length": variant.trl_group_by_length,
        # None: TRL's own default (SFTConfig turns it on)
        "gradient_checkpointing": {"default": None, "on": True, "off": False}[s.activation_checkpointing],
        "threads": max(1, s.cpu_count // n),
        "lora": s.lora,
        **s.optim,
    }


def run_trl(settings: Settings, variant: Variant, workdir: Path, peak_tflops: float) -> dict[str, Any]:
    """One TRL run (one process, or ``torch.distributed.run`` with several): its per-rank records merged."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(trl_spec(settings, variant, workdir), indent=1), encoding="utf-8")
    n = settings.trl_processes
    launcher = [sys.executable]
    if n > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    code, wall, peaks = run_child(
        [*launcher, str(TRL_RUNNER), str(spec_path)], workdir / "train.log", is_trl_trainer
    )
    ranks = sorted(workdir.glob("rank*.json"))
    if code != 0 or len(ranks) != n:
        return {"error": f"TRL run exited with {code}", "log_tail": _tail(workdir / "train.log")}
    per_rank = [json.loads(p.read_text()) for p in ranks]
    first = per_rank[0]
    steps = []
    for i, step in enumerate(first["steps"]):
        steps.append(
            {
                "step": step["step"],
                "step_time_s": max(r["steps"][i]["step_time_s"] for r in per_rank),
                "tokens": sum(r["steps"][i]["tokens"] for r in per_rank),
                "padded_tokens": sum(r["steps"][i]["padded_tokens"] for r in per_rank),
                "micro_batches": step["micro_batches"],
                "loss": first["losses"][i] if i < len(first["losses"]) else None,
            }
        )
    return run_record(
        settings,
        n,
        first["threads"],
        steps,
        (first["total_params"], first["trainable_params"]),
        peaks,
        wall,
        peak_tflops,
        self_reported_peak_gib=[r["peak_vmhwm_gib"] for r in per_rank],  # VmHWM read in each rank
        self_reported_ru_maxrss_gib=[r["peak_ru_maxrss_gib"] for r in per_rank],
        **{k: first[k] for k in TRL_FACTS},
    )


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def interleave(names: Sequence[str]) -> list[str]:
    """The variants in alternating sides (ftpipe, trl, ftpipe, trl, ...), each side in the given order."""
    ours = [n for n in names if VARIANTS[n].side == "ftpipe"]
    peers = [n for n in names if VARIANTS[n].side == "trl"]
    order: list[str] = []
    for i in range(max(len(ours), len(peers))):
        order += ours[i : i + 1] + peers[i : i + 1]
    return order


# ------------------------------------------------------------------------------------------ set-up


def prepare_data(config: Path, data_dir: Path, log_path: Path) -> Path:
    """``ftpipe prepare`` of ``config`` into ``data_dir``; the folder holding ``training.jsonl``."""
    cmd = [sys.executable, "-m", "ftpipe", "prepare", "--config", str(config), "--data_dir", str(data_dir)]
    code, _, _ = run_child(cmd, log_path, lambda argv: False)
    if code != 0:
        raise SystemExit(f"ftpipe prepare failed ({code}):\n{_tail(log_path)}")
    return next(data_dir.rglob("training.jsonl")).parent


def measure_peak(threads: int) -> float:
    """fp32 matmul TFLOP/s on ``threads`` threads (``measure_cpu_matmul_tflops``); the thread count is
    restored afterwards."""
    import torch

    from ftpipe.train.callbacks import measure_cpu_matmul_tflops

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_cpu_matmul_tflops()
    finally:
        torch.set_num_threads(before)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    versions = {}
    for package in VERSIONED:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def build_settings(args: argparse.Namespace, prepared_dir: Path) -> Settings:
    from ftpipe.config.io import load_config
    from ftpipe.config.schema import EMBEDDED_MODEL

    cfg = load_config(args.config)
    cpus = os.cpu_count() or 1
    ftpipe_processes = 1 if args.ftpipe_strategy == "single" else cpus
    trl_processes = args.trl_processes or ftpipe_processes
    micro = args.micro_batch_size or cfg.train.micro_batch_size
    global_batch = args.global_batch or micro * cpus
    for side, n in (("ftpipe", ftpipe_processes), ("trl", trl_processes)):
        if global_batch % (micro * n):
            raise SystemExit(
                f"--global-batch {global_batch} is not a multiple of --micro-batch-size {micro} x {n} "
                f"{side} process(es): choose a global batch that both sides can reach"
            )
    if args.steps < 2:
        raise SystemExit("--steps: at least 2 (the first optimizer step is warm-up and not measured)")
    if args.model:
        model, hf_model_id = str(Path(args.model).resolve()), str(Path(args.model).resolve())
    else:
        from ftpipe.model.embedded import embedded_model_dir

        model, hf_model_id = str(embedded_model_dir()), EMBEDDED_MODEL
    t = cfg.train
    return Settings(
        model=model,
        hf_model_id=hf_model_id,
        config=args.config.resolve(),
        prepared_dir=prepared_dir,
        steps=args.steps,
        warmup_steps=min(t.warmup_steps, args.steps - 1),
        max_length=args.max_length or cfg.data.max_seq_length,
        micro_batch_size=micro,
        global_batch=global_batch,
        ftpipe_strategy=args.ftpipe_strategy,
        ftpipe_processes=ftpipe_processes,
        trl_processes=trl_processes,
        activation_checkpointing=args.activation_checkpointing,
        cpu_count=cpus,
        lora={
            "r": args.lora_rank or cfg.lora.lora_rank,
            "alpha": cfg.lora.lora_alpha,
            "dropout": cfg.lora.lora_dropout,
            "target_modules": list(cfg.lora.lora_target_modules),
        },
        optim={
            "learning_rate": t.learning_rate,
            "min_lr": t.min_lr,
            "adam_beta1": t.adam_beta1,
            "adam_beta2": t.adam_beta2,
            "weight_decay": t.weight_decay,
            "max_grad_norm": t.gradient_clip_val,
            "seed": t.seed,
        },
    )


# ------------------------------------------------------------------------------------------ report

DIFFERENCES = (
    "Tokens: TRL's completion is the rendered conversation after the generation prompt, i.e. the answer, "
    "the end-of-turn token and the template's newline after it (SmolLM2: one token more per sample, trained "
    "on); ftpipe ends the answer at EOS.",
    "Truncation to the maximum length: ftpipe cuts the prompt from the left and keeps the answer; TRL keeps "
    "the start and cuts the end of the answer (bfd packing truncates the same way).",
    "Warm-up: transformers' linear warm-up gives step k the rate peak x (k-1)/warmup (0 at the first step), "
    "ftpipe's peak x k/warmup; both then follow a cosine to min_lr at the last step.",
    "Loss: ftpipe runs the cross-entropy over the labelled positions only, loss_chunk_size at a time; TRL "
    "1.16's fused LM head scores every position on the CPU (prompt and padding included; it compacts to "
    "labelled positions only on CUDA/XPU) and also computes entropy and top-1 accuracy for its logs.",
    "Packing: ftpipe packs best-fit decreasing into rows of max length and keeps the rows of a micro-batch "
    "apart (block-diagonal mask, sdpa); TRL's bfd packing forces padding-free mode, which concatenates the "
    "micro-batch's packed rows into one row (sdpa gets the block-diagonal mask from the position ids).",
    "Batches: TRL's random sampler and ftpipe's seeded shuffle both use seed 42 (without packing and grouping "
    "the first steps of both saw the same rows in development runs); length grouping and packing change the "
    "order on each side.",
    "Saving: ftpipe writes its last checkpoint (LoRA weights and optimizer state) after the final step, "
    "outside the timed steps; TRL saves nothing (save_strategy no).",
    "Step time: ftpipe sums the time inside its training batches; TRL's runs from on_step_begin to "
    "on_step_end. Both leave out data loading and logging; both include forward, backward, clipping and the "
    "optimizer step.",
)


def _fmt(x: float | None, pattern: str) -> str:
    return "n/a" if x is None else pattern.format(x)


def markdown(report: dict[str, Any]) -> str:
    """The Markdown table of the report, then the settings, the targets and the known differences."""
    s, summary = report["settings"], report["summary"]
    lines = [
        "# ftpipe vs TRL SFTTrainer + PEFT LoRA",
        "",
        f"{report['machine']['cpu']}, {report['machine']['cpu_count']} cores; "
        + ", ".join(f"{k} {v}" for k, v in report["machine"]["versions"].items() if v)
        + f". {report['repeats']} repeat(s) per variant, interleaved; medians over repeats, [min-max]; "
        f"rates over steps 2-{s['steps']}.",
        "",
        "| variant | processes x threads | checkpointing | real tokens/s | ratio to TRL default | padding | "
        "peak RSS per process (GiB) | MFU | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in summary.items():
        if not v["runs"]:
            lines.append(f"| {name} | failed ({v['failed_runs']} run(s)) | | | | | | | |")
            continue
        tps = v["tokens_per_s"]
        lines.append(
            f"| {name} | {v['processes']} x {v['threads_per_process']} | "
            f"{'/'.join(v['activation_checkpointing'])} | "
            f"{_fmt(tps['median'], '{:.1f}')} [{_fmt(tps['min'], '{:.1f}')}-{_fmt(tps['max'], '{:.1f}')}] | "
            f"{_fmt(v['ratio_to_trl'], '{:.2f}x')} | {_fmt(v['padding_share']['median'], '{:.1%}')} | "
            f"{', '.join(f'{g:.2f}' for g in v['peak_rss_gib_per_process'])} | "
            f"{_fmt(v['mfu']['median'], '{:.1%}')} | {_fmt(v['s_per_step']['median'], '{:.2f}')} |"
        )
    t = report["targets"]
    lines += ["", "## Settings (both sides)", ""]
    lines += [
        f"- model: {s['model']} (fp32, sdpa attention, CPU); LoRA r={s['lora']['r']} alpha={s['lora']['alpha']} "
        f"dropout={s['lora']['dropout']} on {', '.join(s['lora']['target_modules'])}",
        f"- data: {s['prepared_dir']}/training.jsonl, prepared once by `ftpipe prepare --config "
        f"{s['config']}`; TRL gets its rows as conversational prompt-completion rows (completion-only loss)",
        f"- max length {s['max_length']}; micro-batch {s['micro_batch_size']} rows; {s['global_batch']} rows "
        f"per optimizer step (ftpipe {s['ftpipe_strategy']}: {s['ftpipe_processes']} process(es) x "
        f"accumulation {s['ftpipe_accumulation']}; TRL: {s['trl_processes']} process(es) x accumulation "
        f"{s['trl_accumulation']}{', torch.distributed.run, DDP over gloo' if s['trl_processes'] > 1 else ''})",
        f"- {s['steps']} optimizer steps (the first is warm-up, not measured); AdamW lr {s['optim']['learning_rate']} "
        f"betas {s['optim']['adam_beta1']}/{s['optim']['adam_beta2']} weight decay {s['optim']['weight_decay']}, "
        f"{s['warmup_steps']} warm-up step(s), cosine to {s['optim']['min_lr']}, clipping at "
        f"{s['optim']['max_grad_norm']}; activation checkpointing: "
        + (
            "each side's default (ftpipe: auto, from its memory estimate; TRL: on)"
            if s["activation_checkpointing"] == "default"
            else f"{s['activation_checkpointing']}, on both sides"
        )
        + "; no evaluation",
        f"- MFU against {report['peak_tflops']:.3f} TFLOP/s, the highest of {len(report['peak_tflops_samples'])} "
        f"fp32 2048x2048 matmul measurements with {s['cpu_count']} threads before, between and after the runs "
        f"(lowest: {min(report['peak_tflops_samples']):.3f}; 1 thread at the start: "
        f"{report['peak_tflops_1_thread']:.3f}); model FLOPs (4 N_total + 2 N_trainable) per real token",
        "- peak RSS: VmHWM of each training process, polled from /proc for both sides",
        "- malloc: "
        + (
            f"GLIBC_TUNABLES={report['settings']['glibc_tunables']} for both sides"
            if report["settings"].get("glibc_tunables")
            else "each side's default (the ftpipe command starts with glibc's tcache and fast bins off, "
            "ftpipe.utils.allocator; TRL with glibc's defaults)"
        ),
        f"- load average (1 min) before the runs: {report['loadavg_start']:.2f}, after: {report['loadavg_end']:.2f}",
        "",
        "## Targets (ftpipe-packed)",
        "",
    ]
    if t.get("evaluated"):

        def met(key: str) -> str:
            return "met" if t[key] else "NOT met"

        lines += [
            f"- real tokens/s {t['tokens_per_s_ratio']:.2f}x TRL's default (target >= {TARGET_VS_TRL}x): "
            f"{met('tokens_per_s_ratio_met')}",
            f"- real tokens/s {_fmt(t['tokens_per_s_ratio_trl_packed'], '{:.2f}x')} TRL with packing (target >= "
            f"{TARGET_VS_TRL_PACKED}x): {met('tokens_per_s_ratio_trl_packed_met')}",
            f"- MFU {_fmt(t['mfu'], '{:.1%}')} (target >= {TARGET_MFU:.0%}): {met('mfu_met')}",
            f"- peak RSS of the largest process {t['peak_rss_gib_max_process']:.2f} GiB vs TRL "
            f"{t['trl_peak_rss_gib_max_process']:.2f} GiB: {met('peak_memory_met')}",
            f"- padding share {t['padding_share']:.1%} (target < {TARGET_PADDING:.0%}): {met('padding_share_met')}",
        ]
    else:
        lines.append(f"- not evaluated: {t['why']}")
    lines += ["", "## Known differences", ""] + [f"- {d}" for d in DIFFERENCES]
    failures = [r for r in report["runs"] if "error" in r]
    if failures:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['variant']} (repeat {r['repeat']}): {r['error']}" for r in failures]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def write_report(out: Path, report: Any, md: str) -> None:
    """The JSON report at ``out``, its Markdown beside it (``.md``), and the Markdown on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    sys.stdout.write(md)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "benchmark.yaml")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report (Markdown beside it, .md)")
    parser.add_argument(
        "--ftpipe-strategy",
        default="ddp",
        choices=["single", "fsdp2", "fsdp1", "ddp"],
        help="single: 1 process x all cores; the others: one process per core, 1 thread each (ddp, the "
        "default, was the fastest on the 2-core development machine: 140 real tokens/s against 119 for "
        "fsdp2 and 104 for single; a 135M model needs no sharding, and LoRA's DDP only all-reduces the "
        "adapters' gradients)",
    )
    parser.add_argument(
        "--trl-processes",
        type=int,
        default=None,
        help="1: one process with all cores as torch threads; n>1: torch.distributed.run, DDP over gloo "
        "(default: as many processes as ftpipe runs)",
    )
    parser.add_argument("--max-length", type=int, default=None, help="default: the config's max_seq_length")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward and process")
    parser.add_argument(
        "--global-batch", type=int, default=None, help="rows per optimizer step (default: micro x cores)"
    )
    parser.add_argument(
        "--activation-checkpointing",
        choices=["default", "on", "off"],
        default="default",
        help="default: each side's own (ftpipe auto, TRL on); on / off: the same for both",
    )
    parser.add_argument(
        "--lora-rank", type=int, default=None, help="LoRA rank of both sides (default: the config's)"
    )
    parser.add_argument("--model", default=None, help="model folder for both sides (default: embedded)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data, logs and runs here")
    args = parser.parse_args(argv)
    if args.trl_processes is not None and args.trl_processes < 1:
        parser.error("--trl-processes: at least 1")
    unknown = [v for v in args.variants.split(",") if v.strip() not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ftpipe.utils.logging import get_logger, setup_logging

    setup_logging()
    log = get_logger("benchmarks.vs_trl")
    args = parse_args(argv)
    variants = interleave([v.strip() for v in args.variants.split(",")])
    cpus = os.cpu_count() or 1
    peak = measure_peak(cpus)
    peak_1 = measure_peak(1)
    log.info("matmul peak: %.3f TFLOP/s on %d threads, %.3f on 1", peak, cpus, peak_1)
    peaks = [peak]
    with tempfile.TemporaryDirectory(prefix="ftpipe-vs-trl-") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = prepare_data(args.config.resolve(), work / "data", work / "prepare.log")
        settings = build_settings(args, prepared)
        loadavg_start = os.getloadavg()[0]
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            for name in variants:
                variant = VARIANTS[name]
                run_dir = work / "runs" / f"{name}-{repeat}"
                run_dir.mkdir(parents=True, exist_ok=True)
                load = os.getloadavg()[0]
                runner = run_ftpipe if variant.side == "ftpipe" else run_trl
                record = {"variant": name, "side": variant.side, "repeat": repeat, "loadavg_before": load}
                record.update(runner(settings, variant, run_dir, peak))
                runs.append(record)
                peaks.append(measure_peak(cpus))
                if "error" in record:
                    log.warning("%s repeat %d failed: %s (log: %s)", name, repeat, record["error"], run_dir)
                else:
                    log.info(
                        "%s repeat %d: %.1f real tokens/s, %.2f s/step, padding %.1f%%, peak RSS %s GiB",
                        name,
                        repeat,
                        record["tokens_per_s"],
                        record["s_per_step"],
                        100 * record["padding_share"],
                        ", ".join(f"{g:.2f}" for g in record["peak_rss_gib"]),
                    )
        # MFU against the best rate the machine delivered during the invocation (a busy moment lowers one
        # measurement, never raises it)
        peak = max(peaks)
        for record in runs:
            if record.get("model_tflops_per_s") is not None:
                record["mfu"] = record["model_tflops_per_s"] / peak
        summary = summarize(runs, variants)
        report = {
            "benchmark": "vs_trl",
            "machine": machine_info(),
            "repeats": args.repeats,
            "variants": {n: VARIANTS[n].description for n in variants},
            "peak_tflops": peak,
            "peak_tflops_1_thread": peak_1,
            "peak_tflops_samples": peaks,  # at the start and after every run: drift of a shared machine
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg()[0],
            "settings": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
                "ftpipe_accumulation": settings.accumulation(settings.ftpipe_processes),
                "trl_accumulation": settings.accumulation(settings.trl_processes),
                # set for the whole invocation, both sides run with it (ftpipe's command then keeps it)
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            },
            "summary": summary,
            "targets": targets(summary),
            "differences": list(DIFFERENCES),
            "runs": runs,
        }
    write_report(args.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
