"""Mixture-of-experts layers, found from the model itself.

Hugging Face's MoE models keep a layer's experts as one module of stacked weights (``Qwen3MoeExperts``,
``MixtralExperts``, ``GptOssExperts``: 3-D parameters ``[num_experts, ...]`` named ``gate_up_proj`` and
``down_proj``) beside a router module (``...TopKRouter``: a ``[num_experts, hidden]`` weight and ``top_k``).
The expert weights are parameters, not linear modules: LoRA reaches them through PEFT's
``target_parameters``, the estimate counts the ``top_k`` of ``num_experts`` that a token passes through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftpipe.errors import FtpipeError

#: Configuration keys that give the experts a token is routed to, by model type.
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")


class UnknownMoeLayout(FtpipeError, ValueError):
    """A model holds experts in a layout ftpipe cannot count or adapt."""


@dataclass(frozen=True)
class ExpertsModule:
    """One layer's stacked experts.

    Attributes:
        name: the module's name in the model (``model.layers.0.mlp.experts``).
        num_experts: experts in the layer.
        parameters: its stacked expert weights (leaf names, ``gate_up_proj``, ``down_proj``) -> elements.
        other_parameters: the stacked biases and any other parameter of the module -> elements.
        width: one expert's MLP width (0 when neither declared nor readable from its down projection).
    """

    name: str
    num_experts: int
    parameters: dict[str, int]
    other_parameters: dict[str, int]
    width: int = 0

    @property
    def weight_elements(self) -> int:
        return sum(self.parameters.values()) + sum(self.other_parameters.values())


def _stacked(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters(recurse=False) if p.dim() == 3}


def is_expert_adapter(module: torch.nn.Module) -> bool:
    """True for PEFT's adapter of one parameter (``ParamWrapper``: LoRA on a stacked expert weight)."""
    return hasattr(module, "parameter_name") and hasattr(module, "lora_A")


def _width(module: torch.nn.Module, stacked: dict[str, torch.nn.Parameter]) -> int:
    """One expert's MLP width: as the module declares it, else the dimension of its down projection that
    is not the hidden size."""
    declared = getattr(module, "intermediate_dim", None) or getattr(module, "intermediate_size", None)
    if declared:
        return int(declared)
    hidden = getattr(module, "hidden_dim", None) or getattr(module, "hidden_size", None)
    down = next((p for n, p in stacked.items() if "down" in n), None)
    dims = [d for d in down.shape[1:] if d != hidden] if down is not None else []
    return int(dims[0]) if dims else 0


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module under PEFT's parameter wrappers (which nest: one per adapted parameter)."""
    while hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        module = module.base_layer
    return module


def experts_modules(model: torch.nn.Module) -> list[ExpertsModule]:
    """Every module of ``model`` that holds stacked expert weights (3-D parameters whose first dimension is
    the module's ``num_experts``), PEFT wrappers looked through."""
    found = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        inner = _unwrapped(module)
        if id(inner) in seen or "lora_" in name:
            continue
        stacked = _stacked(inner)
        if not stacked:
            continue
        count = getattr(inner, "num_experts", None) or next(iter(stacked.values())).shape[0]
        if any(p.shape[0] != count for p in stacked.values()):
            raise UnknownMoeLayout(
                f"{name} ({type(inner).__name__}) holds 3-D weights that are not stacked per expert "
                f"({ {k: tuple(p.shape) for k, p in stacked.items()} }); ftpipe cannot adapt or count it"
            )
        seen.add(id(inner))
        while name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        others = {n: p.numel() for n, p in inner.named_parameters(recurse=False) if n not in stacked}
        found.append(
            ExpertsModule(
                name=name,
                num_experts=int(count),
                parameters={n: p.numel() for n, p in stacked.items()},
                other_parameters=others,
                width=_width(inner, stacked),
            )
        )
    return found


def expert_target_parameters(model: torch.nn.Module) -> list[str]:
    """PEFT ``target_parameters`` that adapt every stacked expert weight (``mlp.experts.gate_up_proj``,
    ``mlp.experts.down_proj``): the module's path inside a layer and the parameter's name."""
    names: dict[str, None] = {}
    for experts in experts_modules(model):
        suffix = experts.name.rsplit(".", 2)[-2:]  # <block>.<experts module>
        for param in experts.parameters:
            names[".".join([*suffix, param])] = None
    return list(names)


def routed_experts(config) -> int | None:
    """Experts a token is routed to (``num_experts_per_tok`` or its model type's name), else None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in TOP_K_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def router_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The routers: modules that declare ``top_k`` and ``num_experts`` (the expert scores per token)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "top_k", None), int) and getattr(module, "num_experts", None)
    ]


def listed_experts(model: torch.nn.Module) -> list[str]:
    """Names of ``ModuleList``s of experts (``...experts``: one module per expert), a layout ftpipe does not
    count as routed (every expert would be counted as if each token passed through it)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1].lower().endswith("experts")
    ]
