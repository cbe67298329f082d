"""The transformers generation backend: ``generate`` over left-padded batches sorted by length, stopping
at the model's EOS token(s)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ftpipe.evaluate.generation_types import GenerationError, GenerationResult, GenerationSettings, rate
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


def _eos_ids(model, tokenizer) -> list[int]:
    """The serving rule's EOS ids (``eos_token_ids``); an error when there are none."""
    from ftpipe.model.serving_handler import eos_token_ids

    ids = eos_token_ids(model, tokenizer)
    if not ids:
        raise GenerationError(
            f"{tokenizer.name_or_path}: neither the generation config nor the tokenizer names an EOS token, "
            "so answers cannot stop; give the tokenizer one (tokenizer.eos_token = ...)"
        )
    return ids


def _answer_length(ids: Sequence[int], eos_ids: set[int]) -> int:
    """Tokens of one generated row up to and including its first EOS (padding after it excluded)."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return i + 1
    return len(ids)


def generate_transformers(
    model_path: str, prompts: list[list[int]], settings: GenerationSettings
) -> GenerationResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed

    from ftpipe.evaluate.device import device_and_dtype
    from ftpipe.model.tokenizer import ensure_pad_token

    start = time.perf_counter()
    device, dtype = device_and_dtype(settings.accelerator)
    trust = settings.trust_remote_code
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust)
    model.to(device).eval()
    eos_ids = _eos_ids(model, tokenizer)
    sampling = settings.temperature > 0
    gen_config = GenerationConfig(
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=None,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    load_seconds = time.perf_counter() - start
    log.info("transformers: %s loaded on %s in %s (%.1fs)", model_path, device, dtype, load_seconds)

    set_seed(settings.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    texts: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    gen_start = time.perf_counter()
    from tqdm.auto import tqdm

    with torch.inference_mode():
        for first in tqdm(
            range(0, len(order), settings.batch_size),
            desc=f"generating ({Path(model_path).name})",
            unit="batch",
        ):
            batch = order[first : first + settings.batch_size]
            padded = tokenizer.pad(
                {"input_ids": [prompts[i] for i in batch]}, padding=True, return_tensors="pt"
            )
            output = model.generate(
                input_ids=padded["input_ids"].to(device),
                attention_mask=padded["attention_mask"].to(device),
                generation_config=gen_config,
            )
            new_tokens = output[:, padded["input_ids"].shape[1] :].tolist()
            for i, ids in zip(batch, new_tokens, strict=True):
                counts[i] = _answer_length(ids, set(eos_ids))
                texts[i] = tokenizer.decode(ids[: counts[i]], skip_special_tokens=True)
    gen_seconds = time.perf_counter() - gen_start
    total = sum(counts)
    return GenerationResult(
        texts=texts,
        backend="transformers",
        token_counts=counts,
        generated_tokens=total,
        load_seconds=load_seconds,
        generate_seconds=gen_seconds,
        total_seconds=time.perf_counter() - start,
        tokens_per_second=rate(total, gen_seconds),
    )
