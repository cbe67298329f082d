"""Activation memory of one training step: what autograd keeps for the backward pass, per decoder layer and
for the loss, with and without activation checkpointing.

The formula follows what PyTorch saves in a Llama-style decoder layer (checked by tallying the saved tensors
of the embedded model with ``torch.autograd.graph.saved_tensors_hooks`` and by measured runs, see
docs/estimate.md). Per token, with ``a`` the bytes of the compute dtype:

- every normalisation keeps its input in fp32 (RMSNorm upcasts): ``4 x width`` (``hidden`` for the layer
  norms, ``heads x head_dim`` / ``kv_heads x head_dim`` for per-head q/k norms);
- attention: sdpa and flash-attention keep q, k, v, the output and the log-sum-exp; sdpa with a padding
  mask repeats k and v to every head (grouped-query attention); eager keeps q and the repeated k, v plus
  the softmax probabilities ``heads x seq_len`` in fp32 per token (the s^2 term);
- a gated MLP (SwiGLU) keeps the gate, its activation and the up projection: ``3 x intermediate x a``, or
  ``2 x`` with ``recompute_elementwise`` (the activation is recomputed from the gate, ``ftpipe.model.recompute``);
- frozen linears keep nothing (only their weights, which are not activations); a trainable one keeps its
  input (once per group of linears reading the same input);
- a LoRA adapter keeps its dropout mask (1 byte per element: ``ftpipe.model.dropout``) and the dropped-out
  input (``in_features x a``; with dropout 0, or on the CPU with ``recompute_elementwise``, the shared input
  once per group instead), and the ``r``-wide intermediate.

A mixture-of-experts layer runs each token through ``experts_per_token`` experts: the MLP term is theirs
(``experts_per_token x`` one expert's width), plus the token's copy for each expert and the router's fp32
scores and probabilities. Adapted expert weights (LoRA on the experts) are materialised whole in the forward
pass and kept for the backward pass: the layer's expert weights in the compute dtype, per layer (not per
token), and once more as their gradient inside the layer's backward pass.

Activation checkpointing keeps each layer's input (``hidden x a``) and recomputes one layer at a time in the
backward pass. The loss keeps fp32 log-probabilities over the vocabulary and, in its backward pass, their
gradient and the gradient of the logits: ``3 x 4 bytes`` (plus the logits in a 16-bit compute dtype) per
position and vocabulary entry, for all ``B x T`` positions with ``loss_chunk_size`` 0, else for one chunk
of ``loss_chunk_size`` positions at a time. The loss's backward pass runs before the first layer's, so the
peak is the stored activations plus the larger of the loss phase and one layer's backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftpipe.estimate.shape import ModelShape

#: Gradient tensors alive in one layer's backward pass, per token: an allowance of three intermediate-wide
#: and two hidden-wide tensors in the compute dtype (the MLP's gradients). It counts only where one layer's
#: backward pass outweighs the loss's, which was not the case in the runs measured (docs/estimate.md).
BACKWARD_INTERMEDIATE_TENSORS = 3
BACKWARD_HIDDEN_TENSORS = 2
#: fp32 tensors per (position, vocabulary entry) at the loss's peak: log-probabilities, their gradient, and
#: the gradient of the logits.
LOSS_FP32_TENSORS = 3


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one rank.

    Attributes:
        with_checkpointing: peak activation memory with activation checkpointing of every decoder layer.
        without_checkpointing: peak activation memory without it.
        layer: what one decoder layer keeps for its backward pass (adapters included).
        lora: of ``layer``, what the LoRA adapters add.
        checkpoint_inputs: the layer inputs that checkpointing keeps (all layers).
        loss: the loss's peak (logits, log-probabilities and their gradients).
        backward_transient: gradients alive inside one layer's backward pass.
    """

    with_checkpointing: int
    without_checkpointing: int
    layer: int
    lora: int
    checkpoint_inputs: int
    loss: int
    backward_transient: int

    def counted(self, checkpointing: bool) -> int:
        return self.with_checkpointing if checkpointing else self.without_checkpointing


def _attention_per_token(shape: ModelShape, attn: str, seq_len: int, a: int) -> int:
    q, kv, heads = shape.q_dim, shape.kv_dim, shape.num_heads
    if attn == "eager":
        probs = heads * seq_len * 4 + (heads * seq_len * a if a != 4 else 0)
        return 3 * q * a + probs
    if attn == "flash_attention_2":
        return (2 * q + 2 * kv) * a + heads * 4
    # sdpa: with a padding mask transformers repeats k and v to every head (grouped-query attention)
    return 4 * q * a + heads * 4


def _linears_per_token(
    shape: ModelShape, a: int, mask_bytes: int, dropout_input_shared: bool
) -> tuple[int, int]:
    """(base, LoRA) bytes per token that the layer's linear modules keep; ``dropout_input_shared``: the
    dropped-out input is recomputed from the (shared) input and the mask."""
    base = lora = 0
    trainable_groups = {lin.input_group for lin in shape.linears if lin.trainable}
    for group in trainable_groups:  # a trainable weight needs its input for the weight gradient
        base += next(lin.in_features for lin in shape.linears if lin.input_group == group) * a
    shared_inputs: set[str] = set()
    for lin in shape.linears:
        if not lin.lora_rank:
            continue
        lora += lin.lora_rank * a  # the r-wide intermediate, kept for lora_B's weight gradient
        if lin.lora_dropout > 0:
            lora += lin.in_features * mask_bytes
            if not dropout_input_shared:
                lora += lin.in_features * a  # the dropped-out input for lora_A's weight gradient
                continue
        if lin.input_group not in trainable_groups and lin.input_group not in shared_inputs:
            shared_inputs.add(lin.input_group)
            lora += lin.in_features * a  # lora_A keeps the input the base layer reads too
    return base, lora


def _mlp_per_token(shape: ModelShape, a: int, recompute_elementwise: bool) -> int:
    """What the MLP keeps per token: gate, activation and up projection of a gated MLP (2 with the
    activation recomputed), of each routed expert in a mixture-of-experts layer."""
    tensors = (2 if recompute_elementwise else 3) if shape.gated_mlp else 1
    if not shape.is_moe:
        return tensors * shape.intermediate_size * a
    k = shape.experts_per_token
    routed_inputs = k * shape.hidden_size * a
    router = 2 * shape.num_experts * 4  # fp32 scores and probabilities
    return k * tensors * shape.expert_intermediate_size * a + routed_inputs + router


def activation_bytes(
    shape: ModelShape,
    *,
    micro_batch_size: int,
    seq_len: int,
    compute_bytes: int,
    attn: str,
    device: str,
    loss_chunk_size: int,
    recompute_elementwise: bool = True,
) -> Activations:
    """Peak activation memory of one micro-batch of ``micro_batch_size x seq_len`` tokens.

    Args:
        shape: the model's structure.
        micro_batch_size: sequences per micro-batch.
        seq_len: tokens per sequence (every position counted, as for a full or packed batch).
        compute_bytes: bytes per element of the compute dtype.
        attn: attention implementation (``sdpa``, ``flash_attention_2`` or ``eager``).
        device: ``cuda`` or ``cpu``.
        loss_chunk_size: positions per loss chunk (0: every position at once).
        recompute_elementwise: the activation outputs (and on the CPU the LoRA dropout outputs) are
            recomputed in the backward pass (``ftpipe.model.recompute``).
    """
    a = compute_bytes
    tokens = micro_batch_size * seq_len
    mask_bytes = 1  # a boolean mask on every device (ftpipe.model.dropout.LoraDropout on the CPU)
    full_ft_norms = any(lin.trainable for lin in shape.linears)
    norms = sum(n * 4 + (n * a if full_ft_norms else 0) for n in shape.norm_elements)
    mlp = _mlp_per_token(shape, a, recompute_elementwise)
    linears, lora = _linears_per_token(shape, a, mask_bytes, recompute_elementwise and device == "cpu")
    per_token = norms + _attention_per_token(shape, attn, seq_len, a) + mlp + linears + lora
    adapted_experts = shape.layer_expert_elements * a if shape.experts_adapted else 0
    layer = per_token * tokens + adapted_experts
    lora_layer = lora * tokens + adapted_experts

    h = shape.hidden_size
    final_norm = tokens * h * 4
    attn_mask = micro_batch_size * seq_len * seq_len * a if attn != "flash_attention_2" else 0
    width = (
        shape.experts_per_token * shape.expert_intermediate_size if shape.is_moe else shape.intermediate_size
    )
    transient = (
        tokens * (BACKWARD_INTERMEDIATE_TENSORS * width + BACKWARD_HIDDEN_TENSORS * h) * a + adapted_experts
    )
    positions = tokens if loss_chunk_size <= 0 else min(loss_chunk_size, tokens)
    per_logit = LOSS_FP32_TENSORS * 4 + (a if a != 4 else 0)
    loss = positions * shape.vocab_size * per_logit
    if loss_chunk_size > 0:
        loss += tokens * h * a  # the final hidden states, kept to recompute each chunk's logits

    checkpoint_inputs = shape.num_layers * tokens * h * a
    common = final_norm + attn_mask
    with_ckpt = checkpoint_inputs + common + max(loss, layer + transient)
    without_ckpt = shape.num_layers * layer + common + max(loss, transient)
    return Activations(
        with_checkpointing=int(with_ckpt),
        without_checkpointing=int(without_ckpt),
        layer=int(layer),
        lora=int(lora_layer),
        checkpoint_inputs=int(checkpoint_inputs),
        loss=int(loss),
        backward_transient=int(transient),
    )
