"""Converters used by the data tests through their import path (``ftpipe_test_converter:qa_pair``)."""

from __future__ import annotations


def qa_pair(row: dict) -> dict | None:
    """``question``/``answer`` rows -> input/output; rows flagged ``skip`` are dropped (None)."""
    if row.get("skip"):
        return None
    return {"input": f"Q: {row['question']}\nA:", "output": f" {row['answer']}"}


def qa_chat(row: dict) -> dict:
    """``question``/``answer`` rows -> a two-turn chat."""
    return {
        "messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ]
    }
