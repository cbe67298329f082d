"""``ftpipe export``: a training checkpoint -> a standard Hugging Face folder.

* LoRA, merged (the default): the base model is loaded once, the adapters are added to it with
  PEFT, copied in from the checkpoint and merged in place (``merge_and_unload``); the result is a
  plain transformers model (config.json, model*.safetensors, generation_config.json, tokenizer and
  chat template).
* LoRA, ``merge: false``: a PEFT adapter folder (adapter_config.json, adapter_model.safetensors,
  tokenizer). ``base_model_name_or_path`` names the base model by its hub id (for ``embedded``:
  HuggingFaceTB/SmolLM2-135M-Instruct); ``ftpipe_export.json`` also records the local folder the
  base was loaded from, so it loads offline with
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(<base_model_local_path>), folder)``.
* Full fine-tuning: the weights are assigned into a model built on the meta device (no second copy).

LoRA versus full fine-tuning is detected from the checkpoint's keys. Checkpoints are read with
``torch.load(weights_only=True)``; only safetensors are written; the resolved configuration is saved
beside the export as config.yaml.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ftpipe.config import results_root, save_config
from ftpipe.config.paths import EMBEDDED_MODEL_ID, check_output_folder
from ftpipe.config.runs import RunManifest, find_run, run_of_checkpoint
from ftpipe.config.schema import EMBEDDED_MODEL, PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.export.card import write_model_card
from ftpipe.model.checkpoint import CheckpointWeights, is_lora_key, read_checkpoint
from ftpipe.utils.folders import recover, staging_dir, swap_in
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

EXPORT_INFO_FILE = "ftpipe_export.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LORA_FIELDS = (
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_experts",
    "use_dora",
    "use_rslora",
    "init_lora_weights",
    "modules_to_save",
)


class ExportError(FtpipeError, RuntimeError):
    """The export cannot run; the message names the setting or file to change."""


@dataclass
class ExportResult:
    """Where the export is and what it holds.

    Attributes:
        path: the exported folder.
        kind: ``merged`` (LoRA merged into the base), ``adapter`` (PEFT adapter) or ``full``.
        checkpoint: the checkpoint it came from.
        base_model: the base model (hub id, or what ``hf_model_id`` names).
        base_model_path: the folder or id the base weights were loaded from.
        dtype: dtype of the saved weights.
        size_bytes: total size of the folder's files.
        seconds: how long the export took.
        run_id: the training run that wrote the checkpoint (None: a checkpoint of no known run).
        run_manifest: that run's manifest.
        checkpoint_step: the checkpoint's global step.
        checkpoint_stamp: the checkpoint's identity when exported (``provenance_stamp``): a later
            checkpoint under the same name (a resumed run) makes the export stale.
        exported_at: when (UTC).
    """

    path: str
    kind: str
    checkpoint: str
    base_model: str
    base_model_path: str
    dtype: str
    size_bytes: int
    seconds: float
    run_id: str | None = None
    run_manifest: str | None = None
    checkpoint_step: int | None = None
    checkpoint_stamp: str | None = None
    exported_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# which checkpoint, where to


def resolve_checkpoint(cfg: PipelineConfig) -> tuple[Path, RunManifest | None]:
    """``checkpoint``: ``best`` / ``last`` of the run meant (``run_id``, else the newest run), read from that
    run's manifest, or a path. Returns the checkpoint and the run that wrote it (None when unknown)."""
    choice = cfg.export.checkpoint
    if choice not in ("best", "last"):
        path = Path(choice).expanduser()
        if not path.exists():
            raise ExportError(
                f"checkpoint: {path} does not exist; give a checkpoint file/folder, best or last"
            )
        return path, run_of_checkpoint(path)
    run = find_run(cfg)
    path = run.checkpoint(choice)
    if choice == "best" and run.best is None and path is not None:
        log.info(
            "run %s has no checkpoint with a val_loss (no validation ran): using its last one", run.run_id
        )
    if path is None or not path.exists():
        raise ExportError(
            f"checkpoint: {run.describe()} lists no {choice} checkpoint on disk"
            f"{f' ({path.name} is missing)' if path is not None else ''}; give a checkpoint path, or another "
            "run_id"
        )
    return path, run


def provenance_stamp(path: Path) -> str:
    """A checkpoint's identity on disk: its resolved path, size and modification time (of ``meta.pt`` for a
    distributed folder, written last)."""
    path = Path(path).expanduser().resolve()
    probe = path / "meta.pt" if path.is_dir() else path
    stat = probe.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def read_export_info(folder: Path) -> dict[str, Any] | None:
    """``ftpipe_export.json`` of an export folder (None when the folder is no ftpipe export)."""
    path = Path(folder) / EXPORT_INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def stale_export(cfg: PipelineConfig, folder: Path) -> str | None:
    """Why the export in ``folder`` is not the model ``cfg``'s ``checkpoint`` means now (None when it is):
    made from another checkpoint, from another run than the one meant, or from a checkpoint that has
    been written again since (a resumed run). An export of no known run is taken as it is."""
    info = read_export_info(folder)
    if info is None:
        return f"{folder} is not an ftpipe export (no {EXPORT_INFO_FILE})"
    try:
        wanted, run = resolve_checkpoint(cfg)
    except FtpipeError:
        return None  # nothing to compare with: the export stands as it is
    made_from = info.get("checkpoint")
    if run is not None and info.get("run_id") not in (None, run.run_id):
        return f"it was exported from run {info.get('run_id')}, but the run meant is {run.run_id}"
    if made_from and Path(made_from).expanduser().resolve() != wanted.expanduser().resolve():
        return f"it was exported from {made_from}, but checkpoint {cfg.export.checkpoint!r} is now {wanted}"
    stamp = info.get("checkpoint_stamp")
    if stamp and wanted.exists() and stamp != provenance_stamp(wanted):
        return f"{wanted} has been written again since the export ({info.get('exported_at', '?')})"
    return None


def default_export_dir(cfg: PipelineConfig, kind: str) -> Path:
    """``export_dir``, else ``<results_root>/export/merged`` (a standalone model) or ``.../adapter``."""
    if cfg.export.export_dir:
        return Path(cfg.export.export_dir).expanduser()
    return results_root(cfg) / "export" / ("adapter" if kind == "adapter" else "merged")


def base_model_name(cfg: PipelineConfig) -> str:
    """The base model's name for other tools: the hub id of the embedded model, else ``hf_model_id``."""
    return EMBEDDED_MODEL_ID if cfg.model.hf_model_id == EMBEDDED_MODEL else cfg.model.hf_model_id


def _export_dtype(cfg: PipelineConfig, model_config) -> torch.dtype:
    if cfg.export.export_dtype != "auto":
        return _DTYPES[cfg.export.export_dtype]
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _training_config(cfg: PipelineConfig, ckpt: CheckpointWeights) -> PipelineConfig:
    """``cfg`` with the LoRA settings the checkpoint was trained with (the checkpoint describes itself)."""
    trained = ckpt.meta.get("config") or {}
    overrides = {k: trained[k] for k in _LORA_FIELDS if k in trained}
    if trained.get("hf_model_id") not in (None, cfg.model.hf_model_id):
        log.warning(
            "checkpoint %s was trained on hf_model_id %r but the configuration names %r: exporting onto %r",
            ckpt.path,
            trained["hf_model_id"],
            cfg.model.hf_model_id,
            cfg.model.hf_model_id,
        )
    return cfg.replace(**overrides) if overrides else cfg


# --------------------------------------------------------------------------------------------------
# building the model


def _base_path(cfg: PipelineConfig) -> str:
    from ftpipe.model.embedded import resolve_model_path

    return resolve_model_path(cfg.model.hf_model_id, cfg.model.model_cache_dir)


def _load_base(cfg: PipelineConfig, path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from ftpipe.model.load import load_model_config
    from ftpipe.runtime import supports_sdpa

    start = time.monotonic()
    attn = "sdpa" if supports_sdpa(load_model_config(cfg)) else "eager"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, attn_implementation=attn
    )
    log.info("loaded the base model %s (%s) in %.1fs", path, dtype, time.monotonic() - start)
    return model


def apply_adapter_weights(peft_model, weights: dict[str, torch.Tensor], source: str) -> int:
    """Copy the trained tensors into ``peft_model`` (``ftpipe.model.adapter``); an ExportError on mismatch."""
    from ftpipe.model.adapter import apply_adapter_weights as apply

    return apply(peft_model, weights, source, ExportError, "export with the training run's configuration")


def _build_lora(cfg: PipelineConfig, ckpt: CheckpointWeights, base_path: str, dtype: torch.dtype):
    from peft import get_peft_model

    from ftpipe.model.lora import lora_config

    others = [
        k for k in ckpt.weights if not is_lora_key(k) and "lora_" not in k and "modules_to_save" not in k
    ]
    if others:
        log.warning(
            "checkpoint %s: %d non-LoRA tensors (e.g. %s) are ignored", ckpt.path, len(others), others[0]
        )
    model = _load_base(cfg, base_path, dtype)
    peft_model = get_peft_model(model, lora_config(cfg, model), autocast_adapter_dtype=False)
    count = apply_adapter_weights(peft_model, ckpt.weights, str(ckpt.path))
    log.info("applied %d LoRA tensors from %s", count, ckpt.path)
    return peft_model.eval()


def _adapted(peft_model) -> str:
    """What got adapters, as PEFT built them (the default targets adapt to the model's family)."""
    config = peft_model.peft_config["default"]
    modules = config.target_modules
    names = modules if isinstance(modules, str) else ", ".join(sorted(modules or []))
    params = list(getattr(config, "target_parameters", None) or [])
    return names + (f" + experts ({', '.join(params)})" if params else "")


def _build_full(cfg: PipelineConfig, ckpt: CheckpointWeights, base_path: str, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ftpipe.runtime import supports_sdpa

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=cfg.model.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            attn_implementation="sdpa" if supports_sdpa(config) else "eager",
        )
    state = {k: v.to(dtype) for k, v in ckpt.weights.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or result.unexpected_keys:
        raise ExportError(
            f"checkpoint {ckpt.path}: the weights do not match {type(model).__name__}: missing "
            f"{still_meta[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    try:
        model.generation_config = GenerationConfig.from_pretrained(base_path)
    except OSError:
        log.info("the base model has no generation_config.json: the export gets the default one")
    return model.eval()


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_export_target(cfg: PipelineConfig) -> None:
    """Before training (``ftpipe run``): the export that will follow can be written where it will go."""
    lora = cfg.model.finetuning == "lora"
    _check_target(cfg, default_export_dir(cfg, "adapter" if lora and not cfg.export.merge else "merged"))


def _check_target(cfg: PipelineConfig, folder: Path) -> None:
    """Before any work: the export can go to ``folder`` (new, empty, or a previous ftpipe export)."""
    field = "export_dir" if cfg.export.export_dir else "results_dir"
    check_output_folder(field, folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / EXPORT_INFO_FILE).is_file():
        raise ExportError(
            f"export_dir: {folder} exists and is not an ftpipe export; choose an empty or new folder"
        )


def _save_tokenizer(cfg: PipelineConfig, folder: Path) -> None:
    from ftpipe.model.tokenizer import load_tokenizer

    load_tokenizer(cfg.model).save_pretrained(folder)


# --------------------------------------------------------------------------------------------------
# entry


def export_model(cfg: PipelineConfig) -> ExportResult:
    """Export ``cfg``'s checkpoint (``checkpoint``: best / last / a path) to a Hugging Face folder.

    Everything is checked before anything is written (the target folder, the checkpoint's structure,
    the base model's configuration); the export is written to a staging folder beside the target and
    swapped in only when complete, so a failure or a kill at any point leaves the previous export whole.
    """
    from ftpipe.model.load import load_model_config

    start = time.monotonic()
    ckpt_path, run = resolve_checkpoint(cfg)
    log.info("exporting checkpoint %s%s", ckpt_path, f" of run {run.run_id}" if run is not None else "")
    ckpt = read_checkpoint(ckpt_path)
    cfg = _training_config(cfg, ckpt)
    lora = ckpt.is_lora
    if lora != (cfg.model.finetuning == "lora"):
        log.warning(
            "finetuning is %r but the checkpoint holds %s weights: exporting it as %s",
            cfg.model.finetuning,
            "LoRA" if lora else "full",
            "LoRA" if lora else "a full fine-tune",
        )
    kind = ("merged" if cfg.export.merge else "adapter") if lora else "full"
    if not lora and not cfg.export.merge:
        log.info("merge: false has no meaning for a full fine-tune: writing the whole model")
    out = default_export_dir(cfg, kind)
    _check_target(cfg, out)
    dtype = _export_dtype(cfg, load_model_config(cfg))
    base_path = _base_path(cfg)
    recover(out)
    staging = staging_dir(out)
    staging.mkdir(parents=True)
    try:
        result = _write_export(cfg, ckpt, kind, base_path, dtype, staging, out, run)
        swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.size_bytes = _folder_size(out)
    result.seconds = time.monotonic() - start
    log.info(
        "exported %s model to %s (%.1f MB, %s) in %.1fs",
        kind,
        out,
        result.size_bytes / 1e6,
        result.dtype,
        result.seconds,
    )
    return result


def _write_export(
    cfg: PipelineConfig,
    ckpt: CheckpointWeights,
    kind: str,
    base_path: str,
    dtype: torch.dtype,
    folder: Path,
    out: Path,
    run: RunManifest | None = None,
) -> ExportResult:
    """Build the model from the checkpoint and save it, its tokenizer, config and export info in ``folder``
    (``out`` is where it will be)."""
    if kind == "full":
        model = _build_full(cfg, ckpt, base_path, dtype)
    else:
        model = _build_lora(cfg, ckpt, base_path, dtype)
    targets = _adapted(model) if kind != "full" else None
    if kind == "adapter":
        model.peft_config["default"].base_model_name_or_path = base_model_name(cfg)
        model.save_pretrained(folder, safe_serialization=True)
    else:
        if kind == "merged":
            model = model.merge_and_unload()  # in place: the base layers absorb the adapters
        model.config.use_cache = True
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=cfg.export.max_shard_size)
    del model
    _save_tokenizer(cfg, folder)
    save_config(cfg, folder)
    write_model_card(folder, cfg, kind, str(ckpt.path), base_path, targets)
    result = ExportResult(
        path=str(out),
        kind=kind,
        checkpoint=str(ckpt.path),
        base_model=base_model_name(cfg),
        base_model_path=str(Path(base_path).resolve()) if Path(base_path).exists() else base_path,
        dtype=str(dtype).removeprefix("torch."),
        size_bytes=0,
        seconds=0.0,
        run_id=run.run_id if run is not None else None,
        run_manifest=str(run.path) if run is not None else None,
        checkpoint_step=ckpt.global_step,
        checkpoint_stamp=provenance_stamp(ckpt.path),
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    info = {**result.to_dict(), "base_model_local_path": result.base_model_path}
    (folder / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return result
