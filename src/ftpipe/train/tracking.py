"""Experiment tracking through Lightning's loggers: TensorBoard (the default), MLflow, Weights & Biases, CSV.

One ftpipe run is one tracked run. The trackers' run ids are written to ``tracking.json`` in the run's
checkpoint folder when training starts, so a resumed run (the same folder) continues the same tracked
run, and ``ftpipe run`` logs the evaluation scores and the report into it after training. Every
tracker gets the resolved configuration as parameters and every metric the module logs; at the end of
training the configuration file, ``metrics.jsonl`` and the training summary go in as artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from ftpipe.config.paths import results_root, tb_logs_dir
from ftpipe.config.schema import PipelineConfig
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

TRACKING_FILE = "tracking.json"
DEFAULT_EXPERIMENT = "ftpipe"


def mlflow_uri(cfg: PipelineConfig) -> str:
    """The configured tracking URI, else a local SQLite store ``<results_root>/mlflow.db`` (no server)."""
    if cfg.train.mlflow_tracking_uri:
        return cfg.train.mlflow_tracking_uri
    return f"sqlite:///{(results_root(cfg) / 'mlflow.db').resolve()}"


def _mlflow_artifacts(cfg: PipelineConfig) -> str | None:
    """Where a new experiment of the local store keeps its artifacts (a server decides for itself)."""
    return None if cfg.train.mlflow_tracking_uri else (results_root(cfg) / "mlartifacts").resolve().as_uri()


def read_tracking(folder: str | Path | None) -> dict[str, Any]:
    """The tracked-run ids saved in a run's checkpoint folder (empty when there are none)."""
    if folder is None:
        return {}
    try:
        data = json.loads((Path(folder) / TRACKING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def build_loggers(cfg: PipelineConfig, version: int | None, previous: dict[str, Any]) -> list[Logger]:
    """The configured loggers (``version``: the TensorBoard/CSV version of a resumed run; ``previous``:
    its tracked-run ids)."""
    t = cfg.train
    root = results_root(cfg)
    loggers: list[Logger] = []
    for name in dict.fromkeys(t.loggers):
        if name == "tensorboard":
            loggers.append(
                TensorBoardLogger(
                    save_dir=str(tb_logs_dir(cfg)), name="", version=version, default_hp_metric=False
                )
            )
        elif name == "csv":
            loggers.append(CSVLogger(save_dir=str(root / "csv_logs"), name="", version=version))
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            loggers.append(
                MLFlowLogger(
                    experiment_name=t.experiment_name or DEFAULT_EXPERIMENT,
                    tracking_uri=mlflow_uri(cfg),
                    run_id=(previous.get("mlflow") or {}).get("run_id"),
                    artifact_location=_mlflow_artifacts(cfg),
                    log_model=False,
                )
            )
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            run_id = (previous.get("wandb") or {}).get("id")
            loggers.append(
                WandbLogger(
                    project=t.wandb_project or DEFAULT_EXPERIMENT,
                    group=t.experiment_name,
                    save_dir=str(root),
                    offline=t.wandb_mode == "offline",
                    id=run_id,
                    resume="allow" if run_id else None,
                    log_model=False,
                )
            )
    return loggers


def _ids(trainer: pl.Trainer, cfg: PipelineConfig) -> dict[str, Any]:
    ids: dict[str, Any] = {}
    for logger in trainer.loggers:
        kind = type(logger).__name__
        if kind == "MLFlowLogger":
            ids["mlflow"] = {
                "run_id": logger.run_id,
                "tracking_uri": mlflow_uri(cfg),
                "experiment": cfg.train.experiment_name or DEFAULT_EXPERIMENT,
            }
        elif kind == "WandbLogger":
            run = logger.experiment
            ids["wandb"] = {
                "id": run.id,
                "project": cfg.train.wandb_project or DEFAULT_EXPERIMENT,
                "dir": str(results_root(cfg)),
                "mode": cfg.train.wandb_mode,
            }
    return ids


class Tracking(Callback):
    """Rank 0: logs the configuration, names the tracked runs after the run's folder, saves their ids in
    the checkpoint folder, and logs the run's files as artifacts at the end of training."""

    def __init__(self, cfg: PipelineConfig, folder: Any, metrics_path: Path) -> None:
        super().__init__()
        self.cfg = cfg
        self.folder = folder  # a callable returning the checkpoint folder (known after RunFolders' setup)
        self.metrics_path = metrics_path

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        params = {
            k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in self.cfg.to_flat().items()
        }
        for logger in trainer.loggers:
            if type(logger).__name__ == "MLFlowLogger":
                _mlflow_params(logger, params)
            else:
                logger.log_hyperparams(params)
        ids = _ids(trainer, self.cfg)
        folder = Path(self.folder())
        if ids and folder:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / TRACKING_FILE).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
            log.info(
                "tracked run: %s", ", ".join(f"{k} {v.get('run_id') or v.get('id')}" for k, v in ids.items())
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from ftpipe.config.io import CONFIG_FILENAME

        root = results_root(self.cfg)
        files = [root / CONFIG_FILENAME, self.metrics_path, self.metrics_path.with_name("train_summary.json")]
        files = [f for f in files if f.is_file()]
        for logger in trainer.loggers:
            kind = type(logger).__name__
            if kind == "MLFlowLogger":
                for path in files:
                    logger.experiment.log_artifact(logger.run_id, str(path))
            elif kind == "WandbLogger":
                _wandb_files(logger.experiment, files)
                logger.experiment.finish()  # writes the summary; `ftpipe run` continues the run


def _mlflow_params(logger: Any, params: dict[str, Any]) -> None:
    """MLflow keeps a run's parameters fixed: a resumed run logs the new ones, and records the values it
    changed (``max_steps``, ``resume_from_checkpoint``, ...) as ``resumed.<name>`` tags."""
    logged = logger.experiment.get_run(logger.run_id).data.params
    if not logged:
        logger.log_hyperparams(params)
        return
    new = {k: v for k, v in params.items() if k not in logged}
    if new:
        logger.log_hyperparams(new)
    for key, value in params.items():
        if key in logged and logged[key] != str(value):
            logger.experiment.set_tag(logger.run_id, f"resumed.{key}", str(value))


def _wandb_files(run: Any, files: list[Path]) -> None:
    import wandb

    artifact = wandb.Artifact(f"ftpipe-{run.id}", type="ftpipe-run")
    for path in files:
        artifact.add_file(str(path))
    run.log_artifact(artifact)


def log_artifacts(
    cfg: PipelineConfig, ids: dict[str, Any], files: list[Path], metrics: dict[str, float] | None = None
) -> None:
    """Log ``files`` as artifacts (and ``metrics`` as final values) into the tracked runs of ``ids``, after
    training (the trainer's loggers are done)."""
    if "mlflow" in ids:
        from mlflow.tracking import MlflowClient

        info = ids["mlflow"]
        client = MlflowClient(tracking_uri=info["tracking_uri"])
        for name, value in (metrics or {}).items():
            client.log_metric(info["run_id"], name, value)
        for path in files:
            client.log_artifact(info["run_id"], str(path))
    if "wandb" in ids and (files or metrics):
        import wandb

        info = ids["wandb"]
        if wandb.run is not None:  # this process's training run: finished before it is continued
            wandb.finish()
        run = wandb.init(
            project=info["project"], id=info["id"], dir=info["dir"], mode=info["mode"], resume="allow"
        )
        try:
            if metrics:
                run.summary.update(metrics)
            if files:
                _wandb_files(run, files)
        finally:
            run.finish()


def log_evaluation(
    cfg: PipelineConfig, checkpoint_dir: str | None, aggregates: dict[str, dict[str, Any]], files: list[Path]
) -> None:
    """``ftpipe run``: the evaluation scores (``eval/<model>/<metric>``) and the report into the tracked runs."""
    ids = read_tracking(checkpoint_dir)
    if not ids:
        return
    metrics = {
        f"eval/{model}/{name}": float(value)
        for model, scores in aggregates.items()
        for name, value in scores.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    log_artifacts(cfg, ids, files, metrics)
    log.info("evaluation logged to the tracked run (%s)", ", ".join(ids))
