"""Measure how often a model's answers open with "In short:" on the held-out prompts (greedy decoding).

    python examples/preference/measure.py [--model PATH] [--prompts examples/preference/heldout_prompts.jsonl]
        [--max-new-tokens 48] [--batch-size 14] [--samples 5]

Renders every prompt with the model's chat template (generation prompt added), decodes greedily in
fp32 on the CPU, checks each answer with ``property.py`` beside this file and prints one JSON object:
the rate, the counts and a few sample answers. ``--model`` defaults to the embedded
SmolLM2-135M-Instruct folder; pass a merged, fine-tuned folder to measure the tuned model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def load_property() -> ModuleType:
    """``property.py`` beside this file, loaded by path."""
    spec = importlib.util.spec_from_file_location("preference_property", HERE / "property.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_prompts(path: Path) -> list[str]:
    """The ``prompt`` of every JSON line in ``path``."""
    return [
        json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def generate(model_dir: str, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to ``prompts``, batched with left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    answers: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted({i * n // k for i in range(k)}) if k > 0 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--prompts", type=Path, default=HERE / "heldout_prompts.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=14)
    parser.add_argument(
        "--samples", type=int, default=5, help="sample answers to print, spread over the prompts"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model_dir = args.model
    if model_dir is None:
        from ftpipe.model.embedded import embedded_model_dir

        model_dir = str(embedded_model_dir())
    prop = load_property()
    prompts = read_prompts(args.prompts)
    started = time.perf_counter()
    answers = generate(model_dir, prompts, args.max_new_tokens, args.batch_size)
    flags = [prop.has_property(a) for a in answers]
    report = {
        "model": model_dir,
        "prompts": len(prompts),
        "with_property": sum(flags),
        "rate": round(prop.property_rate(answers), 4),
        "seconds": round(time.perf_counter() - started, 1),
        "samples": [
            {"prompt": prompts[i], "answer": answers[i], "has_property": flags[i]}
            for i in _spread(len(prompts), args.samples)
        ],
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
