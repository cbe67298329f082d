"""benchmarks/make_large_alpaca.py, data_scale.py and scaling.py: the generator is seeded and prefix-stable,
the report's arithmetic, and one small end-to-end run of the data benchmark (ftpipe's side)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_generator_is_seeded_and_prefix_stable(tmp_path):
    make = _load("make_large_alpaca")
    big, small, again = tmp_path / "big.jsonl", tmp_path / "small.jsonl", tmp_path / "again.jsonl"
    make.main(["--rows", "25000", "--out", str(big)])  # crosses a chunk boundary
    make.main(["--rows", "21000", "--out", str(small)])
    make.main(["--rows", "21000", "--out", str(again)])
    assert small.read_bytes() == again.read_bytes()
    assert big.read_bytes().startswith(small.read_bytes())
    rows = [json.loads(line) for line in small.read_text().splitlines()]
    assert len(rows) == 21000 and set(rows[0]) == {"instruction", "input", "output"}
    assert 0.3 < sum(bool(r["input"]) for r in rows) / len(rows) < 0.5
    assert 700 < small.stat().st_size / len(rows) < 1000  # about 850 bytes per row
    other = tmp_path / "other.jsonl"
    make.main(["--rows", "100", "--seed", "1", "--out", str(other)])
    assert not small.read_text().startswith(other.read_text()[:200])


def _size(n: int, prep: float, tok: float, tok_inner: float, peak: float, trl: float | None) -> dict:
    out = {
        "rows": n,
        "prepare": {"exit_code": 0, "wall_s": prep, "peak_gib_max": peak, "peak_gib_per_process": [peak]},
        "tokenize": {
            "exit_code": 0,
            "wall_s": tok,
            "seconds": tok_inner,
            "peak_gib_max": 0.5,
            "tokens": 10 * n,
        },
    }
    if trl is not None:
        out["trl"] = {"exit_code": 0, "wall_s": trl + 20, "seconds": trl, "peak_gib_max": 1.5}
    return out


@pytest.mark.timeout(60)
def test_summary_linearity_memory_and_ratio():
    ds = _load("data_scale")
    sizes = [
        _size(100, 5, 15, 10, 0.6, 30),
        _size(300, 15, 40, 30, 0.8, 90),
        _size(1000, 50, 110, 100, 2.1, None),
    ]
    s = ds.summarize(sizes)
    rows = s["table"]
    # per-row time on the steps' own clocks: (prepare wall + tokenize inner) / rows against the smallest
    assert rows[0]["ftpipe_per_row_vs_smallest"] == pytest.approx(1.0)
    assert rows[1]["ftpipe_per_row_vs_smallest"] == pytest.approx((45 / 300) / (15 / 100))
    assert rows[2]["ftpipe_per_row_vs_smallest"] == pytest.approx((150 / 1000) / (15 / 100))
    assert rows[1]["trl_per_row_vs_smallest"] == pytest.approx(1.0)
    assert rows[0]["trl_over_ftpipe_time"] == pytest.approx(50 / 20) and rows[2]["trl_s"] is None
    assert s["max_peak_gib"] == 2.1 and not s["memory_met"]  # one process over 2 GiB
    assert ds.summarize(sizes[:2])["memory_met"]
    report = {
        "machine": {"cpu": "cpu", "cpu_count": 2, "versions": {"ftpipe": "0"}},
        "bytes_per_row": 850.0,
        "max_length": 256,
        "summary": s,
    }
    md = ds.markdown(report)
    assert "| 1,000 |" in md and "NOT met" in md and "n/a" in md


@pytest.mark.timeout(60)
def test_scaling_table():
    sc = _load("scaling")
    side = {
        "tokens_per_s": 100.0,
        "mfu": 0.5,
        "peak_rss_gib_max_process": 3.0,
        "activation_checkpointing": ["off"],
    }
    rows = [
        {
            "max_length": 512,
            "lora_rank": 32,
            "ftpipe-packed": side,
            "trl-packed": dict(side, tokens_per_s=50.0),
            "ratio": 2.0,
        }
    ]
    md = sc.markdown(rows, {"cpu": "cpu", "cpu_count": 2, "versions": {}})
    assert "| 512 | 32 | 100.0 | 50% | 3.00 | off | 50.0 | 50% | 3.00 | 2.00x |" in md


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_end_to_end_small(tmp_path):
    """Two small sizes, ftpipe's side only: prepare and tokenize in subprocesses, memory polled."""
    ds = _load("data_scale")
    out = tmp_path / "data_scale.json"
    report = ds.main(
        ["--rows", "500,1500", "--no-trl", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    )
    table = report["summary"]["table"]
    assert [r["rows"] for r in table] == [500, 1500]
    for row, size in zip(table, report["sizes"], strict=True):
        assert size["prepare"]["exit_code"] == 0 and size["tokenize"]["exit_code"] == 0
        assert size["tokenize"]["rows"] == int(row["rows"] * 0.9)  # the training split, 90%
        assert 0.2 < row["ftpipe_peak_gib_max_process"] < 2.0 and row["trl_s"] is None
    assert report["summary"]["memory_met"]
    assert out.with_suffix(".md").read_text().startswith("# Data at scale")
