"""Runs that meet each other never cross-wire: two runs in one checkpoint folder, exports and evaluation of
the run meant, stale exports, resume with another shape, two writers, the user's own files.

Real ``ftpipe train`` processes on the tiny random Llama (2-3 steps each, one process), then the export
and the evaluation's choice of model in this process. The starts that must be refused before anything is
written run the console command's own ``main`` in this process (no interpreter start-up to pay).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.config import PipelineConfig
from ftpipe.config.runs import manifests_in

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "benchmark.yaml"


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _flags(values: dict[str, object]) -> list[str]:
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


def _settings(tmp_path: Path, tiny: Path, data: Path, **extra: object) -> dict[str, object]:
    return {
        "hf_model_id": str(tiny),
        "dataset": str(data),
        "data_dir": str(tmp_path / "data"),
        "results_dir": str(tmp_path / "results"),
        "checkpoint_dir": str(tmp_path / "shared_ckpts"),
        "strategy": "single",
        "gpus_per_node": 1,
        "max_samples": 24,
        "max_seq_length": 64,
        "micro_batch_size": 2,
        "max_steps": 2,
        "warmup_steps": 0,
        "val_check_interval": 1,
        "limit_val_batches": 1,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "num_workers": 0,
        "peak_tflops_per_device": 1.0,  # the MFU peak given: no matmul benchmark at each start
        **extra,
    }


def _train(values: dict[str, object], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ftpipe", "train", "--config", str(CONFIG), *_flags(values)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _refused(values: dict[str, object]) -> tuple[int | None, str]:
    """``ftpipe train`` through the console command's ``main`` in this process, for a start that stops
    before training: its exit status and what it printed (log messages, stdout and stderr). The thread
    count and the seed variable that ``train`` sets for its run are restored afterwards."""
    import torch

    from ftpipe.cli.main import main
    from ftpipe.utils.logging import setup_logging

    threads, seed = torch.get_num_threads(), os.environ.get("PL_GLOBAL_SEED")
    setup_logging()
    handler = next(h for h in logging.getLogger().handlers if getattr(h, "_ftpipe", False))
    out = io.StringIO()
    previous, handler.stream = handler.stream, out  # swapped without a flush: the old stream may be closed
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main(["train", "--config", str(CONFIG), *_flags(values)])
        code: int | None = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        handler.stream = previous
        torch.set_num_threads(threads)
        if seed is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = seed
    return code, out.getvalue()


def _cfg(values: dict[str, object], **changes: object) -> PipelineConfig:
    from ftpipe.config import load_config

    return load_config(str(CONFIG), **{**values, **changes})


def _tree(root: Path) -> dict[str, str]:
    """Path -> content hash of the files under ``root``, but the commands' own logs (``logs/``)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "logs" not in p.relative_to(root).parts[-2:-1]
    }


@pytest.mark.timeout(900)
def test_runs_sharing_folders_never_cross_wire(tmp_path, tiny_llama, alpaca_demo):
    from ftpipe.config import results_root
    from ftpipe.export.export import export_model, read_export_info
    from ftpipe.pipeline import ExportNotUsable, finetuned_model_path

    shared = tmp_path / "shared_ckpts"
    shared.mkdir()
    (shared / "notes.tmp").write_text("the user's notes")  # the user's files: never deleted by suffix
    (shared / "backup.old").mkdir()
    (shared / "backup.old" / "weights.bin").write_bytes(b"\x00" * 16)
    values = _settings(tmp_path, tiny_llama, alpaca_demo)

    first = _train({**values, "learning_rate": 1e-3})
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    second = _train({**values, "learning_rate": 5e-3, "max_steps": 3})
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]

    # two runs, each with its own manifest and checkpoint names; the user's files untouched
    run_a, run_b = manifests_in(shared)
    assert run_a.run_id != run_b.run_id and run_a.status == run_b.status == "completed"
    assert (run_a.global_step, run_b.global_step) == (2, 3)
    for run in (run_a, run_b):
        assert run.last == f"{run.run_id}-last.ckpt" and run.best.startswith(f"{run.run_id}-step=")
        assert all(name.startswith(run.run_id) for name in run.checkpoints)
        assert (shared / run.last).is_file() and (shared / run.best).is_file()
    assert not list(shared.glob("last*.ckpt")) and not list(shared.glob("*-v1.ckpt"))
    assert (shared / "notes.tmp").read_text() == "the user's notes"
    assert (shared / "backup.old" / "weights.bin").is_file()

    # export: best / last of the newest run by default, of the run named by run_id otherwise
    cfg = _cfg(values, export_dtype="float32")
    newest = export_model(cfg.replace(checkpoint="last"))
    assert (newest.run_id, Path(newest.checkpoint).name) == (run_b.run_id, run_b.last)
    assert newest.checkpoint_step == 3
    older = export_model(cfg.replace(checkpoint="best", run_id=run_a.run_id))
    assert (older.run_id, Path(older.checkpoint).name) == (run_a.run_id, run_a.best)
    by_path = export_model(cfg.replace(checkpoint="last", run_id=str(run_a.path)))
    assert Path(by_path.checkpoint).name == run_a.last
    info = read_export_info(Path(by_path.path))
    assert info["run_id"] == run_a.run_id and info["run_manifest"] == str(run_a.path)

    # evaluation asked about the newest run: the default export (now run A's) is stale, so it is redone
    merged = results_root(cfg) / "export" / "merged"
    assert read_export_info(merged)["run_id"] == run_a.run_id
    chosen = finetuned_model_path(cfg)
    assert Path(chosen) == merged and read_export_info(merged)["run_id"] == run_b.run_id
    assert Path(read_export_info(merged)["checkpoint"]).name == run_b.best
    assert finetuned_model_path(cfg) == chosen  # up to date now: taken as it is

    # an export_dir the user names: used when it is the export of the run meant, refused when stale
    mine = tmp_path / "a_export"
    export_model(cfg.replace(run_id=run_a.run_id, export_dir=str(mine)))
    assert finetuned_model_path(cfg.replace(export_dir=str(mine), run_id=run_a.run_id)) == str(mine)
    with pytest.raises(ExportNotUsable, match=f"exported from run {run_a.run_id}, but the run meant is"):
        finetuned_model_path(cfg.replace(export_dir=str(mine)))
    with pytest.raises(ExportNotUsable, match="does not exist"):
        finetuned_model_path(cfg.replace(export_dir=str(tmp_path / "typo")))

    # resume with another LoRA shape: refused before a byte of the run is written
    before = _tree(tmp_path / "results")
    before_ckpts = _tree(shared)
    code, output = _refused({**values, "resume_from_checkpoint": str(shared / run_b.last), "lora_rank": 8})
    assert code == 2, output[-4000:]
    assert "lora_rank: the checkpoint was trained with 4, this run has 8" in output
    assert "Traceback" not in output
    assert _tree(tmp_path / "results") == before and _tree(shared) == before_ckpts

    # a resume from the run's own checkpoint continues the run: same id, same manifest
    resumed = _train({**values, "resume_from_checkpoint": str(shared / run_b.last), "max_steps": 4})
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    after = {m.run_id: m for m in manifests_in(shared)}
    assert set(after) == {run_a.run_id, run_b.run_id}
    assert after[run_b.run_id].global_step == 4 and after[run_b.run_id].resumed_from == [
        str(shared / run_b.last)
    ]
    # the merged export was made from run B's best before the resume: still the best? then still current
    reason_free = finetuned_model_path(cfg)
    assert read_export_info(Path(reason_free))["run_id"] == run_b.run_id


@pytest.mark.timeout(300)
def test_a_second_writer_is_refused_with_the_holders_name(tmp_path, tiny_llama, alpaca_demo):
    """Two ``ftpipe train`` into one results folder: the second stops at once, naming the first."""
    from ftpipe.config.paths import model_slug

    values = _settings(tmp_path, tiny_llama, alpaca_demo)
    root = tmp_path / "results" / model_slug(str(tiny_llama))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom ftpipe.config.lock import acquire\n"
            f"acquire({str(root)!r}, 'results_dir', 'ftpipe train')\nprint('held', flush=True)\ntime.sleep(300)",
        ],
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, output = _refused(values)
        assert code == 2, output[-4000:]
        assert f"results_dir: {root} is being written by another ftpipe run (pid {holder.pid}" in output
        assert not (root / "config.yaml").exists() and not (root / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (however it ended): the lock went with it
    time.sleep(0.2)
    from ftpipe.config.lock import acquire, release

    release(acquire(root, "results_dir"))
    assert json.loads((root / ".ftpipe.lock").read_text() or "{}") == {}
