"""``ftpipe sagemaker launch``: the job request the SageMaker Python SDK (ModelTrainer) builds.

Every dry run goes through the real SDK (image table, ModelTrainer, its CreateTrainingJob request, its
driver files) with no AWS credentials and no network: the SDK's session refuses every AWS request.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from ftpipe.cli.main import main, parse
from ftpipe.config import load_config
from ftpipe.config.schema import PipelineConfig
from ftpipe.sagemaker.errors import AWSCredentialsError, SageMakerLaunchError
from ftpipe.sagemaker.launch import (
    DRY_RUN_ROLE,
    JOB_ENVIRONMENT,
    check_hyperparameters,
    job_hyperparameters,
    launch,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "SAGEMAKER_VALIDATE_ROLE",
)
#: What a job of the ``_config`` settings must receive as hyperparameters (strings, JSON for the rest).
EXPECTED_HYPERPARAMETERS = {
    "hf_model_id": "Qwen/Qwen3-0.6B",
    "lora_rank": "16",
    "lora_target_modules": '["q_proj", "v_proj"]',
    "dataset_subset": "null",
    "use_chat_template": "true",
    "text_replacements": '{"{{name}}": "Nova"}',
    "max_steps": "50",
    "learning_rate": "0.0002",
    "activation_checkpointing": "false",
}


def _aws_free_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment with no AWS credentials, region or profile, and no metadata service."""
    env = {k: v for k, v in os.environ.items() if k not in AWS_ENV}
    for name in ("config", "credentials"):
        (tmp_path / f"aws-{name}").write_text("")
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@pytest.fixture(autouse=True)
def no_aws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in AWS_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in _aws_free_env(tmp_path).items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)


def _config(**sagemaker: object) -> PipelineConfig:
    """Fields the job must get, fields the entry point owns (never sent) and SageMaker fields."""
    return PipelineConfig().replace(
        hf_model_id="Qwen/Qwen3-0.6B",
        lora_rank=16,
        lora_target_modules=["q_proj", "v_proj"],
        dataset_subset=None,
        use_chat_template=True,
        text_replacements={"{{name}}": "Nova"},
        max_steps=50,
        learning_rate=2e-4,
        activation_checkpointing=False,
        # owned by the entry point: never hyperparameters
        dataset="local/data.json",
        data_dir="/tmp/here",
        results_dir="/tmp/results",
        num_nodes=3,
        resume_from_checkpoint="auto",
        **sagemaker,
    )


def _channel(request: dict, name: str) -> str:
    (channel,) = [c for c in request["InputDataConfig"] if c["ChannelName"] == name]
    return channel["DataSource"]["S3DataSource"]["S3Uri"]


@pytest.mark.timeout(120)
def test_dry_run_one_instance_on_demand() -> None:
    out = launch(_config(dry_run=True, region="us-west-2", training_data_s3_uri="s3://my-bucket/alpaca/"))
    request = out["CreateTrainingJob"]

    assert out["dry_run"] is True
    assert out["placeholders"]["role"] == DRY_RUN_ROLE == request["RoleArn"]
    assert "region" not in out["placeholders"]
    image = "763104351884.dkr.ecr.us-west-2.amazonaws.com/pytorch-training:2.8.0-gpu-py312"
    assert request["AlgorithmSpecification"]["TrainingImage"] == image
    assert request["ResourceConfig"] == {
        "InstanceType": "ml.p4d.24xlarge",
        "InstanceCount": 1,
        "VolumeSizeInGB": 200,
    }
    # torchrun through the SDK's driver: gpus_per_node (8) processes on the one instance
    assert "sm_train.sh" in request["AlgorithmSpecification"]["ContainerArguments"][-1]
    assert out["uploads"]["sm_drivers"]["distributed.json"]["process_count_per_node"] == 8
    assert out["torchrun"] == {"nnodes": 1, "nproc_per_node": 8, "world_size": 8}
    assert request["HyperParameters"] == EXPECTED_HYPERPARAMETERS
    assert request["Environment"] == JOB_ENVIRONMENT
    assert request["Environment"]["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert request["Environment"]["TOKENIZERS_PARALLELISM"] == "false"
    assert _channel(request, "training") == "s3://my-bucket/alpaca/"
    # on demand, no checkpoint sync asked for: no spot settings, no checkpoint config
    assert not request.get("EnableManagedSpotTraining")
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400}
    assert "CheckpointConfig" not in request
    # the code: the project's sagemaker_job/ folder with the installed ftpipe beside train.py
    assert out["source_dir"] == str(REPO_ROOT / "sagemaker_job")
    code = out["uploads"]["code"]
    assert code["s3_uri"] == _channel(request, "code")
    assert {"train.py", "requirements.txt", "ftpipe/sagemaker/entry.py", "ftpipe/cli/main.py"} <= set(
        code["files"]
    )
    assert "Dockerfile" not in code["files"]
    assert not [f for f in code["files"] if "__pycache__" in f]
    source = out["uploads"]["sm_drivers"]["sourcecode.json"]
    assert (source["entry_script"], source["requirements"]) == ("train.py", "requirements.txt")
    assert request["OutputDataConfig"]["S3OutputPath"].startswith("s3://sagemaker-us-west-2-000000000000/")
    json.dumps(out)  # the CLI prints it
    assert "SAGEMAKER_VALIDATE_ROLE" not in os.environ  # the dry run's switch is put back


@pytest.mark.timeout(120)
def test_dry_run_four_instances_spot_with_checkpoints() -> None:
    cfg = _config(
        dry_run=True,
        region="eu-south-1",
        role="arn:aws:iam::123456789012:role/SageMakerTraining",
        instance_count=4,
        instance_type="ml.p5.48xlarge",
        volume_size_gb=500,
        training_data_s3_uri="s3://my-bucket/prepared",
        output_s3_uri="s3://my-bucket/jobs",
        checkpoint_s3_uri="s3://my-bucket/checkpoints/run-1",
        checkpoint_local_path="/opt/ml/ckpt",
        use_spot=True,
        max_run_s=7200,
        max_wait_s=10800,
        base_job_name="qwen-lora",
    )
    out = launch(cfg)
    request = out["CreateTrainingJob"]

    assert out["placeholders"] == {"default_bucket": "sagemaker-eu-south-1-000000000000"}
    assert request["RoleArn"] == "arn:aws:iam::123456789012:role/SageMakerTraining"
    assert request["TrainingJobName"].startswith("qwen-lora-")
    image = "692866216735.dkr.ecr.eu-south-1.amazonaws.com/pytorch-training:2.8.0-gpu-py312"
    assert request["AlgorithmSpecification"]["TrainingImage"] == image
    assert request["ResourceConfig"] == {
        "InstanceType": "ml.p5.48xlarge",
        "InstanceCount": 4,
        "VolumeSizeInGB": 500,
    }
    assert out["uploads"]["sm_drivers"]["distributed.json"]["process_count_per_node"] == 8
    assert out["torchrun"] == {"nnodes": 4, "nproc_per_node": 8, "world_size": 32}
    # the one SageMaker field the entry point reads travels when it differs from its default
    assert request["HyperParameters"] == {**EXPECTED_HYPERPARAMETERS, "checkpoint_local_path": "/opt/ml/ckpt"}
    assert request["Environment"] == JOB_ENVIRONMENT
    assert _channel(request, "training") == "s3://my-bucket/prepared"
    assert request["EnableManagedSpotTraining"] is True
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 10800}
    assert request["CheckpointConfig"] == {
        "S3Uri": "s3://my-bucket/checkpoints/run-1",
        "LocalPath": "/opt/ml/ckpt",
    }
    assert request["OutputDataConfig"]["S3OutputPath"] == "s3://my-bucket/jobs"


@pytest.mark.timeout(120)
def test_spot_without_max_wait_and_custom_image(tmp_path: Path) -> None:
    source = tmp_path / "code"
    source.mkdir()
    (source / "train.py").write_text("from ftpipe.sagemaker.entry import main\nmain()\n")
    out = launch(
        _config(
            dry_run=True,
            use_spot=True,
            max_run_s=3600,
            gpus_per_node=4,
            image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/ftpipe-train:1",
            source_dir=str(source),
        )
    )
    request = out["CreateTrainingJob"]
    assert out["placeholders"]["region"] == "us-east-1"
    assert out["placeholders"]["training_data_s3_uri"] == _channel(request, "training")
    assert request["AlgorithmSpecification"]["TrainingImage"].endswith("/ftpipe-train:1")
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    # spot without checkpoint_s3_uri: the SDK picks the S3 prefix; the local folder is the default one
    assert request["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert request["CheckpointConfig"]["S3Uri"].startswith("s3://sagemaker-us-east-1-000000000000/")
    assert out["torchrun"]["nproc_per_node"] == 4
    assert request["HyperParameters"] == EXPECTED_HYPERPARAMETERS  # gpus_per_node comes from the job
    # a source folder without requirements.txt: nothing to install
    assert out["uploads"]["sm_drivers"]["sourcecode.json"]["requirements"] is None
    assert out["source_dir"] == str(source)


@pytest.mark.timeout(60)
def test_hyperparameters_differ_from_defaults_only() -> None:
    assert job_hyperparameters(PipelineConfig()) == {}
    assert job_hyperparameters(_config(instance_count=4, use_spot=True, role="x")) == EXPECTED_HYPERPARAMETERS


@pytest.mark.timeout(60)
def test_hyperparameter_limits() -> None:
    check_hyperparameters({f"k{i}": "v" for i in range(100)})
    with pytest.raises(SageMakerLaunchError, match="101 fields"):
        check_hyperparameters({f"k{i}": "v" for i in range(101)})
    with pytest.raises(SageMakerLaunchError, match="longer than 256"):
        check_hyperparameters({"k" * 257: "v"})
    check_hyperparameters({"system_prompt": "x" * 2500})
    with pytest.raises(SageMakerLaunchError, match="system_prompt: the value has 2501 characters"):
        launch(_config(dry_run=True, system_prompt="x" * 2501))
    with pytest.raises(SageMakerLaunchError, match="system_prompt: the value contains a single quote"):
        launch(_config(dry_run=True, system_prompt="You're Nova."))


@pytest.mark.timeout(60)
def test_refusals_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(SageMakerLaunchError) as missing:
        launch(_config())
    assert "role: required" in str(missing.value)
    assert "training_data_s3_uri: required" in str(missing.value)
    with pytest.raises(SageMakerLaunchError, match=r"gpus_per_node: 8 .* ml\.g5\.2xlarge has 1 GPU"):
        launch(_config(dry_run=True, instance_type="ml.g5.2xlarge"))
    with pytest.raises(SageMakerLaunchError, match=r"framework_version / py_version: .* 1\.0\.99"):
        launch(_config(dry_run=True, framework_version="1.0.99"))
    with pytest.raises(SageMakerLaunchError, match=re.escape(f"source_dir: {tmp_path} has no train.py")):
        launch(_config(dry_run=True, source_dir=str(tmp_path)))
    with pytest.raises(SageMakerLaunchError, match="role: 'MyRole' is not an ARN"):
        launch(_config(dry_run=True, role="MyRole"))


@pytest.mark.timeout(60)
def test_launch_without_credentials_stops_with_a_clear_error() -> None:
    cfg = _config(
        region="us-east-1",
        role="arn:aws:iam::123456789012:role/SageMakerTraining",
        training_data_s3_uri="s3://my-bucket/data",
    )
    with pytest.raises(AWSCredentialsError, match="no AWS credentials found"):
        launch(cfg)
    with pytest.raises(AWSCredentialsError, match="region: unset and no AWS region"):
        launch(cfg.replace(region=None))


@pytest.mark.timeout(60)
def test_launch_with_aws_unreachable_stops_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real submit path (SDK session, ModelTrainer, its role check) up to the first AWS request."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    cfg = _config(
        region="us-east-1",
        role="arn:aws:iam::123456789012:role/SageMakerTraining",
        training_data_s3_uri="s3://my-bucket/data",
    )
    with pytest.raises(SageMakerLaunchError, match="AWS is not reachable from here"):
        launch(cfg)


@pytest.mark.timeout(60)
def test_cli_parses_the_nested_command() -> None:
    command, cfg = parse(
        ["sagemaker", "launch", "--config", "configs/demo.yaml", "--instance_count", "2", "--use_spot"]
    )
    assert command == "sagemaker launch"
    assert (cfg.sagemaker.instance_count, cfg.sagemaker.use_spot, cfg.model.hf_model_id) == (
        2,
        True,
        "embedded",
    )
    assert parse(["train", "--max_steps", "300"])[0] == "train"


@pytest.mark.timeout(120)
def test_cli_dry_run_prints_the_request(capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "sagemaker",
            "launch",
            "--config",
            str(REPO_ROOT / "configs" / "demo.yaml"),
            "--dry_run",
            "--training_data_s3_uri",
            "s3://my-bucket/d",
            "--instance_count",
            "4",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    request = out["CreateTrainingJob"]
    assert request["ResourceConfig"]["InstanceCount"] == 4
    assert out["torchrun"] == {"nnodes": 4, "nproc_per_node": 2, "world_size": 8}  # demo: 2 per node
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert demo.train.max_steps != PipelineConfig().train.max_steps  # a value the job must be told
    assert request["HyperParameters"]["max_steps"] == str(demo.train.max_steps)
    assert _channel(request, "training") == "s3://my-bucket/d"


def _ftpipe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("ftpipe")
    return subprocess.run(
        [str(cli), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=100, check=False
    )


@pytest.mark.timeout(120)
def test_console_dry_run_and_missing_credentials(tmp_path: Path) -> None:
    env = _aws_free_env(tmp_path)
    base = [
        "sagemaker",
        "launch",
        "--config",
        "configs/demo.yaml",
        "--training_data_s3_uri",
        "s3://my-bucket/d",
    ]

    dry = _ftpipe([*base, "--dry_run"], env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["CreateTrainingJob"]["ResourceConfig"]["InstanceCount"] == 1

    real = _ftpipe([*base, "--role", "arn:aws:iam::123456789012:role/R", "--region", "us-east-1"], env)
    assert real.returncode == 2, real.stderr
    assert "no AWS credentials found" in real.stderr
    assert "Traceback" not in real.stderr
    assert real.stdout == ""


@pytest.mark.timeout(60)
def test_requirements_match_the_project_dependencies() -> None:
    """sagemaker_job/requirements.txt installs ftpipe's dependencies, torch aside (the image's CUDA build)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {d.replace(" ", "") for d in project if re.split(r"[<>=!~;\[ ]", d)[0] != "torch"}
    lines = (REPO_ROOT / "sagemaker_job" / "requirements.txt").read_text().splitlines()
    listed = {line.replace(" ", "") for line in lines if line.strip() and not line.startswith("#")}
    assert listed == wanted


@pytest.mark.timeout(60)
def test_a_region_the_sdk_has_no_image_for_names_the_region() -> None:
    with pytest.raises(
        SageMakerLaunchError, match=r"^region: the SageMaker SDK .* no PyTorch training image in 'xx-west-9'"
    ):
        launch(_config(dry_run=True, region="xx-west-9"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("role", "arn:aws:iam::123456789012:user/bob", "is not an IAM role ARN"),
        ("role", "arn:aws:iam::1234:role/x", "is not an IAM role ARN"),
        ("role", "arn:aws:sts::123456789012:assumed-role/x/y", "is not an IAM role ARN"),
        ("role", "my role", "is not an IAM role ARN"),
        ("region", "mars-west-1", "is not an AWS region name"),
        ("region", "US-EAST-1", "is not an AWS region name"),
        ("base_job_name", "a" * 49, "has 49 characters; allowed: 1-48"),
        ("base_job_name", "my job/x", "makes the job name 'my job/x-"),
        ("base_job_name", "", "makes the job name '-"),
        ("base_job_name", "-x", "makes the job name '-x-"),
        ("training_data_s3_uri", "s3://", "names no bucket"),
        ("training_data_s3_uri", "s3:///data", "names no bucket"),
        ("output_s3_uri", "s3://My_Bucket/out", "'My_Bucket' is not an S3 bucket name"),
        ("output_s3_uri", "s3://ab/out", "'ab' is not an S3 bucket name"),
        ("checkpoint_s3_uri", "s3://my..bucket", "is not an S3 bucket name"),
        ("checkpoint_s3_uri", "s3://192.168.1.1/x", "is not an S3 bucket name"),
        ("checkpoint_s3_uri", "s3://bucket-/x", "is not an S3 bucket name"),
        ("checkpoint_s3_uri", "s3://bucket/a\nb", "control characters"),
    ],
)
@pytest.mark.timeout(30)
def test_aws_names_are_checked_with_the_configuration(field: str, value: str, message: str) -> None:
    from ftpipe.config import ConfigError, validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(PipelineConfig().replace(**{field: value}))
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"{field}: ")
    assert message in err.value.problems[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("role", "arn:aws:iam::123456789012:role/SageMakerTraining"),
        ("role", "arn:aws:iam::123456789012:role/service-role/AmazonSageMaker-ExecutionRole-2024"),
        ("role", "arn:aws-us-gov:iam::123456789012:role/x"),
        ("role", "SageMakerTraining"),
        ("region", "us-gov-west-1"),
        ("region", "ap-southeast-7"),
        ("base_job_name", "a" * 48),
        ("base_job_name", "my_job-2"),
        ("training_data_s3_uri", "s3://my.bucket-1"),
        ("training_data_s3_uri", "s3://my-bucket/data/train v2/"),
    ],
)
@pytest.mark.timeout(30)
def test_valid_aws_names_pass(field: str, value: str) -> None:
    from ftpipe.config import validate_config

    validate_config(PipelineConfig().replace(**{field: value}))


@pytest.mark.timeout(120)
def test_the_dry_run_job_name_is_one_sagemaker_takes() -> None:
    from ftpipe.config.instances import JOB_NAME, JOB_NAME_MAX

    result = launch(_config(dry_run=True, base_job_name="my_job_" + "x" * 41))
    name = result["CreateTrainingJob"]["TrainingJobName"]
    assert JOB_NAME.match(name) and len(name) <= JOB_NAME_MAX
    assert re.fullmatch(r"my-job-x{41}-\d{14}", name)  # the timestamp survives: each launch has its own name
