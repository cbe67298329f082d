"""The shape of the configured model without its weights: exact parameter counts and one decoder layer's
structure, from the model's config.json and a build on the meta device (no memory, no download of weights).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ftpipe.config.schema import PipelineConfig
from ftpipe.distributed.layers import find_decoder_layer_classes
from ftpipe.errors import FtpipeError
from ftpipe.model.errors import ModelLoadError
from ftpipe.model.moe import (
    UnknownMoeLayout,
    experts_modules,
    is_expert_adapter,
    listed_experts,
    routed_experts,
    router_modules,
)
from ftpipe.model.stats import parameter_stats
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

#: Leaf names of the projections that read a block's own result (attention output, MLP product): each
#: reads a tensor of its own; the other linears of a block read the block's normalised input together.
OUTPUT_PROJECTIONS = frozenset(
    {"o_proj", "out_proj", "dense", "down_proj", "fc2", "c_proj", "w2", "wo", "dense_4h_to_h"}
)


class ModelConfigUnavailable(FtpipeError):
    """The model's config.json cannot be read (offline and not cached, or a wrong id)."""


class ModelSizeUnknown(FtpipeError):
    """The model's config.json leaves out a size that transformers would fill with its class default."""


@dataclass(frozen=True)
class AdaptedLinear:
    """One linear module of the decoder layer.

    Attributes:
        name: its name inside the layer (``self_attn.q_proj``).
        in_features: input width.
        lora_rank: LoRA rank r of its adapter (0: no adapter).
        lora_dropout: dropout probability on the adapter input.
        trainable: its base weight trains (full fine-tuning).
        input_group: linears with the same group read the same input tensor (q/k/v, gate/up).
    """

    name: str
    in_features: int
    lora_rank: int
    lora_dropout: float
    trainable: bool
    input_group: str


@dataclass(frozen=True)
class ModelShape:
    """Everything the memory estimate needs to know about the model.

    Attributes:
        architecture: the model class (``Qwen3ForCausalLM``).
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size: from the
            model's configuration.
        total_params: every parameter (adapters included, shared ones once).
        trainable_params: parameters that train (the adapters for LoRA).
        base_params: parameters of the base model.
        layer_params: parameters of the largest decoder layer (adapters included).
        layer_trainable_params: trainable parameters of that layer.
        root_params: parameters outside the decoder layers (embeddings, final norm, output head).
        root_trainable_params: trainable parameters outside the decoder layers.
        layer_class: the decoder layer class name(s).
        linears: the linear modules of the largest decoder layer.
        norm_elements: per token, the elements each normalisation of one layer normalises.
        gated_mlp: the MLP multiplies an activated gate with an up projection (SwiGLU).
        embedding_params: parameters of the input embedding when it is not the output head's weight too
            (a lookup, no matmul: the FLOPs of a token leave them out); 0 when tied.
        num_experts: experts per mixture-of-experts layer (0: a dense model).
        experts_per_token: experts a token is routed to (``num_experts_per_tok``).
        expert_params: the stacked expert weights of all layers (every expert; a token meets
            ``experts_per_token / num_experts`` of them).
        expert_intermediate_size: one expert's MLP width.
        router_params: the routers' parameters (all layers).
        layer_expert_elements: the stacked expert weights of the largest layer.
        experts_adapted: the expert weights have LoRA adapters (PEFT materialises each layer's adapted expert
            weights in the forward pass, and autograd keeps them for the backward pass).
    """

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    total_params: int
    trainable_params: int
    base_params: int
    layer_params: int
    layer_trainable_params: int
    root_params: int
    root_trainable_params: int
    layer_class: str
    linears: tuple[AdaptedLinear, ...]
    norm_elements: tuple[int, ...]
    gated_mlp: bool
    embedding_params: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    expert_params: int = 0
    expert_intermediate_size: int = 0
    router_params: int = 0
    layer_expert_elements: int = 0
    experts_adapted: bool = False

    @property
    def adapter_params(self) -> int:
        return self.total_params - self.base_params

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def active_params(self) -> int:
        """Parameters a token passes through: all but the experts it is not routed to."""
        if not self.is_moe:
            return self.total_params
        idle = self.expert_params * (self.num_experts - self.experts_per_token) // self.num_experts
        return self.total_params - idle

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _load_config(cfg: PipelineConfig):
    from ftpipe.model.load import load_model_config

    try:
        return load_model_config(cfg)
    except ModelLoadError as err:
        raise ModelConfigUnavailable(
            f"{err}. ftpipe estimate needs only the model's config.json, not its weights: put config.json "
            "in a folder and pass that folder as --hf_model_id"
        ) from err


#: The sizes the estimate reads: config.json must give each (under the name the model type uses for it).
REQUIRED_SIZES = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "intermediate_size",
)


def _raw_config(cfg: PipelineConfig) -> tuple[dict, str] | None:
    """config.json as written (a local folder's, else the hub cache's) and how to name it; None when it
    cannot be read here (the configuration was then not read from a file)."""
    from transformers import PretrainedConfig

    from ftpipe.model.embedded import resolve_model_path

    path = resolve_model_path(cfg.model.hf_model_id, cfg.model.model_cache_dir)
    local = Path(path) / "config.json"
    try:
        if local.is_file():
            return json.loads(local.read_text(encoding="utf-8")), str(local)
        raw, _ = PretrainedConfig.get_config_dict(path)
    except Exception:  # read once already by transformers: nothing more to check here
        return None
    return raw, f"the config.json of {cfg.model.hf_model_id!r}"


def _class_default(text, name: str) -> object:
    try:
        return getattr(type(text)(), name, None)
    except Exception:  # a configuration class that needs arguments: no default to compare
        return None


def check_sizes_given(cfg: PipelineConfig, config) -> None:
    """Raise ModelSizeUnknown when config.json leaves out a size the estimate reads (transformers would
    fill it with its class default: a 4096-wide Llama); the names a model type uses (``n_embd``,
    ``d_model``) come from its configuration class's ``attribute_map``."""
    found = _raw_config(cfg)
    if found is None or not isinstance(found[0], dict):
        return
    raw, where = found
    text = _text_config(config)
    if text is not config and isinstance(raw.get("text_config"), dict):
        raw = raw["text_config"]
    aliases = getattr(type(text), "attribute_map", {}) or {}
    missing = []
    for name in REQUIRED_SIZES:
        names = dict.fromkeys([name, aliases.get(name, name)])
        if any(n in raw for n in names) or getattr(text, name, None) is None:
            continue
        default = _class_default(text, name)
        if default is not None and getattr(text, name) != default:  # derived from the sizes it gives
            continue
        missing.append(" / ".join(names))
    if missing:
        model_type = getattr(text, "model_type", None) or "this model type"
        raise ModelSizeUnknown(
            f"hf_model_id: {where} does not give {', '.join(missing)} (model type {model_type}); ftpipe "
            "estimate never assumes a model's sizes (transformers would take its class defaults): add the "
            "key(s) to config.json"
        )


def _norm_elements(name: str, module: torch.nn.Module, shape: dict[str, int]) -> int:
    weight = getattr(module, "weight", None)
    n = int(weight.numel()) if weight is not None else shape["hidden"]
    if n == shape["head_dim"]:  # per-head norms (Qwen3's q_norm / k_norm) act on every head
        leaf = name.rsplit(".", 1)[-1].lower()
        return shape["kv_dim"] if leaf.startswith("k") else shape["q_dim"]
    return n


def _input_group(name: str, in_features: int) -> str:
    parent, _, leaf = name.rpartition(".")
    return name if leaf in OUTPUT_PROJECTIONS else f"{parent}:{in_features}"


def _layer_structure(
    layer: torch.nn.Module, shape: dict[str, int]
) -> tuple[tuple[AdaptedLinear, ...], tuple[int, ...]]:
    linears, norms = [], []
    lora_owned: set[str] = set()
    for name, module in layer.named_modules():
        if is_expert_adapter(module):  # LoRA on a stacked expert weight: no linear module
            lora_owned.add(name)
        elif hasattr(module, "lora_A") and hasattr(module, "base_layer"):  # a PEFT LoRA layer
            adapters = list(module.r)
            rank = int(module.r[adapters[0]]) if adapters else 0
            drop = module.lora_dropout[adapters[0]] if adapters else None
            p = float(getattr(drop, "p", 0.0) or 0.0)
            base = module.get_base_layer()
            linears.append(
                AdaptedLinear(
                    name=name,
                    in_features=int(module.in_features),
                    lora_rank=rank,
                    lora_dropout=p,
                    trainable=bool(base.weight.requires_grad),
                    input_group=_input_group(name, int(module.in_features)),
                )
            )
            lora_owned.add(name)
        elif isinstance(module, torch.nn.Linear) and not any(
            name.startswith(owner + ".") for owner in lora_owned
        ):
            linears.append(
                AdaptedLinear(
                    name=name,
                    in_features=int(module.in_features),
                    lora_rank=0,
                    lora_dropout=0.0,
                    trainable=bool(module.weight.requires_grad),
                    input_group=_input_group(name, int(module.in_features)),
                )
            )
        elif "norm" in type(module).__name__.lower() and not list(module.children()):
            norms.append(_norm_elements(name, module, shape))
    return tuple(linears), tuple(norms)


def _is_gated(layer: torch.nn.Module, config, intermediate: int) -> bool:
    widths = [  # the base linears only, not the adapters' lora_A / lora_B
        m.out_features
        for name, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
        and "lora_" not in name
        and m.out_features in (intermediate, 2 * intermediate)
    ]
    if widths:
        return sum(widths) >= 2 * intermediate
    return str(getattr(config, "hidden_act", "")).lower() in ("silu", "swiglu", "swish")


#: Models with more decoder layers than this are measured on a few of them (see :func:`model_shape`).
PROBE_ABOVE_LAYERS = 64
_PROBE_LAYERS = 4


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _with_layers(config, n: int, k: int):
    """A copy of ``config`` with ``k`` decoder layers (per-layer lists cut to their first ``k`` entries)."""
    probe = copy.deepcopy(config)
    text = _text_config(probe)
    for name, value in list(vars(text).items()):
        if isinstance(value, list | tuple) and len(value) == n:
            setattr(text, name, type(value)(value[:k]))
    text.num_hidden_layers = k
    return probe


def _probe_count(text, n: int) -> int:
    """Enough layers to meet every kind of layer the configuration lists (``layer_types``)."""
    kinds = getattr(text, "layer_types", None)
    firsts = (
        [list(kinds).index(kind) + 1 for kind in dict.fromkeys(kinds)]
        if isinstance(kinds, list | tuple)
        else []
    )
    return min(n, max(_PROBE_LAYERS, *firsts, 0))


def _build(cfg: PipelineConfig, config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from ftpipe.model.lora import apply_lora

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code, attn_implementation="eager"
        )
        if cfg.model.finetuning == "lora":
            model = apply_lora(model, cfg, announce=False)
        else:
            model.requires_grad_(True)
    return model


def _untied_embedding_params(model) -> int:
    """The input embedding's parameters unless the output head shares its weight."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or getattr(embedding, "weight", None) is None:
        return 0
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    return 0 if tied else embedding.weight.numel()


def _experts(model, config, largest: torch.nn.Module, n_layers: int, probe: int) -> dict:
    """The mixture-of-experts part of the shape (empty for a dense model): every count scaled from the
    ``probe`` layers built to the ``n_layers`` of the model.

    Raises:
        UnknownMoeLayout: experts in a layout ftpipe does not count (a list of expert modules), or a
            router whose ``top_k`` neither it nor the configuration gives.
    """
    listed = listed_experts(model)
    if listed:
        raise UnknownMoeLayout(
            f"{type(model).__name__} keeps its experts as a list of modules ({listed[0]}); ftpipe estimates "
            "mixture-of-experts layers whose experts are stacked weights (Hugging Face's own MoE models), and "
            "would count every expert as passed by every token here. Set activation_checkpointing to true or "
            "false instead of auto"
        )
    found = experts_modules(model)
    if not found:
        return {}
    top_k = routed_experts(config) or next((int(r.top_k) for _, r in router_modules(model)), None)
    if not top_k:
        raise UnknownMoeLayout(
            f"{type(model).__name__} has {found[0].num_experts} experts per layer but neither its "
            f"configuration ({', '.join(('num_experts_per_tok', 'num_experts_per_token', 'moe_topk'))}) nor "
            "its router gives how many a token is routed to; add num_experts_per_tok to config.json"
        )
    scale = n_layers / probe
    in_layer = [e for e in found if e.name.startswith(_layer_name(model, largest) + ".")] or found[:1]
    routers = sum(p.numel() for _, r in router_modules(model) for p in r.parameters())
    adapted = any(is_expert_adapter(m) for m in largest.modules())
    return {
        "num_experts": found[0].num_experts,
        "experts_per_token": top_k,
        "expert_params": int(sum(e.weight_elements for e in found) * scale),
        "expert_intermediate_size": in_layer[0].width,
        "router_params": int(routers * scale),
        "layer_expert_elements": sum(e.weight_elements for e in in_layer),
        "experts_adapted": adapted,
    }


def _layer_name(model: torch.nn.Module, layer: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is layer)


def model_shape(cfg: PipelineConfig, probe_above: int = PROBE_ABOVE_LAYERS) -> ModelShape:
    """Build ``cfg``'s model on the meta device (with ftpipe's LoRA when ``finetuning`` is ``lora``) and
    read its parameter counts and decoder-layer structure.

    A model of more than ``probe_above`` decoder layers is built with a few of them (every kind its
    configuration lists) and counted: when those layers are alike, the others are counted as copies of
    them, so a configuration of 20,000 layers answers in seconds; when they differ, the whole model is
    built.

    Raises:
        ModelConfigUnavailable: the model's configuration cannot be read; the message says to pass a
            local folder holding config.json.
        ModelSizeUnknown: config.json leaves out a size (the message names the file and the key).
    """
    config = _load_config(cfg)
    check_sizes_given(cfg, config)
    text = _text_config(config)
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    n_layers = int(text.num_hidden_layers)
    probe = _probe_count(text, n_layers) if n_layers > probe_above else n_layers
    model = _build(cfg, _with_layers(config, n_layers, probe) if probe < n_layers else config)
    classes = tuple(find_decoder_layer_classes(model, cfg.model.decoder_layer_cls))
    layers = [m for m in model.modules() if isinstance(m, classes)]
    if probe < n_layers and len({parameter_stats(layer) for layer in layers}) != 1:
        log.info("the first %d decoder layers differ: building all %d to count them", probe, n_layers)
        probe = n_layers
        model = _build(cfg, config)
        layers = [m for m in model.modules() if isinstance(m, classes)]
    stats = parameter_stats(model)
    if probe < n_layers:  # the other layers are copies of the probed ones
        extra, layer = n_layers - probe, parameter_stats(layers[0])
        stats = dataclasses.replace(
            stats,
            total=stats.total + extra * layer.total,
            trainable=stats.trainable + extra * layer.trainable,
            base=stats.base + extra * layer.base,
        )
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_layers]
    largest = max(layers, key=lambda m: sum(p.numel() for p in m.parameters()))
    dims = {"hidden": hidden, "head_dim": head_dim, "q_dim": heads * head_dim, "kv_dim": kv_heads * head_dim}
    linears, norms = _layer_structure(largest, dims)
    moe = _experts(model, config, largest, n_layers, probe)
    shape = ModelShape(
        architecture=type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=len(layers) + (n_layers - probe),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(text.vocab_size),
        total_params=stats.total,
        trainable_params=stats.trainable,
        base_params=stats.base,
        layer_params=sum(p.numel() for p in largest.parameters()),
        layer_trainable_params=sum(p.numel() for p in largest.parameters() if p.requires_grad),
        root_params=sum(p.numel() for p in outside),
        root_trainable_params=sum(p.numel() for p in outside if p.requires_grad),
        layer_class="/".join(sorted(c.__name__ for c in classes)),
        linears=linears,
        norm_elements=norms,
        gated_mlp=_is_gated(largest, text, intermediate),
        embedding_params=_untied_embedding_params(model),
        **moe,
    )
    log.info(
        "%s: %s parameters (%s trainable), %d x %s",
        shape.architecture,
        f"{shape.total_params:,}",
        f"{shape.trainable_params:,}",
        shape.num_layers,
        shape.layer_class,
    )
    return shape
