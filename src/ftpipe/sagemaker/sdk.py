"""The one module that talks to the SageMaker Python SDK (v3: ``sagemaker.train.ModelTrainer``).

It turns a :class:`JobSpec` (plain values, no SDK types) into a ``ModelTrainer`` and either submits
the training job or, for a dry run, lets the SDK build the exact ``CreateTrainingJob`` request it
would send, through a session that refuses every AWS call and records uploads instead of sending
them. The AWS PyTorch training image and the GPUs per instance come from the SDK's bundled tables
(no network).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from sagemaker.core import image_uris, instance_types_gpu_info
from sagemaker.core.helper.iam_role_resolver import RoleValidationError
from sagemaker.core.helper.session_helper import Session
from sagemaker.core.training.configs import (
    CheckpointConfig,
    Compute,
    InputData,
    OutputDataConfig,
    SourceCode,
    StoppingCondition,
)
from sagemaker.train.distributed import Torchrun
from sagemaker.train.model_trainer import ModelTrainer

from ftpipe.sagemaker.errors import AWSCredentialsError, SageMakerLaunchError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

#: AWS account id used in the dry run's placeholders (role ARN, default bucket).
DRY_RUN_ACCOUNT = "000000000000"
#: Name of the training data channel (``SM_CHANNEL_TRAINING`` in the container).
TRAINING_CHANNEL = "training"


@dataclass(kw_only=True)
class JobSpec:
    """Everything a training job needs, as plain values (what ``ftpipe.sagemaker.launch`` resolves)."""

    region: str
    image_uri: str
    role: str
    instance_type: str
    instance_count: int
    volume_size_gb: int
    processes_per_host: int
    source_dir: str
    entry_script: str
    requirements: str | None
    training_data_s3_uri: str
    output_s3_uri: str | None
    checkpoint_s3_uri: str | None
    checkpoint_local_path: str
    use_spot: bool
    max_run_s: int
    max_wait_s: int | None
    base_job_name: str
    hyperparameters: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)


def sdk_version() -> str:
    """The installed ``sagemaker`` meta-package version."""
    from importlib.metadata import version

    return version("sagemaker")


def training_image_uri(region: str, framework_version: str, py_version: str, instance_type: str) -> str:
    """The AWS PyTorch training image for the region, from the SDK's bundled image table (offline)."""
    try:
        return image_uris.retrieve(
            framework="pytorch",
            region=region,
            version=framework_version,
            py_version=py_version,
            instance_type=instance_type,
            image_scope="training",
        )
    except ValueError as err:
        if str(err).startswith("Unsupported region"):  # the SDK's image table lists the regions it knows
            raise SageMakerLaunchError(
                f"region: the SageMaker SDK {sdk_version()} has no PyTorch training image in {region!r} "
                f"({str(err).split(' You may', 1)[0]}); set --region to a SageMaker region (like us-east-1), "
                "or set image_uri to an image in that region"
            ) from err
        raise SageMakerLaunchError(
            f"framework_version / py_version: the SageMaker SDK has no PyTorch training image for "
            f"{framework_version} / {py_version} on {instance_type} in {region} ({err}); pick a listed "
            "version or set image_uri"
        ) from err


def instance_gpu_count(region: str, instance_type: str) -> int | None:
    """GPUs of one instance from the SDK's table; ``None`` for CPU or unlisted instance types."""
    info = instance_types_gpu_info.retrieve(region).get(instance_type)
    return int(info["Count"]) if info else None


def default_region() -> str | None:
    """The region of the default AWS session (``AWS_DEFAULT_REGION``, ``~/.aws/config``)."""
    return boto3.Session().region_name


def _trainer(spec: JobSpec, session: Session) -> ModelTrainer:
    """The ModelTrainer of ``spec``: torchrun on every instance, spot, checkpoint sync, code upload."""
    checkpoint = None
    if spec.checkpoint_s3_uri or spec.use_spot:  # spot: the SDK picks an S3 prefix when none is given
        checkpoint = CheckpointConfig(s3_uri=spec.checkpoint_s3_uri, local_path=spec.checkpoint_local_path)
    return ModelTrainer(
        sagemaker_session=session,
        role=spec.role,
        base_job_name=spec.base_job_name,
        training_image=spec.image_uri,
        source_code=SourceCode(
            source_dir=spec.source_dir, entry_script=spec.entry_script, requirements=spec.requirements
        ),
        distributed=Torchrun(process_count_per_node=spec.processes_per_host),
        compute=Compute(
            instance_type=spec.instance_type,
            instance_count=spec.instance_count,
            volume_size_in_gb=spec.volume_size_gb,
            enable_managed_spot_training=spec.use_spot,
        ),
        stopping_condition=StoppingCondition(
            max_runtime_in_seconds=spec.max_run_s,
            max_wait_time_in_seconds=spec.max_wait_s if spec.use_spot else None,
        ),
        output_data_config=(
            OutputDataConfig(s3_output_path=spec.output_s3_uri, compression_type="GZIP")
            if spec.output_s3_uri
            else None
        ),
        checkpoint_config=checkpoint,
        input_data_config=[InputData(channel_name=TRAINING_CHANNEL, data_source=spec.training_data_s3_uri)],
        environment=dict(spec.environment),
        hyperparameters=dict(spec.hyperparameters),
    )


class _RefusedAWSCall(Exception):
    """A dry run tried to reach AWS."""


def _refuse(request: Any, **_: Any) -> None:
    raise _RefusedAWSCall(f"dry run: refused AWS request {request.method} {request.url}")


class _DryRunSession(Session):
    """A SageMaker session that never reaches AWS: uploads are recorded (not sent), every other AWS
    request raises, and the default bucket is a placeholder."""

    def __init__(self, region: str, bucket: str) -> None:
        # Placeholder credentials keep boto3 from searching the credential chain (instance metadata).
        boto_session = boto3.Session(
            region_name=region, aws_access_key_id="dry-run", aws_secret_access_key="dry-run"
        )
        boto_session.events.register("before-send", _refuse)
        self.uploads: dict[str, dict[str, Any]] = {}
        super().__init__(boto_session=boto_session, default_bucket=bucket)

    def default_bucket(self) -> str:
        return self._default_bucket_name_override

    def upload_data(self, path, bucket=None, key_prefix="data", callback=None, extra_args=None) -> str:  # type: ignore[override]
        """Where ``Session.upload_data`` would upload ``path`` (same URI), with the files it would send."""
        bucket, key_prefix = self.determine_bucket_and_prefix(
            bucket=bucket, key_prefix=key_prefix, sagemaker_session=self
        )
        root = Path(path)
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        uri = f"s3://{bucket}/{key_prefix}"
        record: dict[str, Any] = {"s3_uri": uri, "files": files}
        for name in ("distributed.json", "sourcecode.json"):  # the SDK's driver settings
            if (root / name).is_file():
                record[name] = json.loads((root / name).read_text())
        self.uploads[Path(key_prefix).name] = record
        return uri


@contextlib.contextmanager
def _role_validation_off() -> Iterator[None]:
    """The SDK's documented switch (``SAGEMAKER_VALIDATE_ROLE=false``): a dry run has no IAM to ask."""
    before = os.environ.get("SAGEMAKER_VALIDATE_ROLE")
    os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SAGEMAKER_VALIDATE_ROLE", None)
        else:
            os.environ["SAGEMAKER_VALIDATE_ROLE"] = before


def dry_run_request(spec: JobSpec) -> dict[str, Any]:
    """The ``CreateTrainingJob`` request the SDK would send for ``spec``, built without credentials or
    network, with the uploads it would make (code and the SDK's drivers)."""
    if not spec.role.startswith("arn:"):
        raise SageMakerLaunchError(
            f"role: {spec.role!r} is not an ARN; a dry run cannot look up a role name in IAM"
        )
    bucket = f"sagemaker-{spec.region}-{DRY_RUN_ACCOUNT}"
    session = _DryRunSession(spec.region, bucket)
    try:
        with _role_validation_off():
            trainer = _trainer(spec, session)
        request = trainer._create_training_job_args(boto3=True)  # what train() sends, as boto3 kwargs
    except _RefusedAWSCall as err:  # pragma: no cover - a new SDK release that calls AWS here
        raise SageMakerLaunchError(
            f"the SageMaker SDK {sdk_version()} needs AWS to build the request: {err}"
        ) from err
    except ValueError as err:
        raise SageMakerLaunchError(f"the SageMaker SDK rejected the job settings: {err}") from err
    return {"CreateTrainingJob": request, "default_bucket": bucket, "uploads": session.uploads}


def submit(spec: JobSpec) -> dict[str, Any]:
    """Upload the code and submit the training job (not waiting for it); returns its name and ARN."""
    boto_session = boto3.Session(region_name=spec.region)
    if boto_session.get_credentials() is None:
        raise AWSCredentialsError(
            "no AWS credentials found: run `aws configure` or `aws sso login`, or set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; `--dry_run` prints the job request without them"
        )
    try:
        trainer = _trainer(spec, Session(boto_session=boto_session))
        trainer.train(wait=False, logs=False)
    except botocore.exceptions.NoCredentialsError as err:
        raise AWSCredentialsError(f"AWS credentials were refused or expired: {err}") from err
    except RoleValidationError as err:
        raise SageMakerLaunchError(f"role: {err}") from err
    except botocore.exceptions.EndpointConnectionError as err:
        raise SageMakerLaunchError(
            f"AWS is not reachable from here ({err}); check the network and region"
        ) from err
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, ValueError) as err:
        raise SageMakerLaunchError(f"submitting the training job failed: {err}") from err
    job = trainer._latest_training_job
    name = job.training_job_name
    return {
        "TrainingJobName": name,
        "TrainingJobArn": getattr(job, "training_job_arn", None),
        "console": f"https://{spec.region}.console.aws.amazon.com/sagemaker/home?region={spec.region}"
        f"#/jobs/{name}",
    }
