"""Write a large alpaca-style JSONL for the data-at-scale benchmark (seeded, no download).

    python benchmarks/make_large_alpaca.py --rows 1000000 --out /tmp/alpaca-1m.jsonl   # about 850 MB

One ``{"instruction", "input", "output"}`` object per line. The text is made of pseudo-words built from
syllables (a fixed vocabulary of 20,000 words), with lengths drawn so that rows look like alpaca data:
instructions of about 12 words, an ``input`` on 40% of the rows, answers from a few words to several
hundred (log-normal, median about 65 words), so some rows exceed 256 tokens and exercise truncation. The
content is meaningless; it measures preparation and tokenization cost, not learning. The same seed and row
count write the same file byte for byte, and the first N rows of a larger file equal a file of N rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
VOCAB_SIZE = 20_000
#: rows generated per numpy draw (bounds the memory of the generator)
CHUNK = 20_000


def vocabulary(seed: int) -> list[str]:
    """``VOCAB_SIZE`` distinct pseudo-words of 1-4 syllables."""
    rng = np.random.default_rng(seed)
    words: dict[str, None] = {}
    while len(words) < VOCAB_SIZE:
        n = int(rng.integers(1, 5))
        words["".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), n))] = None
    return list(words)


def _lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    instruction = np.clip(rng.normal(12, 4, n), 3, 40).astype(int)
    has_input = rng.random(n) < 0.4
    inputs = np.where(has_input, np.clip(rng.lognormal(3.0, 0.6, n), 3, 300), 0).astype(int)
    output = np.clip(rng.lognormal(4.2, 0.8, n), 2, 800).astype(int)
    return instruction, inputs, output


def rows(count: int, seed: int):
    """Yield ``count`` rows; chunk ``k`` draws from its own seeded generator (prefix-stable)."""
    vocab = np.array(vocabulary(seed), dtype=object)
    # Zipf-like word frequencies, as in text
    ranks = np.arange(1, VOCAB_SIZE + 1)
    probs = 1.0 / ranks**1.05
    probs /= probs.sum()
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)  # a whole chunk is drawn either way: the rows do not depend on count
        rng = np.random.default_rng([seed, start // CHUNK])
        lengths = _lengths(rng, CHUNK)
        words = vocab[rng.choice(VOCAB_SIZE, size=int(sum(x.sum() for x in lengths)), p=probs)]
        at = 0
        for i in range(n):
            parts = []
            for part in lengths:
                k = int(part[i])
                parts.append(" ".join(words[at : at + k]))
                at += k
            instruction, text, output = parts
            yield {
                "instruction": instruction.capitalize() + "?",
                "input": text,
                "output": output.capitalize() + ".",
            }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        for row in rows(args.rows, args.seed):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    size = args.out.stat().st_size
    print(f"{args.rows} rows, {size / 1e6:.0f} MB in {time.perf_counter() - start:.0f} s: {args.out}")
    return args.out


if __name__ == "__main__":
    main()
