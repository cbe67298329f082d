"""Chat rows as text: the tokenizer's chat template applied to the internal form, with tools and traces.

* **Tools.** A row's ``tools`` are passed to the template (``apply_chat_template(..., tools=...)``).
  A template that would drop the tools, the calls or the results is refused before any work
  (:func:`check_tool_template`), naming the ``chat_template`` option.
* **Reasoning** (``reasoning``): ``train`` keeps each trace, ``drop`` removes it, ``empty_think`` gives
  the turns without one an empty trace and renders with ``enable_thinking=False`` (the switch with
  which thinking templates add an empty trace at inference). A trace goes to the template as
  ``reasoning_content`` when the template renders that field; otherwise it is written into the
  content as ``<think>\\n...\\n</think>\\n\\n`` before the answer, so it is never silently lost.
* **Pieces** (:func:`chat_pieces`): each assistant turn is preceded by the rendering of the
  conversation before it with the generation prompt (context) and followed by the turn itself
  (trained); the pieces add up to the full rendering. A template that renders earlier turns
  differently once later turns exist (one that strips reasoning from history, for example) cannot
  train a conversation in one sample: then each assistant turn becomes its own sample, its history
  rendered exactly as the template renders it at inference, trained on that turn only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftpipe.config.schema import DataConfig
from ftpipe.data.chat import THINK_CLOSE, THINK_OPEN, split_think
from ftpipe.errors import FtpipeError
from ftpipe.model.tokenizer import chat_template_origin, template_error_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, Any]
#: A piece of rendered text and whether it is trained (an assistant turn).
Piece = tuple[str, bool]
_PROBE = "ftpipe_probe_7f3a"


class ChatTemplateError(FtpipeError, ValueError):
    """The tokenizer has no chat template, or its template cannot render the data as it is."""


def model_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return tokenizer.name_or_path or type(tokenizer).__name__


def template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template for messages: the user's ``chat_template`` file, else the model's."""
    return chat_template_origin(tokenizer)


def require_chat_template(tokenizer: PreTrainedTokenizerBase, reason: str) -> None:
    """Raise ChatTemplateError naming the model when ``tokenizer`` has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return
    raise ChatTemplateError(
        f"the tokenizer of {model_name(tokenizer)} has no chat template, but {reason}. "
        "Set use_chat_template: false (plain prompts) and prepare the data in alpaca format "
        "(data_format: alpaca), use a model whose tokenizer has a chat template (an instruct model), "
        "or give it one with chat_template (a Jinja file, or chatml-tools)."
    )


def template_kwargs(data_cfg: DataConfig) -> dict[str, Any]:
    """Extra variables for the template: ``enable_thinking=False`` with ``reasoning: empty_think``."""
    return {"enable_thinking": False} if data_cfg.reasoning == "empty_think" else {}


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    generation: bool,
    tools: Sequence[Mapping[str, Any]] | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The chat template's text of ``messages`` (with the generation prompt when ``generation``).

    A template that fails (a Jinja syntax error, its own ``raise_exception``, any error while rendering)
    is a ChatTemplateError naming the template (the ``chat_template`` file, else the model's) and the
    Jinja message.
    """
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=generation,
            tokenize=False,
            **(kwargs or {}),
        )
    except Exception as err:  # the template is the user's (or the model's) Jinja: its failure is theirs
        raise ChatTemplateError(
            f"{template_name(tokenizer)} cannot render the conversation: {template_error_text(err)}. "
            "Fix the template (chat_template), or the row"
        ) from err


@functools.lru_cache(maxsize=32)
def _renders_reasoning(template: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    probe = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": _PROBE},
    ]
    try:
        return _PROBE in render(tokenizer, probe, generation=False)
    except Exception:  # a template that fails on the probe reports itself on the real rows
        return False


def renders_reasoning(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the chat template writes an assistant turn's ``reasoning_content``."""
    return _renders_reasoning(tokenizer.chat_template or "", tokenizer)


def apply_reasoning(messages: Sequence[Message], data_cfg: DataConfig, in_template: bool) -> list[Message]:
    """The messages with the ``reasoning`` policy applied (see the module notes)."""
    out = []
    for i, message in enumerate(messages):
        msg = dict(message)
        if msg.get("role") == "assistant":
            trace = msg.pop("reasoning_content", None)
            if trace is None:  # rows given ready-prepared may keep the trace in the content
                trace, msg["content"] = split_think(msg.get("content") or "", f"message {i}")
            if data_cfg.reasoning == "drop":
                trace = None
            elif data_cfg.reasoning == "empty_think" and trace is None:
                trace = ""
            if trace is not None:
                if in_template:
                    msg["reasoning_content"] = trace
                else:
                    msg["content"] = (
                        f"{THINK_OPEN}\n{trace.strip()}\n{THINK_CLOSE}\n\n{msg.get('content') or ''}"
                    )
        out.append(msg)
    return out


def _probe_conversation() -> tuple[list[Message], list[dict[str, Any]]]:
    tools = [
        {
            "type": "function",
            "function": {
                "name": f"{_PROBE}_tool",
                "description": "probe",
                "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": f"{_PROBE}_call", "arguments": {"x": "y"}}}
            ],
        },
        {"role": "tool", "content": f"{_PROBE}_result"},
        {"role": "assistant", "content": "done"},
    ]
    return messages, tools


def check_tool_template(tokenizer: PreTrainedTokenizerBase, reason: str) -> None:
    """Raise ChatTemplateError when the chat template drops tool schemas, tool calls or tool results."""
    require_chat_template(tokenizer, reason)
    messages, tools = _probe_conversation()
    try:
        text = render(tokenizer, messages, generation=False, tools=tools)
    except ChatTemplateError as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        text, failure = "", f"it fails on a tool conversation ({template_error_text(cause)})"
    else:
        dropped = [
            what
            for what, mark in (
                ("the tool schemas", "_tool"),
                ("the tool calls", "_call"),
                ("the tool results", "_result"),
            )
            if f"{_PROBE}{mark}" not in text
        ]
        failure = f"it drops {', '.join(dropped)}" if dropped else ""
    if failure:
        raise ChatTemplateError(
            f"{reason}, but {template_name(tokenizer)} cannot render them: {failure}. "
            "Set chat_template to a template that renders tools: chatml-tools (shipped with ftpipe: "
            "schemas in the system turn, <tool_call> / <tool_response> tags) or a Jinja file of your own."
        )


@dataclass(frozen=True)
class ChatPieces:
    """The samples of one conversation: one list of pieces per sample, and whether it was split per turn."""

    samples: list[list[Piece]]
    per_turn: bool = False


def chat_pieces(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    row_name: str = "row",
) -> ChatPieces:
    """The rendering up to the last assistant turn as ``(text, trained)`` pieces (see the module notes).

    No assistant turn: no samples.
    """
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        return ChatPieces([])

    def turn(i: int) -> tuple[str, str]:
        try:
            prefix = render(tokenizer, messages[:i], generation=True, tools=tools, kwargs=kwargs) if i else ""
            full = render(tokenizer, messages[: i + 1], generation=False, tools=tools, kwargs=kwargs)
        except ChatTemplateError as err:
            raise ChatTemplateError(f"{row_name}: {err}") from err.__cause__
        if not full.startswith(prefix):
            raise ChatTemplateError(
                f"{row_name}: {template_name(tokenizer)} renders assistant turn {i} so that "
                "the conversation before it, with the generation prompt, is not its start: the model "
                "would be trained on text it never sees at inference. Give chat_template a template whose "
                "generation prompt is how its assistant turns begin."
            )
        return prefix, full

    rendered = [turn(i) for i in assistants]
    pieces: list[Piece] = []
    done = ""
    for prefix, full in rendered:
        if not prefix.startswith(done):  # the template rewrote an earlier turn: one sample per turn
            samples = [[(p, False), (f[len(p) :], True)] for p, f in rendered]
            return ChatPieces([[piece for piece in s if piece[0]] for s in samples], per_turn=True)
        pieces += [(prefix[len(done) :], False), (full[len(prefix) :], True)]
        done = full
    return ChatPieces([[piece for piece in pieces if piece[0]]])
