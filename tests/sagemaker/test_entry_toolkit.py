"""The SageMaker entry point run by the real ``sagemaker-training`` toolkit, outside SageMaker.

A temporary folder laid out like ``/opt/ml`` (``SAGEMAKER_BASE_DIR``): hyperparameters, a one-host
resource config, the input data config and the training channel; the toolkit's ``train`` command with
the PyTorch container's training module starts ``torchrun`` with 2 CPU processes on the project's
``sagemaker_job/train.py``. Checked: the exported model (loads with transformers), the inference code, the
evaluation report and the checkpoints; then a restarted job over the same checkpoint folder resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftpipe.config.runs import manifests_in
from ftpipe.train.resume import is_complete

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRST_STEPS = 4
RESUMED_STEPS = 6
#: Every optimizer step sees the whole training split (4 rows: 2 processes x micro-batch 2), so that a
#: single-process run of the same data takes the same steps whatever the samplers' order.
HYPERPARAMETERS = {
    "hf_model_id": "embedded",
    "max_samples": 8,
    "train_ratio": 0.5,
    "val_ratio": 0.25,
    "test_ratio": 0.25,
    "max_seq_length": 128,
    "micro_batch_size": 2,
    "accumulate_grad_batches": 1,
    "val_check_interval": 2,
    "limit_val_batches": 1,
    "warmup_steps": 1,
    "learning_rate": 0.001,
    "min_lr": 0.00001,
    "lora_rank": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,  # random masks differ between one process and two
    "early_stopping_patience": 0,
    "num_workers": 0,
    "activation_checkpointing": False,
    "eval_backend": "transformers",
    "max_eval_samples": 2,
    "max_new_tokens": 8,
    "export_dtype": "float32",
    "peak_tflops_per_device": 1.0,  # the MFU peak given: no matmul benchmark at each start
}


def _layout(base: Path, dataset: Path, max_steps: int) -> None:
    """``/opt/ml`` as SageMaker lays it out for a one-host job, with the code folder beside it."""
    config = base / "input" / "config"
    config.mkdir(parents=True)
    code = base / "code"
    code.mkdir()
    shutil.copy(REPO_ROOT / "sagemaker_job" / "train.py", code / "train.py")
    channel = base / "input" / "data" / "training"
    channel.mkdir(parents=True)
    shutil.copy(dataset, channel / dataset.name)
    for sub in ("model", "output"):
        (base / sub).mkdir()
    # SageMaker writes every hyperparameter value as a JSON-encoded string.
    hps = {k: json.dumps(v) for k, v in {**HYPERPARAMETERS, "max_steps": max_steps}.items()}
    hps.update(
        sagemaker_program=json.dumps("train.py"),
        sagemaker_submit_directory=json.dumps(str(code)),
        sagemaker_torch_distributed_enabled="true",
        sagemaker_mpi_num_of_processes_per_host="2",
        sagemaker_region=json.dumps("us-east-1"),
        sagemaker_job_name=json.dumps("ftpipe-test"),
    )
    (config / "hyperparameters.json").write_text(json.dumps(hps))
    host = "localhost"  # must resolve: the toolkit waits for DNS of every host
    (config / "resourceconfig.json").write_text(
        json.dumps(
            {
                "current_host": host,
                "hosts": [host],
                "network_interface_name": "lo",
                "current_instance_type": "ml.c5.xlarge",
                "current_group_name": "homogeneousCluster",
                "instance_groups": [
                    {
                        "instance_group_name": "homogeneousCluster",
                        "instance_type": "ml.c5.xlarge",
                        "hosts": [host],
                    }
                ],
            }
        )
    )
    (config / "inputdataconfig.json").write_text(
        json.dumps({"training": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}})
    )


def _run_toolkit(base: Path, timeout: float) -> str:
    """The toolkit's ``train`` command on ``base``; returns its log (asserts exit status 0)."""
    bin_dir = Path(sys.executable).parent  # the toolkit's ``train`` and ``torchrun`` live beside python
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    log_path = base / "job.log"
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [str(bin_dir / "train")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    text = log_path.read_text()
    assert proc.returncode == 0, f"toolkit exited with {proc.returncode}; log tail:\n{text[-6000:]}"
    return text


def _train_steps(output: Path) -> list[int]:
    (metrics,) = output.glob("data/**/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def first_job(tmp_path_factory, alpaca_demo, embedded_model_path) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("opt_ml")
    _layout(base, alpaca_demo, FIRST_STEPS)
    return base, _run_toolkit(base, timeout=600)


@pytest.mark.timeout(660)
def test_toolkit_job_trains_exports_evaluates_and_checkpoints(first_job):
    from transformers import AutoModelForCausalLM

    base, log = first_job
    assert (base / "output" / "success").is_file()
    assert "torchrun" in log and "--nproc_per_node 2" in log.replace("=", " ")
    assert "no complete checkpoint" in log  # auto resume found nothing: a fresh start
    # the launch model read the toolkit's torchrun on a SageMaker host
    assert (
        "launched by torchrun on sagemaker: rank 0 of 2, local rank 0 of 2 on node 0 of 1 (localhost)" in log
    )

    model_dir = base / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert (model_dir / "code" / "inference.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000

    report = json.loads((base / "output" / "data" / "eval" / "eval_report.json").read_text())
    assert report["backend"] == "transformers"
    assert report["models"]["finetuned"] == str(model_dir)
    assert len(report["samples"]) == 2

    checkpoints = base / "checkpoints"
    (run,) = manifests_in(checkpoints)  # the run's manifest names its last checkpoint
    assert run.status == "completed" and run.last == f"{run.run_id}-last.ckpt"
    last = checkpoints / run.last
    assert is_complete(last), sorted(p.name for p in checkpoints.iterdir())
    assert _train_steps(base / "output") == list(range(1, FIRST_STEPS + 1))


@pytest.mark.timeout(400)
def test_toolkit_job_ends_with_the_weights_of_one_process(first_job, tmp_path, alpaca_demo):
    """The same data and steps in one process (micro-batch 4: the whole split per step, as the job's two
    processes of 2) gives the job's LoRA weights, within the numerics tests' tolerance."""
    import sys

    from ftpipe.model.checkpoint import read_checkpoint

    base, _ = first_job
    (run,) = manifests_in(base / "checkpoints")
    job_weights = read_checkpoint(base / "checkpoints" / run.last).weights
    values = {
        **HYPERPARAMETERS,
        "dataset": str(alpaca_demo),
        "data_dir": str(tmp_path / "data"),
        "results_dir": str(tmp_path / "results"),
        "strategy": "single",
        "gpus_per_node": 1,
        "micro_batch_size": 4,
        "max_steps": FIRST_STEPS,
        "accelerator": "cpu",
    }
    cmd = [
        sys.executable,
        "-m",
        "ftpipe",
        "train",
    ]  # the job's hyperparameters over the defaults, as in the job
    for key, value in values.items():
        if key not in ("eval_backend", "max_eval_samples", "max_new_tokens", "export_dtype"):
            cmd += [f"--{key}", "false" if value is False else str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360, check=False)
    assert done.returncode == 0, done.stderr[-5000:]
    (last,) = (tmp_path / "results").glob("**/checkpoints/version_*/*-last.ckpt")
    mine = read_checkpoint(last).weights
    # every step's loss and gradient norm as in the job (fp32 summation order apart)
    (metrics,) = (tmp_path / "results").glob("**/metrics.jsonl")
    ours = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    theirs = [
        json.loads(line)
        for line in next((base / "output").glob("data/**/metrics.jsonl")).read_text().splitlines()
    ]
    theirs = [r for r in theirs if "loss" in r]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-6)
    assert [r["grad_norm"] for r in ours] == pytest.approx([r["grad_norm"] for r in theirs], rel=1e-6)
    assert sorted(mine) == sorted(job_weights) and all(".lora_" in k for k in mine)
    # 20% of one learning-rate step: on this 30-layer model some LoRA B elements get gradients near zero,
    # where AdamW's normalised update turns fp32 summation noise into a fraction of a step (the tiny model
    # of the numerics tests stays within 1%)
    worst = max(float((mine[k] - job_weights[k]).abs().max()) for k in mine)
    assert worst < 0.2 * HYPERPARAMETERS["learning_rate"], f"LoRA weights differ by up to {worst}"
    assert any(float(job_weights[k].abs().max()) > 0 for k in job_weights if "lora_B" in k)  # it trained


@pytest.mark.timeout(660)
def test_restarted_job_resumes_from_the_checkpoint_folder(first_job, tmp_path, alpaca_demo):
    first_base, _ = first_job
    base = tmp_path / "opt_ml"
    base.mkdir()
    _layout(base, alpaca_demo, RESUMED_STEPS)
    # A restarted spot job: SageMaker restores checkpoint_s3_uri into /opt/ml/checkpoints first.
    shutil.copytree(first_base / "checkpoints", base / "checkpoints")
    log = _run_toolkit(base, timeout=600)

    (run,) = manifests_in(base / "checkpoints")
    assert f"resuming from {base / 'checkpoints' / run.last}" in log
    assert run.global_step == RESUMED_STEPS  # the same run, continued: one manifest
    assert _train_steps(base / "output") == list(range(FIRST_STEPS + 1, RESUMED_STEPS + 1))
    assert (base / "model" / "model.safetensors").is_file()
