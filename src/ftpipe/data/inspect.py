"""``ftpipe inspect``: prepared samples as the model will see them, with the trained spans marked.

For the first ``--n`` samples of a prepared split (prepared first when needed): the rendered text,
trained spans in colour on a terminal and between ``[[`` and ``]]`` otherwise, and per sample the
token counts (prompt, trained, truncated by ``max_seq_length``). ``--json`` writes one JSON object per
sample instead (``input_ids``, ``labels``, ``trained_spans``: the decoded text of each run of trained
tokens, ``source``, the counts), so scripts and tests can check masking without ftpipe's internals.

With ``objective: dpo`` the samples are preference pairs (:mod:`ftpipe.data.pairs`): per pair the
prompt as the model sees it (after truncation), then each side's answer with its trained spans marked,
and the counts (prompt tokens, tokens and trained tokens per side, truncated tokens, and why a pair
is dropped). ``--json`` writes per pair ``prompt``, the counts and ``chosen`` / ``rejected`` objects
(``input_ids``, ``labels``, ``trained_spans``, ``tokens``, ``trained_tokens``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from ftpipe.config.schema import PipelineConfig
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = get_logger(__name__)

SPLIT_NAMES = {"training": "train_file", "validation": "val_file", "test": "test_file"}
OPEN_MARK, CLOSE_MARK = "[[", "]]"


@dataclass(kw_only=True)
class InspectOptions:
    """What ``ftpipe inspect`` shows.

    Args:
        n: how many samples to show (from the start of the split); preference pairs with objective dpo.
        split: the prepared split to read: training, validation or test.
        json: write one JSON object per sample (input_ids, labels, trained_spans, source, token counts)
            instead of the marked text.
    """

    n: int = 3
    split: Literal["training", "validation", "test"] = "training"
    json: bool = False


def runs(ids: list[int], labels: list[int]) -> list[tuple[list[int], bool]]:
    """Consecutive runs of ``(token ids, trained)``."""
    from ftpipe.data.tokenize import IGNORE_INDEX

    out: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if out and out[-1][1] == trained:
            out[-1][0].append(token)
        else:
            out.append(([token], trained))
    return out


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def inspect_samples(
    tokenizer: PreTrainedTokenizerBase, path: Path, cfg: PipelineConfig, n: int
) -> list[dict[str, Any]]:
    """The first ``n`` samples of a prepared split file, each as a JSON-ready dict."""
    from ftpipe.data.chat import uses_tools
    from ftpipe.data.render import check_tool_template
    from ftpipe.data.tokenize import encode_examples, is_chat_row

    samples: list[dict[str, Any]] = []
    tools_checked = False
    for row in _rows(path):
        if is_chat_row(row) and uses_tools(row) and not tools_checked:
            check_tool_template(tokenizer, f"{path}: the data uses tools")
            tools_checked = True
        examples, per_turn = encode_examples(tokenizer, row, cfg.data)
        for turn, example in enumerate(examples):
            pieces = runs(example.input_ids, example.labels)
            trained = sum(len(ids) for ids, t in pieces if t)
            samples.append(
                {
                    "index": len(samples),
                    "row_id": row.get("id"),
                    "source": row.get("source"),
                    "turn": turn if per_turn else None,
                    "input_ids": example.input_ids,
                    "labels": example.labels,
                    "trained_spans": [tokenizer.decode(ids) for ids, t in pieces if t],
                    "pieces": [(tokenizer.decode(ids), t) for ids, t in pieces],
                    "prompt_tokens": len(example.input_ids) - trained,
                    "trained_tokens": trained,
                    "truncated_tokens": example.full_length - len(example.input_ids),
                }
            )
            if len(samples) >= n:
                return samples
    return samples


def _pair_side(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], prompt: int
) -> dict[str, Any]:
    """One side of a pair: its ids and labels, the decoded trained spans and the answer's pieces."""
    pieces = runs(ids[prompt:], labels[prompt:])
    return {
        "input_ids": ids,
        "labels": labels,
        "trained_spans": [tokenizer.decode(span) for span, t in pieces if t],
        "pieces": [(tokenizer.decode(span), t) for span, t in pieces],
        "tokens": len(ids),
        "answer_tokens": len(ids) - prompt,
        "trained_tokens": sum(len(span) for span, t in pieces if t),
    }


def inspect_pairs(
    tokenizer: PreTrainedTokenizerBase, path: Path, cfg: PipelineConfig, n: int
) -> list[dict[str, Any]]:
    """The first ``n`` preference pairs of a prepared split file, each as a JSON-ready dict (dropped
    pairs included, with the reason in ``drop``)."""
    from ftpipe.data.pairs import encode_pair, pair_uses_tools
    from ftpipe.data.render import check_tool_template

    pairs: list[dict[str, Any]] = []
    tools_checked = False
    for row in _rows(path):
        if pair_uses_tools(row) and not tools_checked:
            check_tool_template(tokenizer, f"{path}: the data uses tools")
            tools_checked = True
        pair = encode_pair(tokenizer, row, cfg.data)
        prompt = pair.prompt_length
        chosen = _pair_side(tokenizer, pair.chosen_input_ids, pair.chosen_labels, prompt)
        rejected = _pair_side(tokenizer, pair.rejected_input_ids, pair.rejected_labels, prompt)
        pairs.append(
            {
                "index": len(pairs),
                "row_id": row.get("id"),
                "source": row.get("source"),
                "prompt": tokenizer.decode(pair.chosen_input_ids[:prompt]),
                "prompt_tokens": prompt,
                "prompt_truncated": pair.prompt_truncated,
                "answers_cut": pair.answers_cut,
                "truncated_tokens": pair.full_length - max(chosen["tokens"], rejected["tokens"]),
                "drop": pair.drop,
                "chosen": chosen,
                "rejected": rejected,
            }
        )
        if len(pairs) >= n:
            break
    return pairs


def _without_pieces(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample (or pair) as ``--json`` writes it: without the decoded pieces of the text view."""
    return {k: _without_pieces(v) if isinstance(v, dict) else v for k, v in sample.items() if k != "pieces"}


def _pair_header(pair: dict[str, Any], total: int) -> str:
    sides = "; ".join(
        f"{side} {pair[side]['answer_tokens']} tokens ({pair[side]['trained_tokens']} trained)"
        for side in ("chosen", "rejected")
    )
    dropped = f"; dropped: {pair['drop']}" if pair["drop"] else ""
    return (
        f"pair {pair['index'] + 1} of {total} (row id {pair['row_id']}, source {pair['source']}): "
        f"prompt {pair['prompt_tokens']} tokens; {sides}; {pair['truncated_tokens']} truncated{dropped}"
    )


def print_pairs(pairs: list[dict[str, Any]], stream: IO[str], colour: bool) -> None:
    """The pairs as text: the prompt, then each answer with its trained spans in colour or between marks."""
    from rich.console import Console
    from rich.text import Text

    console = Console(
        file=stream, force_terminal=colour, no_color=not colour, highlight=False, soft_wrap=True
    )
    for pair in pairs:
        console.print(Text(f"── {_pair_header(pair, len(pairs))} ──", style="bold" if colour else ""))
        console.print(Text(pair["prompt"]))
        for side in ("chosen", "rejected"):
            console.print(Text(f"── {side} ──", style="bold" if colour else ""))
            text = Text()
            for piece, trained in pair[side]["pieces"]:
                if colour:
                    text.append(piece, style="bold green on grey15" if trained else "")
                else:
                    text.append(f"{OPEN_MARK}{piece}{CLOSE_MARK}" if trained else piece)
            console.print(text)
    if not colour:
        console.print(f"(trained spans are between {OPEN_MARK} and {CLOSE_MARK})")


def _header(sample: dict[str, Any], total: int) -> str:
    turn = f", assistant turn {sample['turn'] + 1}" if sample["turn"] is not None else ""
    return (
        f"sample {sample['index'] + 1} of {total} (row id {sample['row_id']}, source {sample['source']}{turn}): "
        f"{len(sample['input_ids'])} tokens = {sample['prompt_tokens']} prompt + {sample['trained_tokens']} "
        f"trained; {sample['truncated_tokens']} truncated"
    )


def print_samples(samples: list[dict[str, Any]], stream: IO[str], colour: bool) -> None:
    """The samples as text; trained spans in colour (``colour``) or between ``[[`` and ``]]``."""
    from rich.console import Console
    from rich.text import Text

    console = Console(
        file=stream, force_terminal=colour, no_color=not colour, highlight=False, soft_wrap=True
    )
    for sample in samples:
        console.print(Text(f"── {_header(sample, len(samples))} ──", style="bold" if colour else ""))
        text = Text()
        for piece, trained in sample["pieces"]:
            if colour:
                text.append(piece, style="bold green on grey15" if trained else "")
            else:
                text.append(f"{OPEN_MARK}{piece}{CLOSE_MARK}" if trained else piece)
        console.print(text)
    if not colour:
        console.print(f"(trained spans are between {OPEN_MARK} and {CLOSE_MARK})")


def inspect(cfg: PipelineConfig, options: InspectOptions | None = None) -> list[dict[str, Any]]:
    """Show the first samples of a prepared split as the model will see them; returns them."""
    from ftpipe.data.prepare import prepare_data
    from ftpipe.model.tokenizer import load_tokenizer

    options = options or InspectOptions()
    if options.n < 1:
        from ftpipe.config.validate import ConfigError

        raise ConfigError([f"n: {options.n} is not allowed (must be >= 1)"])
    tokenizer = load_tokenizer(cfg.model)  # the model and its chat_template are checked before the data
    prepared = prepare_data(cfg)
    path = Path(getattr(prepared, SPLIT_NAMES[options.split]))
    pairs = cfg.objective.objective == "dpo"
    samples = (inspect_pairs if pairs else inspect_samples)(tokenizer, path, cfg, options.n)
    if not samples:
        log.warning("%s has no %s to show", path, "pairs" if pairs else "samples")
    if options.json:
        for sample in samples:
            sys.stdout.write(json.dumps(_without_pieces(sample), ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        (print_pairs if pairs else print_samples)(samples, sys.stdout, colour=sys.stdout.isatty())
    return samples
