"""LoRA adapters through PEFT: the configured rank, alpha, dropout and targets on a frozen base.

Targets. ``lora_target_modules`` at its default (the attention and MLP projections of Llama-style models,
``q_proj`` ... ``down_proj``) adapts to the model: those names where the model has every one of them; else
the linear layers of its decoder blocks (GPT-NeoX's ``query_key_value`` ... ``dense_4h_to_h``, Phi-3's fused
``qkv_proj`` and ``gate_up_proj``; routers and the output head left out); else PEFT's table of names per
model type. What was chosen is logged. ``[all-linear]`` is PEFT's every-linear-layer choice; names given
by hand must all exist. Mixture-of-experts models keep their experts as stacked weights, not linear modules
(``ftpipe.model.moe``): ``lora_target_experts`` adapts them through PEFT's ``target_parameters``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

from ftpipe.config.schema import DEFAULT_LORA_TARGETS, PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.model.dropout import use_lora_dropout
from ftpipe.model.moe import expert_target_parameters, experts_modules
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


class LoraTargetError(FtpipeError, ValueError):
    """A configured LoRA target module does not exist in the model."""


#: ``lora_target_modules: [all-linear]``: PEFT's every-linear-layer-but-the-output choice.
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraTargets:
    """What gets adapters.

    Attributes:
        modules: module leaf names, or ``all-linear``.
        parameters: PEFT ``target_parameters`` (stacked expert weights, ``mlp.experts.gate_up_proj``).
        how: where the choice came from (logged, and written in the model card).
        experts: the model has stacked experts that get adapters (by ``parameters`` or by ``all-linear``).
    """

    modules: tuple[str, ...] | str
    parameters: tuple[str, ...] = ()
    how: str = "lora_target_modules"
    experts: bool = False

    def describe(self) -> str:
        names = self.modules if isinstance(self.modules, str) else ", ".join(self.modules)
        return names + (f" + experts ({', '.join(self.parameters)})" if self.parameters else "")


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | Conv1D)


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers PEFT can adapt: neither the output head nor a router (an expert
    score per token, or one gate value) nor a layer inside an adapter."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    experts = {e.num_experts for e in experts_modules(model)}
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if not _is_linear(module) or module is head or "lora_" in name or name.endswith("base_layer"):
            continue
        out = getattr(module, "out_features", None) or getattr(module, "nf", None)
        if out == 1 or (experts and out in experts):
            continue
        names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def _model_type(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None)


def _leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def _default_modules(model: torch.nn.Module) -> tuple[tuple[str, ...], str]:
    """The default targets adapted to ``model`` and how they were found."""
    linear = _linear_names(model)
    if all(t in linear for t in DEFAULT_LORA_TARGETS):
        return DEFAULT_LORA_TARGETS, "default"
    arch = type(model).__name__
    if linear:
        return tuple(linear), f"default adapted to {arch}: the linear layers of its blocks"
    family = PEFT_TARGETS.get(_model_type(model) or "", [])
    if family and all(t in _leaf_names(model) for t in family):
        return tuple(family), f"default adapted to {arch}: PEFT's names for {_model_type(model)}"
    raise LoraTargetError(
        f"lora_target_modules: {arch} has none of the default targets ({', '.join(DEFAULT_LORA_TARGETS)}), no "
        "linear layer PEFT can adapt, and PEFT lists no names for its model type; name its modules in "
        "lora_target_modules"
    )


def _check_targets(model: torch.nn.Module, targets: list[str], field: str = "lora_target_modules") -> None:
    missing = [t for t in targets if t not in _leaf_names(model) and t != ALL_LINEAR]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})
        raise LoraTargetError(
            f"{field}: {missing} not found in {type(model).__name__}; linear modules it has: {linear}"
        )


def resolve_targets(model: torch.nn.Module, cfg: PipelineConfig) -> LoraTargets:
    """The modules (and expert weights) of ``model`` that get adapters under ``cfg.lora``.

    Raises:
        LoraTargetError: a named module is missing, or ``lora_target_experts`` is set on a model without
            stacked experts (the message lists what the model has).
    """
    lo = cfg.lora
    given = list(lo.lora_target_modules)
    has_experts = bool(experts_modules(model))
    if given == [ALL_LINEAR]:
        return LoraTargets(ALL_LINEAR, how="all-linear", experts=has_experts)
    if given == list(DEFAULT_LORA_TARGETS):
        modules, how = _default_modules(model)
    else:
        _check_targets(model, given)
        modules, how = tuple(given), "lora_target_modules"
    parameters: tuple[str, ...] = ()
    if lo.lora_target_experts:
        if not has_experts:
            raise LoraTargetError(
                f"lora_target_experts: {type(model).__name__} has no stacked experts (it is not a "
                "mixture-of-experts model, or keeps its experts as linear modules: name them in "
                "lora_target_modules); set lora_target_experts: false"
            )
        parameters = tuple(expert_target_parameters(model))
    if has_experts and not parameters:
        how += "; the experts are not adapted (lora_target_experts: true adapts them)"
    return LoraTargets(modules, parameters, how, experts=bool(parameters))


def lora_config(
    cfg: PipelineConfig, model: torch.nn.Module | None = None, *, targets: LoraTargets | None = None
) -> PeftLoraConfig:
    """The PEFT LoRA configuration from ``cfg.lora`` (bias ``none``, causal-LM task) for ``model`` (its
    targets resolved, :func:`resolve_targets`; without a model, the configured names as given).

    ``targets``: already resolved (they are then not resolved again). PEFT refuses dropout on adapted
    parameters (the expert weights): when experts get adapters, PEFT's dropout is 0 and :func:`apply_lora`
    puts ``lora_dropout`` on the linear layers' adapters itself."""
    lo = cfg.lora
    if targets is None and model is not None:
        targets = resolve_targets(model, cfg)
    elif targets is None:
        given = list(lo.lora_target_modules)
        targets = LoraTargets(ALL_LINEAR if given == [ALL_LINEAR] else tuple(given))
    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lo.lora_rank,
        lora_alpha=lo.lora_alpha,
        lora_dropout=0.0 if targets.experts else lo.lora_dropout,
        target_modules=targets.modules if isinstance(targets.modules, str) else list(targets.modules),
        target_parameters=list(targets.parameters) or None,
        bias="none",
        use_dora=lo.use_dora,
        use_rslora=lo.use_rslora,
        init_lora_weights=True if lo.init_lora_weights == "default" else lo.init_lora_weights,
        modules_to_save=list(lo.modules_to_save) if lo.modules_to_save else None,
    )


def apply_lora(model: torch.nn.Module, cfg: PipelineConfig, *, announce: bool = True) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; the base weights are frozen, only the adapters train.

    Every named target must exist in the model (a typo would otherwise train fewer modules than asked,
    silently); the default targets adapt to the model's family (see the module docstring).
    """
    targets = resolve_targets(model, cfg)
    _check_targets(model, list(cfg.lora.modules_to_save or []), "modules_to_save")
    if targets.experts and cfg.lora.use_dora:
        raise LoraTargetError(
            "use_dora: PEFT has no DoRA for expert weights; set use_dora: false, or lora_target_experts: false "
            "(with all-linear, name the linear modules instead)"
        )
    # Adapters in the base weights' dtype (PEFT would upcast them to fp32 under bf16 weights): FSDP
    # needs one dtype per sharded unit, and bf16-true means bf16 throughout.
    peft_model = get_peft_model(model, lora_config(cfg, targets=targets), autocast_adapter_dtype=False)
    lo = cfg.lora
    # PEFT's nn.Dropout -> the faster, leaner LoraDropout (same p); with expert adapters (no dropout in
    # PEFT) the linear layers' adapters get lora_dropout here
    use_lora_dropout(peft_model, lo.lora_dropout if targets.experts else None)
    log.log(
        logging.INFO if announce else logging.DEBUG,
        "LoRA: r=%d alpha=%d dropout=%g on %s (%s)%s",
        lo.lora_rank,
        lo.lora_alpha,
        lo.lora_dropout,
        targets.describe(),
        targets.how,
        "".join(
            f"; {text}"
            for text, on in (
                (
                    "no dropout on the experts' adapters (PEFT has none for them)",
                    targets.experts and lo.lora_dropout,
                ),
                ("DoRA", lo.use_dora),
                ("rank-stabilised", lo.use_rslora),
                (f"init {lo.init_lora_weights}", lo.init_lora_weights != "default"),
                (f"whole modules trained: {', '.join(lo.modules_to_save or [])}", bool(lo.modules_to_save)),
            )
            if on
        ),
    )
    return peft_model
