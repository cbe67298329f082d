"""Scale on paper: a training run on ``num_nodes`` x ``gpus_per_node`` of a named GPU and interconnect.

For 1, 2, 4, ... nodes up to the configured ``num_nodes``, ``ftpipe estimate --plan_gpu <name>`` prints:

- **memory per GPU**: the memory estimate (:mod:`ftpipe.estimate.memory`) of that layout;
- **compute per step**: the model FLOPs of an optimizer step on one GPU over ``peak x plan_mfu``. FLOPs per
  token: ``2 N`` forward, ``2 N`` backward to the inputs, ``2 N_trainable`` for the weight gradients, with
  ``N`` the matmul parameters (the input embedding is a lookup and its gradient a scatter-add; a tied head
  counts), plus attention,
  ``12 x layers x heads x head_dim x seq_len`` (torchtitan's convention: forward 4, backward 8, causal not
  halved), plus one forward (``2 N`` and attention's 4) per reference pass of a preference objective. Rows
  are counted full (``max_seq_length`` tokens: packed data; padding only lowers the tokens that count).
  MFU is model FLOPs over the peak: recomputation by activation checkpointing is not counted, it lowers the
  MFU a run reaches (by about a quarter);
- **communication per step** of one GPU, as ring collectives move it (each rank sends ``(W - 1) / W`` of
  an all-gathered or reduce-scattered tensor, twice that for an all-reduce), for the strategy: FSDP
  FULL_SHARD (FSDP2, FSDP1) all-gathers every parameter twice per micro-batch (forward, and again for the
  backward after resharding) in the gather dtype and reduce-scatters the trainable gradients per
  micro-batch; SHARD_GRAD_OP gathers once per micro-batch; HYBRID_SHARD gathers inside the node and
  all-reduces the gradient shards across nodes; DDP and NO_SHARD all-reduce the trainable gradients once
  per step (no sync while accumulating). Its time is the volume over the slowest link the ring crosses
  (NVLink inside a node, the interconnect per GPU across nodes) at :data:`LINK_EFFICIENCY` of its rate;
- **step time**: FSDP prefetches the next layer's gather while the current one computes, and DDP reduces
  buckets during the backward, so communication hides behind compute up to the compute time; what exceeds
  it is added. The column "hidden from" is the smallest micro-batch (tokens per GPU) whose compute covers
  the communication of one micro-batch: below it, the step waits for the network.

Figures are a plan, not a measurement: they follow the stated peak, MFU and link rates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ftpipe.config.schema import PipelineConfig
from ftpipe.estimate.hardware import GPUS, INTERCONNECTS, LINK_EFFICIENCY, Gpu, Interconnect
from ftpipe.estimate.memory import GIB, EstimateError, MemoryEstimate, plan
from ftpipe.estimate.shape import model_shape
from ftpipe.runtime import compute_dtype, is_16bit, weight_dtype


@dataclass(frozen=True)
class ScaleRow:
    """One layout of the plan (times in seconds, volumes in bytes, per GPU unless said otherwise)."""

    num_nodes: int
    gpus: int
    memory: MemoryEstimate
    tokens_per_step: int  # all GPUs
    compute_s: float
    comm_bytes: float
    comm_s: float
    step_s: float
    tokens_per_s: float  # all GPUs
    hidden: bool
    hidden_from_tokens: int | None  # per GPU and micro-batch; None: nothing to hide
    hybrid_comm_s: float  # the same model with FSDP1 HYBRID_SHARD (gathers inside the node)


@dataclass(frozen=True)
class ScalePlan:
    gpu: Gpu
    interconnect: Interconnect | None
    mfu: float
    flops_per_token: float
    micro_tokens: int  # tokens per GPU and micro-batch
    rows: tuple[ScaleRow, ...]


def flops_per_token(
    matmul_params: int,
    trainable_params: int,
    num_layers: int,
    attn_dim: int,
    seq_len: int,
    reference_passes: int,
) -> float:
    """Model FLOPs of one trained token (see the module doc)."""
    attention_fwd = 4.0 * num_layers * attn_dim * seq_len
    train = 4.0 * matmul_params + 2.0 * trainable_params + 3 * attention_fwd
    return train + reference_passes * (2.0 * matmul_params + attention_fwd)


def communication_bytes(
    strategy: str,
    sharding: str,
    params: int,
    trainable: int,
    gather_bytes: int,
    reduce_bytes: int,
    num_nodes: int,
    gpus_per_node: int,
    micro_batches: int,
) -> tuple[float, float]:
    """(bytes one GPU sends per optimizer step inside its node, the same across nodes) for ``strategy``."""
    world = num_nodes * gpus_per_node
    if strategy == "single" or world == 1:
        return 0.0, 0.0
    ring = (world - 1) / world
    where = (0.0, 1.0) if num_nodes > 1 else (1.0, 0.0)  # a ring over nodes crosses the slow link
    if strategy == "ddp" or (strategy == "fsdp1" and sharding == "NO_SHARD"):
        volume = 2 * ring * trainable * reduce_bytes
    elif strategy == "fsdp1" and sharding == "HYBRID_SHARD":
        node_ring = (gpus_per_node - 1) / gpus_per_node
        inside = micro_batches * node_ring * (2 * params * gather_bytes + trainable * reduce_bytes)
        across = (
            2 * (num_nodes - 1) / num_nodes * trainable / gpus_per_node * reduce_bytes if num_nodes > 1 else 0
        )
        return inside, across
    else:
        gathers = 1 if (strategy == "fsdp1" and sharding == "SHARD_GRAD_OP") else 2
        volume = micro_batches * ring * (gathers * params * gather_bytes + trainable * reduce_bytes)
    return where[0] * volume, where[1] * volume


def _nodes(upto: int) -> list[int]:
    counts, n = [], 1
    while n < upto:
        counts.append(n)
        n *= 2
    return [*counts, upto]


def scale_plan(cfg: PipelineConfig) -> ScalePlan:
    """The plan of ``cfg`` on ``plan_gpu`` (and ``interconnect`` across nodes), 1 .. ``num_nodes`` nodes."""
    ds, t = cfg.dist, cfg.train
    gpu = GPUS[ds.plan_gpu or "h100"]
    link = INTERCONNECTS[ds.interconnect] if ds.interconnect else None
    shape = model_shape(cfg)
    # what does not depend on the number of nodes
    pairs = cfg.objective.objective == "dpo"
    reference_passes = 1 if pairs and cfg.objective.reference != "cached" else 0
    matmul = shape.active_params - shape.embedding_params  # a token meets only its routed experts
    # a trained embedding's gradient is a scatter-add, not a matmul
    trainable = shape.trainable_params - (shape.embedding_params if cfg.model.finetuning == "full" else 0)
    fpt = flops_per_token(
        matmul,
        trainable,
        shape.num_layers,
        shape.num_heads * shape.head_dim,
        cfg.data.max_seq_length,
        reference_passes,
    )
    micro_tokens = t.micro_batch_size * cfg.data.max_seq_length * (2 if pairs else 1)
    rows = []
    for nodes in _nodes(t.num_nodes):
        layout_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, num_nodes=nodes))
        memory = plan(layout_cfg, shape)
        precision = memory.target.precision
        tokens_gpu = micro_tokens * t.accumulate_grad_batches
        gpus = nodes * t.gpus_per_node if ds.strategy != "single" else 1
        compute_s = tokens_gpu * fpt / (gpu.peak_tflops * 1e12 * ds.plan_mfu)
        mixed = ds.fsdp_mixed_precision and is_16bit(precision)
        reduce_bytes = (compute_dtype(precision) if mixed else weight_dtype(precision)).itemsize
        model = (
            shape.total_params,
            shape.trainable_params,
            memory.layout.gather_dtype.itemsize,
            reduce_bytes,
        )
        layout = (nodes, t.gpus_per_node, t.accumulate_grad_batches)
        inside, across = communication_bytes(ds.strategy, ds.sharding_strategy, *model, *layout)
        if across and link is None:
            raise EstimateError(
                f"num_nodes {t.num_nodes}: the plan across nodes needs the network; set interconnect (one of "
                f"{', '.join(INTERCONNECTS)})"
            )
        inter = link.gbs_per_gpu(t.gpus_per_node) if link is not None else gpu.intra_node_gbs

        fast = gpu.intra_node_gbs * 1e9 * LINK_EFFICIENCY
        slow = min(inter, gpu.intra_node_gbs) * 1e9 * LINK_EFFICIENCY
        comm_s = inside / fast + across / slow
        hybrid = communication_bytes("fsdp1", "HYBRID_SHARD", *model, *layout)
        step_s = max(compute_s, comm_s)
        per_micro_comm = comm_s / t.accumulate_grad_batches if ds.strategy.startswith("fsdp") else comm_s
        per_token_s = fpt / (gpu.peak_tflops * 1e12 * ds.plan_mfu)
        hidden_from = int(per_micro_comm / per_token_s) + 1 if comm_s > 0 else None
        rows.append(
            ScaleRow(
                num_nodes=nodes,
                gpus=gpus,
                memory=memory,
                tokens_per_step=tokens_gpu * gpus,
                compute_s=compute_s,
                comm_bytes=inside + across,
                comm_s=comm_s,
                step_s=step_s,
                tokens_per_s=tokens_gpu * gpus / step_s,
                hidden=comm_s <= compute_s,
                hidden_from_tokens=hidden_from,
                hybrid_comm_s=hybrid[0] / fast + hybrid[1] / slow,
            )
        )
    return ScalePlan(
        gpu=gpu,
        interconnect=link,
        mfu=ds.plan_mfu,
        flops_per_token=fpt,
        micro_tokens=micro_tokens,
        rows=tuple(rows),
    )


def format_plan(result: ScalePlan) -> list[str]:
    """The plan as Markdown lines (the table ``ftpipe estimate`` prints)."""
    link = result.interconnect.name if result.interconnect else "none (one node)"
    lines = [
        f"Scale plan on {result.gpu.name} ({result.gpu.peak_tflops:g} TFLOP/s bf16 dense, "
        f"{result.gpu.intra_node_gbs:g} GB/s inside a node), interconnect {link}, MFU {result.mfu:.0%}; "
        f"{result.flops_per_token / 1e9:.1f} GFLOP per token, {result.micro_tokens} tokens per GPU and micro-batch",
        "",
        "| nodes | GPUs | memory per GPU | fits | compute s/step | communication per GPU and step | "
        "communication s/step | step s | tokens/s | communication hidden | hidden from (tokens per micro-batch) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    exposed = [r for r in result.rows if not r.hidden]
    for r in result.rows:
        fits = {True: "yes", False: "no", None: "-"}[r.memory.fits]
        hidden_from = "-" if r.hidden_from_tokens is None else f"{r.hidden_from_tokens:,}"
        lines.append(
            f"| {r.num_nodes} | {r.gpus} | {r.memory.total / GIB:.1f} GiB | {fits} | {r.compute_s:.3f} | "
            f"{r.comm_bytes / 1e9:.2f} GB | {r.comm_s:.3f} | {r.step_s:.3f} | {r.tokens_per_s:,.0f} | "
            f"{'yes' if r.hidden else 'no'} | {hidden_from} |"
        )
    if exposed:
        r = exposed[0]
        lines += [
            "",
            f"From {r.num_nodes} nodes the step waits for the network ({r.comm_s:.2f} s of communication against "
            f"{r.compute_s:.2f} s of compute). Larger micro-batches (at least {r.hidden_from_tokens:,} tokens per GPU), "
            f"fewer micro-batches per step, or sharding inside the node only (strategy fsdp1, sharding_strategy "
            f"HYBRID_SHARD: {r.hybrid_comm_s:.2f} s, if its memory fits) would hide it.",
        ]
    return lines
