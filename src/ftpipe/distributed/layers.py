"""Which modules are the decoder layers (the unit of FSDP sharding and of activation checkpointing).

Found from the model itself, never from a table of model names: the classes Hugging Face lists in
``_no_split_modules`` that occur in the model, else the most repeated block class in a ModuleList.
"""

from __future__ import annotations

from collections import Counter

import torch

from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


class DecoderLayerNotFoundError(FtpipeError, ValueError):
    """No decoder layer class could be identified; set ``decoder_layer_cls``."""


def _no_split_names(model: torch.nn.Module) -> list[str]:
    names: list[str] = []
    for module in model.modules():  # PEFT wrappers hold the Hugging Face model as a submodule
        for name in getattr(module, "_no_split_modules", None) or []:
            if name not in names:
                names.append(name)
    return names


def _repeated_block_class(model: torch.nn.Module) -> type[torch.nn.Module] | None:
    counts: Counter[type] = Counter()
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            counts.update(type(child) for child in module)
    if not counts:
        return None
    cls, n = counts.most_common(1)[0]
    return cls if n >= 2 else None


def _class_names(model: torch.nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules()})


def find_decoder_layer_classes(
    model: torch.nn.Module, override: str | None = None
) -> set[type[torch.nn.Module]]:
    """The decoder layer class(es) of ``model`` (a Hugging Face model, possibly PEFT-wrapped).

    Args:
        model: the model (real or on the meta device).
        override: class name to use instead (``decoder_layer_cls``).

    Raises:
        DecoderLayerNotFoundError: naming the model class, what was tried and the field to set.
    """
    model_name = type(model).__name__
    present = {type(m).__name__: type(m) for m in model.modules()}
    if override:
        if override not in present:
            raise DecoderLayerNotFoundError(
                f"decoder_layer_cls: {override!r} is not a module class of {model_name} "
                f"(its classes: {_class_names(model)})"
            )
        found, how = {present[override]}, "decoder_layer_cls"
    else:
        no_split = _no_split_names(model)
        found = {present[name] for name in no_split if name in present}
        how = "_no_split_modules"
        if not found:
            block = _repeated_block_class(model)
            found, how = ({block}, "most repeated block in a ModuleList") if block else (set(), "")
        if not found:
            raise DecoderLayerNotFoundError(
                f"cannot find the decoder layer class of {model_name}: tried _no_split_modules "
                f"({no_split or 'none declared'}; none present in the model) and a block class repeated "
                f"in a ModuleList (none). Set decoder_layer_cls to the class name of its transformer "
                f"block (its classes: {_class_names(model)})"
            )
    log.info("decoder layers: %s (from %s)", ", ".join(sorted(c.__name__ for c in found)), how)
    return found


def discover_decoder_layer_classes(cfg: PipelineConfig) -> set[type[torch.nn.Module]]:
    """The decoder layer classes of ``cfg``'s model without loading weights (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    from ftpipe.model.load import load_model_config

    config = load_model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return find_decoder_layer_classes(model, cfg.model.decoder_layer_cls)
