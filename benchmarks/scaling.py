"""How cost grows with the sequence length and the LoRA rank: ftpipe and TRL side by side, with packing.

    python benchmarks/scaling.py                       # lengths 256-2048 at rank 32, ranks 8-128 at 256
    python benchmarks/scaling.py --lengths 256,512 --ranks 8 --steps 3

Every point is one ``vs_trl.py`` invocation of the ``ftpipe-packed`` and ``trl-packed`` variants (each side
at its defaults: ftpipe's ``auto`` activation checkpointing, TRL's on) with micro-batch 1 row, so that a
micro-batch holds one packed row of ``max_seq_length`` tokens, 2 rows per optimizer step. The table
(``results/scaling.md``, every run in ``results/scaling.json``) gives per point and side the real tokens/s,
MFU, the peak memory of the largest process, and ftpipe's ratio to TRL.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "scaling.json"
SIDES = ("ftpipe-packed", "trl-packed")


def _vs_trl():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", HERE / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def point(vs_trl, work: Path, steps: int, length: int, rank: int) -> dict[str, Any]:
    """One ``vs_trl`` invocation at ``length`` tokens and LoRA rank ``rank``; the figures of both sides."""
    out = work / f"len{length}-r{rank}.json"
    report = vs_trl.main(
        [
            "--variants",
            ",".join(SIDES),
            "--repeats",
            "1",
            "--steps",
            str(steps),
            "--max-length",
            str(length),
            "--lora-rank",
            str(rank),
            "--micro-batch-size",
            "1",
            "--workdir",
            str(work / f"len{length}-r{rank}"),
            "--out",
            str(out),
        ]
    )
    row: dict[str, Any] = {"max_length": length, "lora_rank": rank, "peak_tflops": report["peak_tflops"]}
    for side in SIDES:
        v = report["summary"][side]
        row[side] = {
            "tokens_per_s": v["tokens_per_s"]["median"],
            "mfu": v["mfu"]["median"],
            "peak_rss_gib_max_process": v["peak_rss_gib_max_process"]["median"],
            "activation_checkpointing": v["activation_checkpointing"],
            "s_per_step": v["s_per_step"]["median"],
        }
    ours, theirs = row[SIDES[0]]["tokens_per_s"], row[SIDES[1]]["tokens_per_s"]
    row["ratio"] = ours / theirs if ours and theirs else None
    row["runs"] = report["runs"]
    return row


def _f(x: float | None, pattern: str) -> str:
    return "n/a" if x is None else pattern.format(x)


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "# Scaling: sequence length and LoRA rank (packing, micro-batch 1 row, 2 rows per step)",
        "",
        f"{machine['cpu']}, {machine['cpu_count']} cores; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
        + ". One run per point; rates over the steps after the first.",
        "",
        "| max length | LoRA rank | ftpipe tokens/s | ftpipe MFU | ftpipe peak (GiB) | ftpipe checkpointing | "
        "TRL tokens/s | TRL MFU | TRL peak (GiB) | ftpipe / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r[SIDES[0]], r[SIDES[1]]
        lines.append(
            f"| {r['max_length']} | {r['lora_rank']} | {_f(a['tokens_per_s'], '{:.1f}')} | {_f(a['mfu'], '{:.0%}')} | "
            f"{_f(a['peak_rss_gib_max_process'], '{:.2f}')} | {'/'.join(a['activation_checkpointing'])} | "
            f"{_f(b['tokens_per_s'], '{:.1f}')} | {_f(b['mfu'], '{:.0%}')} | "
            f"{_f(b['peak_rss_gib_max_process'], '{:.2f}')} | {_f(r['ratio'], '{:.2f}x')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512,1024,2048")
    parser.add_argument("--ranks", default="8,128", help="ranks measured at the shortest length (besides 32)")
    parser.add_argument("--base-rank", type=int, default=32, help="the rank of the length series")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    vs_trl = _vs_trl()
    points = [(n, args.base_rank) for n in lengths] + [(lengths[0], r) for r in ranks if r != args.base_rank]
    with tempfile.TemporaryDirectory(prefix="ftpipe-scaling-") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp)
        rows = [point(vs_trl, work, args.steps, n, r) for n, r in points]
    rows.sort(key=lambda r: (r["lora_rank"] != args.base_rank, r["max_length"], r["lora_rank"]))
    machine = vs_trl.machine_info()
    vs_trl.write_report(args.out, {"machine": machine, "points": rows}, markdown(rows, machine))
    return rows


if __name__ == "__main__":
    main()
