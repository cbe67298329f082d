"""Experiment tracking: a real MLflow server (SQLite backend) and W&B in offline mode, fed by ``ftpipe train``.

Each run is a real training run of the tiny Llama (one process, 3 steps, validation at step 2); what the
trackers hold is read back with their own clients (MLflow) or from the offline run file (W&B).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]


def _args(tmp_path: Path, tiny_llama: Path, alpaca_demo: Path, **extra) -> list[str]:
    values = {
        "hf_model_id": tiny_llama,
        "dataset": alpaca_demo,
        "data_dir": tmp_path / "data",
        "results_dir": tmp_path / "results",
        "max_samples": 40,
        "max_seq_length": 64,
        "max_steps": 3,
        "warmup_steps": 1,
        "val_check_interval": 2,
        "limit_val_batches": 1,
        "gpus_per_node": 1,
        "strategy": "single",
        "precision": "32-true",
        "micro_batch_size": 2,
        "accumulate_grad_batches": 1,
        "num_workers": 0,
        "peak_tflops_per_device": 1.0,  # the MFU peak given: no matmul benchmark at each start
        **extra,
    }
    args = []
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a SQLite backend and its own artifact store."""
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            (tmp_path / "server-artifacts").as_uri(),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:  # pragma: no cover - the server did not come up
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield url
    os.killpg(proc.pid, 9)
    proc.wait()


@pytest.mark.timeout(300)
def test_mlflow_server_gets_params_metrics_by_step_and_artifacts_and_a_resume_continues_the_run(
    tmp_path, tiny_llama, alpaca_demo, run_ftpipe, mlflow_server
):
    from mlflow.tracking import MlflowClient

    args = _args(
        tmp_path, tiny_llama, alpaca_demo, loggers="[tensorboard, mlflow]", mlflow_tracking_uri=mlflow_server
    )
    run_ftpipe("train", args, tmp_path / "first.log", timeout=200)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("ftpipe")
    [run] = client.search_runs([experiment.experiment_id])
    params = run.data.params
    assert params["max_steps"] == "3" and params["lora_rank"] == "32" and params["strategy"] == "single"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) == 3 and len({m.step for m in losses}) == 3
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 1
    assert {"tokens_per_s", "lr", "grad_norm"} <= set(run.data.metrics)
    assert {"config.yaml", "metrics.jsonl", "train_summary.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }

    # a resumed run is the same tracked run
    resumed = [*args, "--max_steps", "5", "--resume_from_checkpoint", "auto"]
    run_ftpipe("train", resumed, tmp_path / "resumed.log", timeout=200)
    [again] = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run.info.run_id
    assert len({m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}) == 5


def _wandb_records(path: str) -> list:
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, records, pending = Path(path).read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(pending + chunk)
            pending = b""
        else:
            pending = chunk if kind == 2 else pending + chunk
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


@pytest.mark.timeout(300)
def test_wandb_offline_run_holds_the_metrics(tmp_path, tiny_llama, alpaca_demo, run_ftpipe):
    args = _args(tmp_path, tiny_llama, alpaca_demo, loggers="[wandb]", wandb_mode="offline")
    env_keys = {k: os.environ.pop(k) for k in ("WANDB_API_KEY",) if k in os.environ}
    try:
        run_ftpipe("train", args, tmp_path / "wandb.log", timeout=200)
    finally:
        os.environ.update(env_keys)
    files = glob.glob(str(tmp_path / "results" / "**" / "offline-run-*" / "run-*.wandb"), recursive=True)
    assert len(files) == 1, files
    records = _wandb_records(files[0])
    history = [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert sum("train_loss" in h for h in history) == 3
    assert sum("val_loss" in h for h in history) == 1
    config = next(r.config for r in records if r.WhichOneof("record_type") == "config")
    values = {i.key: json.loads(i.value_json) for i in config.update}
    assert values["max_steps"] == 3 and values["wandb_mode"] == "offline"
