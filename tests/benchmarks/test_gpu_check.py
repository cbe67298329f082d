"""The GPU check's CPU dry mode: every step of ``benchmarks/gpu_check.py`` on a 2-layer model, so that
the script is ready the day a GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_gpu_check_dry_mode_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    cmd += ["--steps", "3", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["ok"] and not report["imported_vllm"]
    assert report["settings"]["strategy"] == "fsdp2" and report["settings"]["packing"] is True
    ftpipe = report["ftpipe"]
    assert ftpipe["ok"] and ftpipe["summary"]["steps"] == 3 and ftpipe["summary"]["tokens_per_s"] > 0
    assert 0.5 < ftpipe["first_loss"] < 20 and ftpipe["summary"]["padding_share"] < 0.2  # packed rows
    equality = report["packed_equality"]
    assert equality["ok"] and equality["samples"] >= 3 and equality["relative_difference"] < 1e-5
    assert report["estimate"]["total_gib"] > 0 and report["estimate"]["measured_gib"] > 0
    trl = report["trl"]
    assert trl.get("ok") or "skipped" in trl, trl
    assert "real tokens/s" in proc.stdout and "packed vs unpacked" in proc.stdout
