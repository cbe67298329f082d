"""LoRA adapter weights from a file: a training checkpoint's or an exported adapter folder's.

Used where a run continues an adapter (``init_adapter``: preference tuning on top of an SFT run) and
where an export merges one. The tensors are the PEFT model's trainable parameters (the LoRA matrices,
DoRA's magnitudes, the whole modules of ``modules_to_save``): every one must be present with the
model's shape, or the error names the file and the mismatch (another ``lora_rank`` or target modules).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ftpipe.model.checkpoint import CheckpointError, hf_name, is_lora_key, read_checkpoint

ADAPTER_FILE = "adapter_model.safetensors"


def read_adapter(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors (Hugging Face / adapter-file names) of a training checkpoint (file or
    distributed folder) or of an adapter folder (``adapter_model.safetensors``, ``export merge: false``)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / ADAPTER_FILE).is_file():
        from safetensors.torch import load_file

        return {hf_name(k): v for k, v in load_file(str(path / ADAPTER_FILE)).items()}
    if not path.exists():
        raise CheckpointError(
            f"init_adapter: {path} does not exist (give an SFT run's checkpoint file or folder, or an "
            "adapter folder exported with merge: false)"
        )
    return read_checkpoint(path).weights


def apply_adapter_weights(
    peft_model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
    source: str,
    error: type[Exception] = CheckpointError,
    hint: str = "use the LoRA settings the adapter was trained with",
) -> int:
    """Copy the trained tensors (HF / adapter-file names) into ``peft_model`` in place; returns how many.
    A missing, unexpected or differently shaped tensor raises ``error`` naming ``source``."""
    params = {hf_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {k: v for k, v in weights.items() if k in params or is_lora_key(k) or "lora_" in k}
    missing, unexpected = sorted(set(params) - set(lora)), sorted(set(lora) - set(params))
    if missing or unexpected:
        raise error(
            f"{source}: the LoRA weights do not fit the model built from lora_rank/lora_target_modules: "
            f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}; {hint}"
        )
    with torch.no_grad():
        for name, param in params.items():
            tensor = lora[name]
            if tensor.shape != param.shape:
                raise error(
                    f"{source}: {name} has shape {tuple(tensor.shape)} but the model's is {tuple(param.shape)} "
                    f"(another lora_rank?); {hint}"
                )
            param.copy_(tensor.to(param.dtype))
    return len(params)
