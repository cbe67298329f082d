"""The entry point's configuration from SageMaker's environment (no processes started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftpipe.sagemaker.entry import SageMakerEnv, build_config, hyperparameter_args

REPO_ROOT = Path(__file__).resolve().parents[2]


def _environ(base: Path, channel: Path, hps: dict, hosts=("algo-1",), current="algo-1", gpus=8) -> dict:
    return {
        "SAGEMAKER_BASE_DIR": str(base),
        "SM_HPS": json.dumps(hps),
        "SM_MODEL_DIR": str(base / "model"),
        "SM_OUTPUT_DATA_DIR": str(base / "output" / "data"),
        "SM_CHANNEL_TRAINING": str(channel),
        "SM_HOSTS": json.dumps(list(hosts)),
        "SM_CURRENT_HOST": current,
        "SM_NUM_GPUS": str(gpus),
    }


@pytest.fixture
def raw_channel(tmp_path, alpaca_demo) -> Path:
    channel = tmp_path / "input" / "data" / "training"
    channel.mkdir(parents=True)
    (channel / "data.json").write_bytes(alpaca_demo.read_bytes())
    return channel


def test_paths_layout_and_hyperparameters(tmp_path, raw_channel, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    hps = {
        "config": "configs/benchmark.yaml",
        "max_steps": 7,
        "lora_target_modules": ["q_proj", "v_proj"],
        "max_samples": None,  # the launcher sends an unset value as null
    }
    env = SageMakerEnv.from_environ(
        _environ(tmp_path, raw_channel, hps, hosts=("algo-1", "algo-2", "algo-3", "algo-4"), current="algo-3")
    )
    cfg = build_config(env, hyperparameter_args(env.hyperparameters, REPO_ROOT))

    assert env.node_rank == 2
    assert (cfg.train.num_nodes, cfg.train.gpus_per_node) == (4, 8)  # benchmark.yaml's 2 processes yield
    assert cfg.train.max_steps == 7 and cfg.lora.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.data.max_samples is None
    assert cfg.model.hf_model_id == "embedded"  # from the config file
    assert cfg.data.dataset == str(raw_channel / "data.json") and cfg.data.prepared_dir is None
    assert cfg.data.prepare_per_node is True
    assert cfg.data.data_dir == str(tmp_path / "ftpipe" / "data")  # not benchmark.yaml's data_dir
    assert cfg.export.export_dir == str(tmp_path / "model")
    assert cfg.eval.eval_dir == str(tmp_path / "output" / "data" / "eval")
    assert cfg.train.results_dir == str(tmp_path / "output" / "data")
    assert cfg.train.checkpoint_dir == str(tmp_path / "checkpoints")  # /opt/ml/checkpoints under the base
    assert cfg.train.resume_from_checkpoint == "auto"
    assert cfg.dist.accelerator == "auto"


def test_prepared_channel_cpu_host_and_explicit_paths(tmp_path, monkeypatch):
    torchrun = {"TORCHELASTIC_RUN_ID": "sm", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    for name, value in {**torchrun, "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)  # under torchrun, 2 processes on the host
    channel = tmp_path / "channel"
    channel.mkdir()
    for name in ("training.jsonl", "validation.jsonl", "test.jsonl"):
        (channel / name).write_text('{"input": "a", "output": "b"}\n')
    hps = {"hf_model_id": "embedded", "checkpoint_dir": str(tmp_path / "mine"), "use_chat_template": True}
    env = SageMakerEnv.from_environ(_environ(tmp_path, channel, hps, gpus=0))
    cfg = build_config(env, hyperparameter_args(env.hyperparameters, REPO_ROOT))

    assert cfg.data.prepared_dir == str(channel)
    assert (cfg.train.num_nodes, cfg.train.gpus_per_node, cfg.dist.accelerator) == (1, 2, "cpu")
    assert cfg.train.checkpoint_dir == str(tmp_path / "mine")  # an explicit hyperparameter wins
    assert cfg.data.use_chat_template is True


def test_empty_channel_is_a_clear_error(tmp_path):
    from ftpipe.sagemaker.entry import SageMakerEnvError

    channel = tmp_path / "empty"
    channel.mkdir()
    env = SageMakerEnv.from_environ(_environ(tmp_path, channel, {}))
    with pytest.raises(SageMakerEnvError, match="holds no data file"):
        build_config(env, [])
