"""Entry point inside a SageMaker training container: ``python -m ftpipe.sagemaker.entry``, or the
thin ``sagemaker_job/train.py`` of a ``source_dir`` upload.

It builds the same configuration as ``ftpipe run`` from SageMaker's environment and runs the
pipeline on every process that the toolkit started (``torchrun`` across all hosts with the
``torch_distributed`` setting):

- hyperparameters (``SM_HPS``; else the ``--name value`` arguments) are flat ftpipe fields; ``config``
  names a YAML file (relative to the code folder) that the other hyperparameters override;
- ``SM_CHANNEL_TRAINING``: prepared ``training/validation/test.jsonl`` are used as they are
  (``prepared_dir``); raw data files go through ``prepare`` on every node (``prepare_per_node``);
- ``SM_MODEL_DIR``: the exported Hugging Face model, with ``code/inference.py`` for serving;
- ``SM_OUTPUT_DATA_DIR``: the evaluation report, TensorBoard logs, metrics and the resolved config;
- ``checkpoint_local_path`` (``/opt/ml/checkpoints``, synced with ``checkpoint_s3_uri``): the run's
  checkpoints; training resumes from the newest complete one there (a restarted spot job);
- ``SM_HOSTS`` / ``SM_CURRENT_HOST`` / ``SM_NUM_GPUS``: ``num_nodes``, ``gpus_per_node``, the node rank and
  the master address.

A SIGTERM (a stopped or pre-empted job) saves a checkpoint at the next step and exits with status 3.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftpipe.config.paths import LOCAL_DATA_SUFFIXES
from ftpipe.config.schema import PipelineConfig
from ftpipe.data.build import SPLIT_FILES
from ftpipe.errors import FtpipeError
from ftpipe.utils.allocator import reexec_with_tunables
from ftpipe.utils.launch import SAGEMAKER_PORT, set_rendezvous
from ftpipe.utils.launch import current as current_launch
from ftpipe.utils.launch import from_environ as launch_from_environ
from ftpipe.utils.logging import get_logger, setup_logging

log = get_logger(__name__)

#: SageMaker's container root; ``SAGEMAKER_BASE_DIR`` replaces it outside SageMaker.
CONTAINER_ROOT = "/opt/ml"


class SageMakerEnvError(FtpipeError):
    """SageMaker's environment is missing something the job needs."""


@dataclass
class SageMakerEnv:
    """What the toolkit tells the training script (``SM_*`` variables)."""

    hyperparameters: dict[str, Any]
    model_dir: Path
    output_data_dir: Path
    hosts: list[str]
    current_host: str
    num_gpus: int
    channel_training: Path | None = None
    base_dir: Path = field(default_factory=lambda: Path(CONTAINER_ROOT))

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> SageMakerEnv:
        env = dict(os.environ if environ is None else environ)
        base = Path(env.get("SAGEMAKER_BASE_DIR", CONTAINER_ROOT))
        launch = launch_from_environ(env)  # SM_HOSTS, SM_CURRENT_HOST
        if launch.problems and launch.cluster == "sagemaker":
            raise SageMakerEnvError("; ".join(launch.problems))
        hosts = list(launch.hosts) if launch.cluster == "sagemaker" else ["localhost"]
        channel = env.get("SM_CHANNEL_TRAINING")
        return cls(
            hyperparameters=json.loads(env["SM_HPS"]) if env.get("SM_HPS") else {},
            model_dir=Path(env.get("SM_MODEL_DIR", base / "model")),
            output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", base / "output" / "data")),
            hosts=list(hosts),
            current_host=launch.host if launch.cluster == "sagemaker" else hosts[0],
            num_gpus=int(env.get("SM_NUM_GPUS", "0") or 0),
            channel_training=Path(channel) if channel else None,
            base_dir=base,
        )

    @property
    def node_rank(self) -> int:
        if self.current_host not in self.hosts:
            raise SageMakerEnvError(f"SM_CURRENT_HOST {self.current_host!r} is not in SM_HOSTS {self.hosts}")
        return self.hosts.index(self.current_host)


def hyperparameter_args(hps: dict[str, Any], code_dir: Path) -> list[str]:
    """SageMaker hyperparameters -> ``--name value`` arguments of the ftpipe parser (``config`` first)."""
    args: list[str] = []
    hps = {k: v for k, v in hps.items() if not k.startswith("sagemaker_")}
    if "config" in hps:
        path = Path(str(hps.pop("config")))
        args += ["--config", str(path if path.is_absolute() else code_dir / path)]
    for name, value in hps.items():
        if value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | dict):
            text = json.dumps(value)
        else:
            text = str(value)
        args += [f"--{name}", text]
    return args


def _in_container(path: str, env: SageMakerEnv) -> Path:
    """``/opt/ml/...`` under the toolkit's base folder (``SAGEMAKER_BASE_DIR`` outside SageMaker)."""
    p = Path(path)
    if env.base_dir != Path(CONTAINER_ROOT) and p.is_relative_to(CONTAINER_ROOT):
        return env.base_dir / p.relative_to(CONTAINER_ROOT)
    return p


def data_overrides(channel: Path | None) -> dict[str, Any]:
    """The training channel as ``prepared_dir`` (prepared JSONL) or as ``dataset`` (raw files)."""
    if channel is None:
        return {}
    if not channel.is_dir():
        raise SageMakerEnvError(f"SM_CHANNEL_TRAINING {channel} is not a folder")
    if (channel / SPLIT_FILES["train"]).is_file():
        return {"prepared_dir": str(channel)}
    files = sorted(p for p in channel.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_DATA_SUFFIXES)
    if not files:
        raise SageMakerEnvError(
            f"the training channel {channel} holds no data file ({', '.join(sorted(LOCAL_DATA_SUFFIXES))}) and no "
            f"prepared {SPLIT_FILES['train']}; upload the data set to the channel's S3 prefix"
        )
    return {"dataset": ",".join(str(p) for p in files)}


def processes_per_host(env: SageMakerEnv) -> int:
    """The processes torchrun started on this host, else one process per GPU (one on a CPU host)."""
    launch = current_launch()
    return launch.processes_per_node if launch.launcher == "torchrun" else max(env.num_gpus, 1)


def build_config(env: SageMakerEnv, args: Sequence[str]) -> PipelineConfig:
    """The ``ftpipe run`` configuration of this job: the ``config`` file, SageMaker's paths over it, the
    other hyperparameters (``args``) over both; ``num_nodes`` / ``gpus_per_node`` always from the
    environment (they must match the processes the toolkit started)."""
    from ftpipe.cli.main import namespace_values, stage_parser
    from ftpipe.config import validate_config

    values = namespace_values(stage_parser().parse_args(list(args)))
    given = _given_fields(args)
    checkpoint_local = values["checkpoint_local_path"]
    derived: dict[str, Any] = {
        "data_dir": str(env.base_dir / "ftpipe" / "data"),
        "prepare_per_node": True,
        "results_dir": str(env.output_data_dir),
        "eval_dir": str(env.output_data_dir / "eval"),
        "export_dir": str(env.model_dir),
        "checkpoint_dir": str(_in_container(checkpoint_local, env)),
        "resume_from_checkpoint": "auto",
        **data_overrides(env.channel_training),
    }
    if env.num_gpus == 0:
        derived["accelerator"] = "cpu"
    values.update({name: value for name, value in derived.items() if name not in given})
    values.update(num_nodes=len(env.hosts), gpus_per_node=processes_per_host(env))
    return validate_config(PipelineConfig.from_flat(values))


def _given_fields(args: Sequence[str]) -> set[str]:
    """Field names given explicitly as ``--name`` hyperparameters (a ``--config`` file's paths yield to
    SageMaker's)."""
    return {a[2:].split("=", 1)[0] for a in args if a.startswith("--")} - {"config"}


def set_process_env(env: SageMakerEnv) -> None:
    """The guide's defaults (the launcher's job environment; a job's own environment wins), and the
    rendezvous for a launch without torchrun (Lightning's launcher)."""
    from ftpipe.sagemaker.launch import JOB_ENVIRONMENT

    for key, value in JOB_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if current_launch().launcher != "torchrun":
        set_rendezvous(env.hosts[0], SAGEMAKER_PORT, env.node_rank)


def run_job(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Any:
    """Build the configuration from SageMaker's environment, run the pipeline, add the inference code."""
    from ftpipe.config import config_to_yaml
    from ftpipe.pipeline import run
    from ftpipe.sagemaker.handler import write_inference_code

    env = SageMakerEnv.from_environ(environ)
    set_process_env(env)
    code_dir = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else Path.cwd()
    args = hyperparameter_args(env.hyperparameters, code_dir) if env.hyperparameters else list(argv or [])
    cfg = build_config(env, args)
    log.info(
        "SageMaker job on host %s (node %d of %d, %d process(es) per host, %d GPU(s)); configuration:\n%s",
        env.current_host,
        env.node_rank,
        len(env.hosts),
        cfg.train.gpus_per_node,
        env.num_gpus,
        config_to_yaml(cfg),
    )
    result = run(cfg)
    if result is not None:
        code = write_inference_code(env.model_dir)
        log.info("model for serving in %s (inference handler %s)", env.model_dir, code)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry: errors a user can act on end the job with their message and exit status."""
    if argv is None:  # the job's own process (not a call from Python): malloc settings for its processes
        reexec_with_tunables()
    setup_logging()
    try:
        run_job(sys.argv[1:] if argv is None else argv)
    except FtpipeError as err:
        log.error("%s", err)
        sys.exit(err.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
