"""Data at scale: ``ftpipe prepare`` plus the tokenization of the training split, against TRL's dataset
preparation of the same rows, at growing row counts (time, and the peak memory of every process).

    python benchmarks/data_scale.py                                   # 100k, 300k and 1M rows
    python benchmarks/data_scale.py --rows 20000,60000 --no-trl       # a quick look

The rows come from ``make_large_alpaca.py`` (seeded; the smaller files are the first rows of the largest).
Per row count, each step runs in its own subprocess (imports and start-up included in its wall time; the
step's own time is measured inside it):

- ``ftpipe prepare`` (``configs/benchmark.yaml`` with ``max_samples: null``): read the raw JSONL, render the
  alpaca rows through the chat template's message form, split 90/5/5 (seeded), write the three JSONL files;
- ftpipe's tokenization of the training split, as ``ftpipe train`` runs it (``SFTDataset`` as the first
  process of a node: every core in worker processes on splits of 40,000 rows or more, into an on-disk
  cache that the other processes memory-map);
- TRL (when installed): ``datasets.load_dataset("json")`` of the same raw file, a ``map`` to
  conversational prompt-completion rows (the user turn as ftpipe renders it, the answer), and
  ``SFTTrainer``'s own preparation of the data set in its constructor (chat template, tokenization,
  truncation to the same maximum length) with ``dataset_num_proc`` equal to ftpipe's worker count. The
  model is loaded before the clock starts.

Memory: the peak resident set (``VmHWM``) of every process of each step, polled from /proc (the
coordinator and its workers). The report (``results/data_scale.json`` and ``.md``) gives per row count and
side the time, rows per second, the largest per-process peak, and the time per row relative to the
smallest run (1.0 means linear).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = HERE / "results" / "data_scale.json"
GIB = 1024**3
#: The memory target per process.
TARGET_GIB = 2.0


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ children


def tokenize_child(config: Path, train_file: Path) -> dict[str, Any]:
    """In a subprocess: tokenize ``train_file`` as ``ftpipe train``'s first process does; its figures."""
    from ftpipe.config.io import load_config
    from ftpipe.data.dataset import ROWS_PER_PROC, SFTDataset
    from ftpipe.model.tokenizer import load_tokenizer

    cfg = load_config(config)
    tokenizer = load_tokenizer(cfg.model)
    start = time.perf_counter()
    ds = SFTDataset(train_file, tokenizer, cfg.data, name="train", role="leader")
    seconds = time.perf_counter() - start
    rows = ds.stats.rows
    return {
        "seconds": seconds,
        "rows": rows,
        "samples": len(ds),
        "tokens": ds.stats.tokens,
        "num_proc": max(1, min(os.cpu_count() or 1, rows // ROWS_PER_PROC)),
    }


def trl_child(
    raw_file: Path, model_dir: str, num_proc: int, max_length: int, out_dir: Path
) -> dict[str, Any]:
    """In a subprocess: TRL's preparation of ``raw_file`` (load, map to prompt-completion, SFTTrainer)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def to_messages(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
        user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }

    start = time.perf_counter()
    raw = datasets.load_dataset(
        "json", data_files=str(raw_file), split="train", cache_dir=str(out_dir / "hf")
    )
    rows = raw.map(to_messages, remove_columns=raw.column_names, num_proc=num_proc if num_proc > 1 else None)
    loaded = time.perf_counter()
    args = SFTConfig(
        output_dir=str(out_dir / "trainer"),
        max_length=max_length,
        dataset_num_proc=num_proc if num_proc > 1 else None,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    end = time.perf_counter()
    return {
        "seconds": end - start,
        "load_and_map_s": loaded - start,
        "sft_trainer_s": end - loaded,
        "rows": len(rows),
        "samples": len(trainer.train_dataset),
        "tokens": int(sum(len(x) for x in trainer.train_dataset["input_ids"])),
        "num_proc": num_proc,
    }


# ------------------------------------------------------------------------------------------ steps


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _step(
    vs_trl, cmd: list[str], log_path: Path, env: dict[str, str], result: Path | None = None
) -> dict[str, Any]:
    """Run one step in a subprocess with its memory polled; its exit code, wall time and peaks."""
    anon: dict[int, float] = {}
    code, wall, peaks = vs_trl.run_child(cmd, log_path, lambda argv: True, anon, env)
    record: dict[str, Any] = {
        "exit_code": code,
        "wall_s": wall,
        "peak_gib_per_process": sorted((gib for _, gib in peaks), reverse=True),
        "peak_gib_max": max((gib for _, gib in peaks), default=None),
        "anon_peak_gib_per_process": sorted(anon.values(), reverse=True),
        "anon_peak_gib_max": max(anon.values(), default=None),
        "processes": len(peaks),
    }
    if code != 0:
        record["error"] = log_path.read_text(errors="replace")[-3000:]
    elif result is not None:
        record.update(json.loads(result.read_text()))
    return record


def _first_rows(big: Path, n: int, out: Path) -> Path:
    if not out.is_file():
        with open(big, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
            for i, line in enumerate(src):
                if i >= n:
                    break
                dst.write(line)
    return out


def run_size(vs_trl, args: argparse.Namespace, big: Path, n: int, work: Path) -> dict[str, Any]:
    """prepare, tokenize and (optionally) TRL for the first ``n`` rows."""
    folder = work / f"rows-{n}"
    folder.mkdir(parents=True, exist_ok=True)
    raw = big if n == args.max_rows else _first_rows(big, n, folder / "alpaca.jsonl")
    env = {"HF_DATASETS_CACHE": str(folder / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    config = folder / "config.yaml"
    from ftpipe.config.io import load_config, save_config

    cfg = load_config(args.config).replace(
        dataset=str(raw), max_samples=None, data_dir=str(folder / "data"), results_dir=str(folder / "results")
    )
    config = save_config(cfg, folder)
    out: dict[str, Any] = {"rows": n}
    out["prepare"] = _step(
        vs_trl, _python("-m", "ftpipe", "prepare", "--config", str(config)), folder / "prepare.log", env
    )
    train_files = list((folder / "data").rglob("training.jsonl"))
    if out["prepare"]["exit_code"] != 0 or not train_files:
        return out
    result = folder / "tokenize.json"
    out["tokenize"] = _step(
        vs_trl,
        _python(
            str(Path(__file__).resolve()), "--tokenize-child", str(config), str(train_files[0]), str(result)
        ),
        folder / "tokenize.log",
        env,
        result,
    )
    if args.trl:
        from ftpipe.model.embedded import embedded_model_dir

        procs = out["tokenize"].get("num_proc", 1)
        result = folder / "trl.json"
        out["trl"] = _step(
            vs_trl,
            _python(
                str(Path(__file__).resolve()),
                "--trl-child",
                str(raw),
                str(embedded_model_dir()),
                str(procs),
                str(cfg.data.max_seq_length),
                str(folder / "trl"),
                str(result),
            ),
            folder / "trl.log",
            env,
            result,
        )
    return out


# ------------------------------------------------------------------------------------------ report


def summarize(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """ftpipe's time (prepare + tokenize) and peak per process per size, per-row time relative to the
    smallest size, TRL's, and the ratio of TRL's time to ftpipe's."""
    table = []
    base_ftpipe = base_trl = None
    for size in sizes:
        n = size["rows"]
        prep, tok, trl = size.get("prepare", {}), size.get("tokenize", {}), size.get("trl")
        ok = prep.get("exit_code") == 0 and tok.get("exit_code") == 0
        ours = prep.get("wall_s", 0) + tok.get("wall_s", 0) if ok else None
        ours_inner = (
            prep.get("wall_s", 0) + tok.get("seconds", 0) if ok else None
        )  # prepare has no inner clock: its wall time
        peak = max(prep.get("peak_gib_max") or 0, tok.get("peak_gib_max") or 0) if ok else None
        anon = max(prep.get("anon_peak_gib_max") or 0, tok.get("anon_peak_gib_max") or 0) if ok else None
        theirs = trl.get("seconds") if trl and trl.get("exit_code") == 0 else None
        theirs_wall = trl.get("wall_s") if trl and trl.get("exit_code") == 0 else None
        # linearity from each step's own clock (prepare: its wall time), without the imports of the tokenize
        # and TRL steps and TRL's model load
        if ours_inner is not None and base_ftpipe is None:
            base_ftpipe = (n, ours_inner)
        if theirs is not None and base_trl is None:
            base_trl = (n, theirs)
        table.append(
            {
                "rows": n,
                "ftpipe_s": ours,
                "ftpipe_prepare_s": prep.get("wall_s"),
                "ftpipe_tokenize_s": tok.get("wall_s"),
                "ftpipe_tokenize_inner_s": tok.get("seconds"),
                "ftpipe_inner_s": ours_inner,
                "ftpipe_rows_per_s": n / ours if ours else None,
                "ftpipe_per_row_vs_smallest": (ours_inner / n) / (base_ftpipe[1] / base_ftpipe[0])
                if ours_inner and base_ftpipe
                else None,
                "ftpipe_peak_gib_max_process": peak,
                "ftpipe_anon_peak_gib_max_process": anon,
                "ftpipe_peak_gib_prepare": prep.get("peak_gib_per_process"),
                "ftpipe_peak_gib_tokenize": tok.get("peak_gib_per_process"),
                "ftpipe_tokens": tok.get("tokens"),
                "ftpipe_num_proc": tok.get("num_proc"),
                "trl_s": theirs_wall,
                "trl_inner_s": theirs,
                "trl_rows_per_s": n / theirs_wall if theirs_wall else None,
                "trl_per_row_vs_smallest": (theirs / n) / (base_trl[1] / base_trl[0])
                if theirs and base_trl
                else None,
                "trl_peak_gib_max_process": trl.get("peak_gib_max") if trl else None,
                "trl_anon_peak_gib_max_process": trl.get("anon_peak_gib_max") if trl else None,
                "trl_peak_gib_per_process": trl.get("peak_gib_per_process") if trl else None,
                "trl_tokens": trl.get("tokens") if trl else None,
                "trl_over_ftpipe_time": theirs_wall / ours if theirs_wall and ours else None,
            }
        )
    peaks = [row["ftpipe_peak_gib_max_process"] for row in table if row["ftpipe_peak_gib_max_process"]]
    ratios = [row["ftpipe_per_row_vs_smallest"] for row in table if row["ftpipe_per_row_vs_smallest"]]
    return {
        "table": table,
        "memory_met": bool(peaks) and max(peaks) < TARGET_GIB,
        "max_peak_gib": max(peaks) if peaks else None,
        "largest_per_row_vs_smallest": ratios[-1] if ratios else None,
    }


def _f(x: float | None, pattern: str) -> str:
    return "n/a" if x is None else pattern.format(x)


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        "# Data at scale: ftpipe prepare + tokenization vs TRL's dataset preparation",
        "",
        f"{report['machine']['cpu']}, {report['machine']['cpu_count']} cores; "
        + ", ".join(f"{k} {v}" for k, v in report["machine"]["versions"].items() if v)
        + f". Generated alpaca JSONL ({report['bytes_per_row']:.0f} bytes per row), max length "
        f"{report['max_length']}, chat template of the embedded SmolLM2.",
        "",
        "| rows | ftpipe prepare (s) | ftpipe tokenize (s) | ftpipe total (s) | rows/s | per-row time vs "
        "smallest | peak per process (GiB): resident / anonymous | TRL (s) | TRL per-row time vs smallest | "
        "TRL peak per process (GiB): resident / anonymous | TRL / ftpipe time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in s["table"]:
        lines.append(
            f"| {row['rows']:,} | {_f(row['ftpipe_prepare_s'], '{:.0f}')} | {_f(row['ftpipe_tokenize_s'], '{:.0f}')}"
            f" | {_f(row['ftpipe_s'], '{:.0f}')} | {_f(row['ftpipe_rows_per_s'], '{:,.0f}')} | "
            f"{_f(row['ftpipe_per_row_vs_smallest'], '{:.2f}')} | {_f(row['ftpipe_peak_gib_max_process'], '{:.2f}')}"
            f" / {_f(row['ftpipe_anon_peak_gib_max_process'], '{:.2f}')} | "
            f"{_f(row['trl_s'], '{:.0f}')} | {_f(row['trl_per_row_vs_smallest'], '{:.2f}')} | "
            f"{_f(row['trl_peak_gib_max_process'], '{:.2f}')} / {_f(row['trl_anon_peak_gib_max_process'], '{:.2f}')} | "
            f"{_f(row['trl_over_ftpipe_time'], '{:.2f}x')} |"
        )
    lines += [
        "",
        f"- memory target (every process under {TARGET_GIB:.0f} GiB): "
        f"{'met' if s['memory_met'] else 'NOT met'} (largest {_f(s['max_peak_gib'], '{:.2f}')} GiB)",
        f"- per-row time of the largest run against the smallest: {_f(s['largest_per_row_vs_smallest'], '{:.2f}')}"
        " (1.0 = linear)",
        "- peak per process: the resident set's high-water mark (`VmHWM`, file pages of memory-mapped Arrow "
        "files included) / the highest anonymous resident set polled every 0.25 s (`RssAnon`, without them); the "
        "target is on the first",
        "- times are wall times of each step's subprocess (Python start-up and imports included, about 5-10 s "
        "per step; TRL's include loading its model); the per-row columns use each step's own clock (prepare: "
        "its wall time; tokenize and TRL: from the start of the work), so start-up does not bend them",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,300000,1000000", help="comma-separated row counts")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "benchmark.yaml")
    parser.add_argument("--no-trl", dest="trl", action="store_false", help="leave TRL out")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data and logs here")
    args = parser.parse_args(argv)
    args.sizes = sorted({int(x) for x in args.rows.split(",") if x.strip()})
    args.max_rows = args.sizes[-1]
    if args.trl and importlib.util.find_spec("trl") is None:
        args.trl = False
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--tokenize-child":
        Path(argv[3]).write_text(json.dumps(tokenize_child(Path(argv[1]), Path(argv[2]))))
        return {}
    if argv and argv[0] == "--trl-child":
        raw, model, procs, length, out, result = argv[1:7]
        Path(result).write_text(json.dumps(trl_child(Path(raw), model, int(procs), int(length), Path(out))))
        return {}
    from ftpipe.utils.logging import get_logger, setup_logging

    setup_logging()
    log = get_logger("benchmarks.data_scale")
    args = parse_args(argv)
    vs_trl = _sibling("vs_trl")
    make = _sibling("make_large_alpaca")
    with tempfile.TemporaryDirectory(prefix="ftpipe-data-scale-") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        big = work / f"alpaca-{args.max_rows}.jsonl"
        if not big.is_file():
            make.main(["--rows", str(args.max_rows), "--out", str(big)])
        sizes = []
        for n in args.sizes:
            log.info("%d rows ...", n)
            sizes.append(run_size(vs_trl, args, big, n, work))
            log.info(
                "%d rows: %s",
                n,
                json.dumps({k: v.get("wall_s") for k, v in sizes[-1].items() if isinstance(v, dict)}),
            )
        from ftpipe.config.io import load_config

        report = {
            "benchmark": "data_scale",
            "machine": vs_trl.machine_info(),
            "bytes_per_row": big.stat().st_size / args.max_rows,
            "max_length": load_config(args.config).data.max_seq_length,
            "sizes": sizes,
            "summary": summarize(sizes),
        }
    vs_trl.write_report(args.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
