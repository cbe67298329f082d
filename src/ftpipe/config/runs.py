"""The identity of a training run: its id and its manifest, the one record that says which checkpoints
are the run's own and which of them is the best and the last.

Every ``ftpipe train`` run gets an id (``20261203-131502-3fa9c1``: start time and 6 random hex digits,
decided on rank 0 and shared by every rank) and writes ``run-<id>.json`` into its checkpoint folder:
the configuration and its hash, the model and LoRA shape, the prepared data, start and end, status
(``running``, ``completed``, ``stopped``, ``failed``), and every checkpoint it wrote (name, step,
val_loss) with the best and the last. Checkpoint names start with the run id, so two runs that share a
``checkpoint_dir`` never write over each other, and ``best`` / ``last`` always come from the manifest
of the run meant (the newest by default, one named by ``run_id`` otherwise), never from a pattern
over a shared folder. A resumed run continues its manifest (same id) when it resumes from a
checkpoint of its own folder.

ftpipe deletes only what a manifest says is its own: the checkpoints a run lists and the ``.tmp`` /
``.old`` leftovers of their interrupted saves (``<listed run id>-...``), never a file by its suffix
alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftpipe.config.paths import checkpoints_dir, run_checkpoint_dirs
from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError

MANIFEST_PREFIX = "run-"
MANIFEST_SUFFIX = ".json"
#: Fields whose values must agree between a checkpoint and the run that resumes from it.
RESUME_FIELDS = (
    "hf_model_id",
    "finetuning",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "lora_target_experts",
    "use_dora",
    "use_rslora",
    "modules_to_save",
    "load_in_4bit",
)
#: Fields left out of the configuration hash: where things go and how a run is watched, not what it learns.
_UNHASHED = ("results_dir", "checkpoint_dir", "resume_from_checkpoint", "run_id", "export_dir", "eval_dir")


class RunError(FtpipeError):
    """The run meant cannot be found or used; the message names the field and the folder."""


def new_run_id() -> str:
    """A fresh run id: UTC start time and 6 random hex digits (sortable, unique in practice)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def config_hash(flat: dict[str, Any]) -> str:
    """Short hash of a flat configuration, without the fields that only say where outputs go."""
    kept = {k: v for k, v in flat.items() if k not in _UNHASHED and k != "debug"}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def manifest_path(folder: Path, run_id: str) -> Path:
    return Path(folder) / f"{MANIFEST_PREFIX}{run_id}{MANIFEST_SUFFIX}"


@dataclass
class RunManifest:
    """One run's record (``run-<id>.json`` in its checkpoint folder)."""

    run_id: str
    folder: Path
    status: str = "running"
    started: str = field(default_factory=_now)
    ended: str | None = None
    updated: str = field(default_factory=_now)
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    #: checkpoint name -> {"step": int, "val_loss": float | None, "written": time}
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    best: str | None = None
    last: str | None = None
    best_val_loss: float | None = None
    global_step: int = 0
    resumed_from: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ files

    @property
    def path(self) -> Path:
        return manifest_path(self.folder, self.run_id)

    @classmethod
    def create(
        cls, folder: Path, cfg: PipelineConfig, run_id: str | None = None, **extra: Any
    ) -> RunManifest:
        flat = cfg.to_flat()
        return cls(
            run_id=run_id or new_run_id(),
            folder=Path(folder),
            config_hash=config_hash(flat),
            config=flat,
            **extra,
        )

    @classmethod
    def load(cls, path: Path) -> RunManifest:
        """Read ``run-<id>.json``; a RunError naming the file when it is not one."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"run manifest {path} cannot be read ({err}); give another run_id") from err
        names = {f.name for f in dataclasses.fields(cls)} - {"folder"}
        if not isinstance(raw, dict) or not isinstance(raw.get("run_id"), str):
            raise RunError(f"run manifest {path} is not an ftpipe run manifest (no run_id)")
        return cls(folder=path.parent, **{k: v for k, v in raw.items() if k in names})

    def save(self) -> Path:
        """Write the manifest atomically (a reader never sees half a file)."""
        self.updated = _now()
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "folder"}
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)
        return self.path

    # ------------------------------------------------------------------ checkpoints

    def owns(self, name: str) -> bool:
        """True for a checkpoint name (or its ``.tmp`` / ``.old`` leftover) that this run writes."""
        return name.startswith(f"{self.run_id}-")

    def record_checkpoint(self, path: str | Path, step: int, val_loss: float | None) -> None:
        name = Path(path).name
        self.checkpoints[name] = {"step": int(step), "val_loss": val_loss, "written": _now()}
        self.global_step = max(self.global_step, int(step))

    def prune(self) -> None:
        """Forget listed checkpoints that are no longer on disk (keep-top-k replaced them)."""
        self.checkpoints = {n: v for n, v in self.checkpoints.items() if (self.folder / n).exists()}
        if self.best and self.best not in self.checkpoints:
            self.best = None
        if self.last and self.last not in self.checkpoints:
            self.last = None

    def checkpoint(self, which: str) -> Path | None:
        """The run's ``best`` checkpoint (lowest val_loss; the last when no validation ran) or ``last``."""
        name = self.best if which == "best" else self.last
        if which == "best" and name is None:
            name = self.last
        return self.folder / name if name else None

    def describe(self) -> str:
        return f"run {self.run_id} ({self.status}, step {self.global_step}, {self.path})"


# ---------------------------------------------------------------------------------------------- finding runs


def manifests_in(folder: Path) -> list[RunManifest]:
    """The run manifests of one checkpoint folder, oldest start first (unreadable ones skipped)."""
    found = []
    if Path(folder).is_dir():
        for path in Path(folder).glob(f"{MANIFEST_PREFIX}*{MANIFEST_SUFFIX}"):
            try:
                found.append(RunManifest.load(path))
            except RunError:
                continue
    return sorted(found, key=lambda m: (m.started, m.run_id))


def all_runs(cfg: PipelineConfig) -> list[RunManifest]:
    """Every run of ``cfg``'s checkpoint folder(s) (``checkpoint_dir``, else the ``version_<N>`` folders of
    ``checkpoints_dir``), oldest start first."""
    runs = [m for folder in run_checkpoint_dirs(cfg) for m in manifests_in(folder)]
    return sorted(runs, key=lambda m: (m.started, m.run_id))


def where_runs_are(cfg: PipelineConfig) -> str:
    return (
        str(Path(cfg.train.checkpoint_dir).expanduser())
        if cfg.train.checkpoint_dir
        else str(checkpoints_dir(cfg))
    )


def find_run(cfg: PipelineConfig, field_name: str = "checkpoint") -> RunManifest:
    """The run meant: ``run_id`` (an id, or the path of a manifest or of a run's checkpoint folder), else
    the newest run. A RunError naming the field when there is none."""
    wanted = cfg.export.run_id
    if wanted:
        path = Path(wanted).expanduser()
        if path.is_file():
            return RunManifest.load(path)
        if path.is_dir():
            runs = manifests_in(path)
            if not runs:
                raise RunError(f"run_id: {path} holds no ftpipe run manifest (run-<id>.json)")
            return runs[-1]
        if "/" in wanted or wanted.startswith((".", "~")):
            raise RunError(f"run_id: {path} does not exist; give a run id, or a run's manifest or folder")
        runs = [m for m in all_runs(cfg) if m.run_id == wanted]
        if not runs:
            known = ", ".join(m.run_id for m in all_runs(cfg)[-5:]) or "none"
            raise RunError(f"run_id: no run {wanted!r} under {where_runs_are(cfg)} (runs there: {known})")
        return runs[-1]
    runs = all_runs(cfg)
    if not runs:
        raise RunError(
            f"{field_name}: no training run under {where_runs_are(cfg)} (results_dir "
            f"{cfg.train.results_dir!r}, hf_model_id {cfg.model.hf_model_id!r}); train first "
            "(`ftpipe train`), or give a checkpoint path"
        )
    return runs[-1]


def run_of_checkpoint(path: str | Path) -> RunManifest | None:
    """The manifest (in the checkpoint's own folder) of the run that wrote ``path``, or None."""
    path = Path(path).expanduser()
    for manifest in manifests_in(path.parent):
        if path.name in manifest.checkpoints or manifest.owns(path.name):
            return manifest
    return None


def resume_problems(trained: dict[str, Any], cfg: PipelineConfig) -> list[str]:
    """How ``cfg`` differs from the configuration a checkpoint was trained with, in the fields a resume
    cannot change (the model, the fine-tuning mode and the LoRA shape)."""
    flat = cfg.to_flat()
    problems = []
    for name in RESUME_FIELDS:
        if name in trained and name in flat and _norm(trained[name]) != _norm(flat[name]):
            problems.append(
                f"{name}: the checkpoint was trained with {trained[name]!r}, this run has {flat[name]!r}"
            )
    return problems


def _norm(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value
