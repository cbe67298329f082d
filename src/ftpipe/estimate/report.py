"""The table ``ftpipe estimate`` prints on stdout (rich)."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.table import Table

from ftpipe.estimate.memory import GIB, HEADROOM, MemoryEstimate
from ftpipe.estimate.memory import format_gib as _gib
from ftpipe.estimate.shape import ModelShape
from ftpipe.runtime import compute_dtype, weight_dtype


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _rows(est: MemoryEstimate) -> list[tuple[str, str, str]]:
    s, t, lay = est.shape, est.target, est.layout
    w = _dtype(weight_dtype(t.precision))
    per = f" / {lay.shard_size} shards" if lay.shard_size > 1 else ""
    offloaded = " (in host memory: cpu_offload)" if lay.offload else ""
    master = " (fp32 master weights)" if t.precision.endswith("-mixed") else ""
    acts = est.activations
    counted_on, counted_off = (
        ("counted", "not counted") if est.activation_checkpointing else ("not counted", "counted")
    )
    lora_note = f"{_count(s.adapter_params)} params in {w}{per}{offloaded}"
    lora_rows = [("LoRA weights", _gib(est.lora_weights), lora_note)] if s.adapter_params else []
    if lay.unsharded == "layers":
        buffers = (
            f"unsharded in {_dtype(lay.gather_dtype)}: 2 x {s.layer_class} ({_count(s.layer_params)} params, "
            f"current + prefetched) + root unit ({_count(s.root_params)}: embeddings, norm, head) + one layer's "
            "gradients before the reduce-scatter"
        )
    elif lay.unsharded == "all":
        buffers = "SHARD_GRAD_OP keeps every unit unsharded between forward and backward"
    elif "DDP" in lay.description:
        buffers = "none: the gradients are views into DDP's all-reduce buckets"
    elif est.fsdp_buffers:
        buffers = (
            f"a full {_dtype(lay.gather_dtype)} copy of the parameters (FSDP mixed precision, no sharding)"
        )
    else:
        buffers = "none (no sharding)"
    overhead = (
        "fixed allowance: CUDA context and NCCL buffers"
        if t.device == "cuda"
        else "none on the CPU (the process before the model is built is not counted)"
    )
    reference_rows = (
        [
            (
                "reference model (frozen copy)",
                _gib(est.reference_weights),
                f"{_count(s.base_params)} params in {w}{per}",
            )
        ]
        if est.reference_weights
        else []
    )
    rows = [
        ("base weights", _gib(est.weights), f"{_count(s.base_params)} params in {w}{master}{per}{offloaded}"),
        *reference_rows,
        *lora_rows,
        (
            "gradients",
            _gib(est.gradients),
            f"{_count(s.trainable_params)} trainable params in {w}{per}{offloaded}",
        ),
        ("optimizer state (AdamW)", _gib(est.optimizer_state), f"2 moments in {w}{per}{offloaded}"),
        ("FSDP / DDP buffers", _gib(est.fsdp_buffers), buffers),
        (
            f"activations, checkpointing on ({counted_on})",
            _gib(acts.with_checkpointing),
            f"{s.num_layers} layer inputs {_gib(acts.checkpoint_inputs)} + the larger of the loss "
            f"{_gib(acts.loss)} and one layer recomputed {_gib(acts.layer)} with its backward "
            f"{_gib(acts.backward_transient)}",
        ),
        (
            f"activations, checkpointing off ({counted_off})",
            _gib(acts.without_checkpointing),
            f"{s.num_layers} x {_gib(acts.layer)} per layer"
            + (f" (LoRA adapters {_gib(acts.lora)} of it)" if acts.lora else "")
            + f" + loss {_gib(acts.loss)}",
        ),
        ("framework overhead", _gib(est.overhead), overhead),
        ("total", _gib(est.total), f"per {'GPU' if t.device == 'cuda' else 'process'}"),
    ]
    if est.host_offloaded:
        rows.append(("host memory (cpu_offload)", _gib(est.host_offloaded), "per process, not counted above"))
    return rows


def _verdict(est: MemoryEstimate) -> str:
    if est.device_memory is None:
        return "no verdict: set gpu_memory_gib (GiB of one GPU) to check whether it fits"
    usable = est.usable_memory or 0
    head = (
        f"{est.device_memory / GIB:.1f} GiB per GPU, {usable / GIB:.1f} GiB usable ({HEADROOM:.0%} headroom)"
    )
    if est.fits:
        return f"fits: {_gib(est.total)} of {head}; {_gib(usable - est.total)} to spare"
    return f"does not fit: {_gib(est.total)} needed, {head}; {_gib(est.total - usable)} too much"


def _moe(s: ModelShape) -> str:
    """``, mixture of experts: ...`` for an MoE model: what a token passes through and what the experts are."""
    if not s.is_moe:
        return ""
    return (
        f"; mixture of experts: {_count(s.active_params)} active per token, {s.experts_per_token} of "
        f"{s.num_experts} experts ({_count(s.expert_params)} expert weights{', adapted' if s.experts_adapted else ''}, "
        f"{_count(s.router_params)} router)"
    )


def print_estimate(est: MemoryEstimate, file: TextIO | None = None) -> None:
    """Print ``est`` as a table, then the verdict and, when it does not fit, what would."""
    console = Console(file=file or sys.stdout, soft_wrap=False)
    if not console.is_terminal:
        console.width = 160
    s, t, lay = est.shape, est.target, est.layout
    title = (
        f"Memory per {'GPU' if t.device == 'cuda' else 'process'}: {est.model} ({s.architecture}, "
        f"{_count(s.total_params)} params, {_count(s.trainable_params)} trainable{_moe(s)})"
    )
    caption = (
        f"{lay.description}; {t.precision} (compute in {_dtype(compute_dtype(t.precision))}) on {t.note}; "
        f"attention {t.attn_implementation}; "
        f"micro-batch {est.micro_batch_size} x {est.seq_len} tokens"
    )
    table = Table(title=title, caption=caption, show_lines=False)
    table.add_column("component")
    table.add_column("memory", justify="right")
    table.add_column("how")
    for name, value, note in _rows(est):
        style = "bold" if name == "total" else None
        table.add_row(name, value, note, style=style, end_section=name == "framework overhead")
    console.print(table)
    console.print(_verdict(est))
    if est.auto_reason:
        console.print(est.auto_reason[0].upper() + est.auto_reason[1:])
    if est.advice:
        console.print("What would make it fit (each change alone, its total):")
        for tip in est.advice:
            console.print(f"  - {tip}")
