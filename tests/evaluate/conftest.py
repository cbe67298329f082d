"""Fixtures of the evaluation tests: chat-template prompts of the embedded model."""

from __future__ import annotations

import pytest

QUESTIONS = (
    "What is the capital of France?",
    "Name the largest planet in our solar system and say one fact about it.",
    "What is 2 + 2?",
)


@pytest.fixture(scope="session")
def chat_prompts(tokenizer) -> list[list[int]]:
    """Token ids of QUESTIONS as user turns through the model's chat template, with the generation prompt."""
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for q in QUESTIONS
    ]
