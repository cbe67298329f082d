"""Training throughput of the demo configuration: tokens/s, padding share, MFU and peak memory per rank.

Runs ``ftpipe train`` (as a subprocess: Lightning's launcher re-runs the command line for the other
ranks) for a fixed number of optimizer steps without validation, reads the run's ``metrics.jsonl`` and
``train_summary.json``, writes a JSON report and prints a table. Rates leave out the first (warm-up)
step; MFU uses the training stage's FLOPs estimate ``(4 N_total + 2 N_trainable) x real tokens`` over
the per-device peak (configured, a GPU table, or a measured fp32 matmul on the CPU).

    python benchmarks/train_throughput.py                       # demo config, 10 steps, FSDP2 x 2
    python benchmarks/train_throughput.py --steps 6 --strategies fsdp2,fsdp1 -- --max_seq_length 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "train_throughput.json"


def _run_one(config: Path, strategy: str, steps: int, extra: list[str], workdir: Path) -> dict:
    results = workdir / strategy
    cmd = [
        sys.executable,
        "-m",
        "ftpipe",
        "train",
        "--config",
        str(config),
        "--strategy",
        strategy,
        "--max_steps",
        str(steps),
        "--val_check_interval",
        str(steps + 1),  # no validation: training steps only
        "--results_dir",
        str(results),
        "--data_dir",
        str(workdir / "data"),
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    log_path = workdir / f"{strategy}.log"
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"ftpipe train ({strategy}) failed with exit code {proc.returncode}:\n{tail}")
    metrics = next(results.rglob("metrics.jsonl"))
    summary = json.loads((metrics.parent / "train_summary.json").read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps_records = [r for r in records if "val_loss" not in r]
    return {
        "strategy": strategy,
        "steps": summary["steps"],
        "world_size": summary["world_size"],
        "tokens_per_s": summary["tokens_per_s"],
        "mean_step_time_s": summary["mean_step_time_s"],
        "padding_share": summary["padding_share"],
        "mfu": summary["mfu"],
        "peak_tflops_total": summary["peak_tflops_total"],
        "peak_mem_gib_per_rank": summary["peak_mem_gib_per_rank"],
        "total_params": summary["total_params"],
        "trainable_params": summary["trainable_params"],
        "first_loss": steps_records[0]["loss"],
        "last_loss": steps_records[-1]["loss"],
        "wall_s": wall,
    }


def _torch_version() -> str:
    import torch

    return torch.__version__


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ftpipe train throughput (steps 2+)")
    for column in (
        "strategy",
        "ranks",
        "tokens/s",
        "s/step",
        "padding",
        "MFU",
        "peak mem/rank (GiB)",
        "wall (s)",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["strategy"],
            str(r["world_size"]),
            f"{r['tokens_per_s']:.1f}",
            f"{r['mean_step_time_s']:.2f}",
            f"{100 * r['padding_share']:.1f}%",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
            ", ".join(f"{g:.2f}" for g in r["peak_mem_gib_per_rank"]),
            f"{r['wall_s']:.0f}",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "benchmark.yaml")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--strategies", default="fsdp2", help="comma-separated: fsdp2,fsdp1,ddp")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    parser.add_argument(
        "extra", nargs="*", help="further flat overrides after --, e.g. -- --max_seq_length 128"
    )
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="ftpipe-bench-") as tmp:
        for strategy in args.strategies.split(","):
            rows.append(_run_one(args.config, strategy.strip(), args.steps, args.extra, Path(tmp)))
    report = {
        "benchmark": "train_throughput",
        "config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
        "overrides": args.extra,
        "steps": args.steps,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": _torch_version(),
        },
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    _print_table(rows)
    return report


if __name__ == "__main__":
    main()
