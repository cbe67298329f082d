"""Reading the model weights of a training checkpoint with ``torch.load(weights_only=True)``.

Nothing here unpickles arbitrary objects: files go through ``torch.load(weights_only=True)``, and the
distributed checkpoint's ``.metadata`` (which torch itself reads with plain ``pickle.load``) through
an unpickler that accepts only the checkpoint's own metadata classes, torch sizes and dtypes. A file
that carries any other object is refused with a CheckpointError before that object is built.

A checkpoint is a Lightning ``.ckpt`` file (single device, DDP) or a distributed-checkpoint folder
(FSDP2 through ``ModelParallelStrategy(save_distributed_checkpoint=True)``, FSDP1 with sharded state
dicts: ``*.distcp`` shards, ``.metadata``, and Lightning's ``meta.pt``). Only the model tensors of a
folder are read (not the optimizer state), straight from the shards without a process group.

Keys are normalised to the names of the Hugging Face model (what ``save_pretrained`` and PEFT's
adapter files use): the distributed checkpoint's top key (``state_dict.`` / ``model.``), the
LightningModule's ``model.`` and PEFT's ``base_model.model.`` prefixes and the adapter name
(``lora_A.default.weight`` -> ``lora_A.weight``) are stripped.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ftpipe.errors import FtpipeError

#: Lightning's metadata file inside a distributed checkpoint folder.
DCP_METADATA_FILE = "meta.pt"
#: Key of ftpipe's own metadata in a checkpoint (``ftpipe.train.module.CHECKPOINT_META_KEY``).
META_KEY = "ftpipe"
LIGHTNING_PREFIX = "model."
PEFT_PREFIX = "base_model.model."
_DCP_TOP_KEYS = ("state_dict.", "model.")
_ADAPTER_NAME = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.default(?=\.|$)")


class CheckpointError(FtpipeError, ValueError):
    """A checkpoint cannot be read or holds no model weights; the message names the path."""


@dataclass
class CheckpointWeights:
    """Model weights of a checkpoint under Hugging Face names, and what the checkpoint says about itself.

    Attributes:
        path: the checkpoint file or folder.
        weights: HF name -> tensor (CPU).
        meta: ftpipe's metadata (``config``, ``finetuning``, ...); empty for foreign checkpoints.
        global_step: optimizer steps at the checkpoint (None when unknown).
    """

    path: Path
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    global_step: int | None = None

    @property
    def is_lora(self) -> bool:
        """LoRA when any key is a LoRA matrix (detected from the checkpoint itself, not the config)."""
        return any(is_lora_key(k) for k in self.weights)


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_A", ".lora_B"))


def hf_name(key: str) -> str:
    """A LightningModule / PEFT state-dict key -> the Hugging Face / PEFT adapter-file name."""
    key = key.removeprefix(LIGHTNING_PREFIX).removeprefix(PEFT_PREFIX)
    return _ADAPTER_NAME.sub(r".\1", key)


def _why_refused(err: BaseException) -> str:
    """The line of torch's weights_only error that names the refused object, else the first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line]
    return f"{type(err).__name__}: {(named or lines or [''])[0]}"


def _looks_like_torch_file(path: Path) -> bool:
    """True for a zip archive (what ``torch.save`` writes) or a pickle (its legacy format)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"  # a pickle's PROTO opcode


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int | None]:
    if not _looks_like_torch_file(path):
        raise CheckpointError(
            f"checkpoint {path}: not a checkpoint file (neither a zip archive written by torch.save nor a "
            "pickle); give a .ckpt written by `ftpipe train`, best, last, or a distributed-checkpoint folder"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read with torch.load(weights_only=True) ({_why_refused(err)}); "
            "only checkpoints of plain tensors and Python values are accepted, because unpickling other "
            "objects can run code. Use a checkpoint written by `ftpipe train`, or re-save the file's "
            "state_dict of tensors where you trust it"
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "the file is damaged or not a checkpoint"
        ) from err
    return _checked_structure(path, ckpt)


def _checked_structure(path: Path, ckpt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], int | None]:
    """The weights, ftpipe metadata and step of a loaded checkpoint, its structure checked before any
    weight is used: a mapping whose ``state_dict`` (or ``model``) maps names to tensors."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"checkpoint {path}: holds a {type(ckpt).__name__}, not a checkpoint (a mapping with 'state_dict')"
        )
    weights = ckpt.get("state_dict")
    if weights is None:
        weights = ckpt.get("model")
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f"checkpoint {path}: no model weights (neither 'state_dict' nor 'model')")
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path}: state_dict entry {key!r} holds a {type(value).__name__}, not a tensor; "
                "the file is not a model checkpoint"
            )
    meta = ckpt.get(META_KEY) or {}
    step = ckpt.get("global_step")
    return (
        dict(weights),
        dict(meta) if isinstance(meta, dict) else {},
        step if isinstance(step, int) else None,
    )


#: (module, name) pairs a distributed checkpoint's ``.metadata`` pickle may refer to.
_DCP_METADATA_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, refusing every global but its metadata classes and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} (not checkpoint metadata)")


def _dcp_reader(path: Path):
    """A ``FileSystemReader`` whose metadata is read with :class:`_MetadataUnpickler`, not ``pickle.load``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            file = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                with open(file, "rb") as handle:
                    metadata = _MetadataUnpickler(handle).load()
            except Exception as err:
                raise CheckpointError(
                    f"checkpoint {path}: {file.name} cannot be read safely ({type(err).__name__}: {err}); "
                    "only distributed-checkpoint metadata is accepted, never other pickled objects"
                ) from err
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"checkpoint {path}: {file.name} holds a {type(metadata).__name__}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def check_distributed_metadata(path: str | os.PathLike) -> None:
    """Raise CheckpointError unless the ``.metadata`` of distributed-checkpoint folder ``path`` is plain
    checkpoint metadata. torch's own reader (used by Lightning on resume) unpickles it without limits;
    call this on a folder before handing it to ``trainer.fit(ckpt_path=...)``."""
    _dcp_reader(Path(path).expanduser()).read_metadata()


def _load_meta_pt(path: Path) -> dict[str, Any]:
    try:
        extra = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path.parent}: {path.name} cannot be read with torch.load(weights_only=True) "
            f"({_why_refused(err)}); only plain tensors and Python values are accepted"
        ) from err
    return extra if isinstance(extra, dict) else {}


def _load_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int | None]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _dcp_reader(path)
    metadata = reader.read_metadata()
    tensors = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    top = next((p for p in _DCP_TOP_KEYS if any(k.startswith(p) for k in tensors)), None)
    if top is None:
        raise CheckpointError(
            f"checkpoint {path}: the distributed checkpoint holds no model tensors (no key under "
            f"{' or '.join(repr(p) for p in _DCP_TOP_KEYS)}); keys: {sorted(tensors)[:5]} ..."
        )
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in tensors.items() if k.startswith(top)
    }
    # Reads only these tensors from the shards (DCP's reader uses torch.load(weights_only=True)).
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, storage_reader=reader, no_dist=True)
    weights = {k.removeprefix(top): v for k, v in state.items()}
    meta, step = {}, None
    if (path / DCP_METADATA_FILE).is_file():
        extra = _load_meta_pt(path / DCP_METADATA_FILE)
        meta, step = dict(extra.get(META_KEY) or {}), extra.get("global_step")
    return weights, meta, step


def read_checkpoint(path: str | os.PathLike) -> CheckpointWeights:
    """The model weights (HF names) and ftpipe metadata of a checkpoint file or distributed folder."""
    path = Path(path).expanduser()
    if path.is_file():
        raw, meta, step = _load_file(path)
    elif path.is_dir() and (path / ".metadata").is_file():
        raw, meta, step = _load_folder(path)
    else:
        raise CheckpointError(
            f"checkpoint: {path} is neither a checkpoint file nor a distributed-checkpoint folder "
            "(with .metadata); set checkpoint to best, last, or an existing checkpoint path"
        )
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name = hf_name(key)
        if name in weights:
            raise CheckpointError(f"checkpoint {path}: keys {key!r} and another both map to {name!r}")
        weights[name] = tensor
    return CheckpointWeights(path=path, weights=weights, meta=meta, global_step=step)


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """ftpipe's metadata of a checkpoint (its ``config`` among others) without reading the weights of a
    distributed folder; ``{}`` when the checkpoint carries none."""
    path = Path(path).expanduser()
    if path.is_dir():
        meta_pt = path / DCP_METADATA_FILE
        return dict(_load_meta_pt(meta_pt).get(META_KEY) or {}) if meta_pt.is_file() else {}
    return dict(read_checkpoint(path).meta)
