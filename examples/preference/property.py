"""The checkable property of the preference example: the answer opens with the words ``In short:``.

Every chosen answer in ``pairs.jsonl`` starts with ``In short:`` followed by the answer; the rejected
answer is the same text without it. The base SmolLM2-135M-Instruct practically never opens that way,
so the share of answers that do measures how far preference tuning moved the model. An answer only
counts when the phrase opens it exactly once and a real word follows: a model that collapsed into
repeating the phrase (``In short: In short: ...``) does not pass. Pure Python, no dependencies:
tests and benchmarks load this file by path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# leading blanks, markdown emphasis or a heading mark are tolerated; then "In short:" (any case),
# then a word of at least one letter or digit
OPENING = re.compile(r"\A[\s*_#>]*in short\s*:[\s*_\"']*[^\W_]", re.IGNORECASE)
PHRASE = re.compile(r"in short", re.IGNORECASE)


def has_property(text: str) -> bool:
    """Whether ``text`` (one generated answer) opens with ``In short:``, once, followed by an answer."""
    return bool(OPENING.match(text)) and len(PHRASE.findall(text)) == 1


def property_rate(texts: Iterable[str]) -> float:
    """Share of ``texts`` that have the property (0.0 for no texts)."""
    flags = [has_property(text) for text in texts]
    return sum(flags) / len(flags) if flags else 0.0
