"""``ftpipe chat``: talk to an exported model in the terminal, its answers streamed token by token.

The model folder (``--model_dir``; default: this configuration's latest merged export) brings its own
tokenizer and chat template (the one training used), so prompts render as they did in training, with
the tools of ``--tools`` (a JSON file of function schemas) when given. vLLM generates when it is
installed (``eval_backend``), transformers otherwise; sampling follows the evaluation settings
(``temperature``, ``top_p``, ``max_new_tokens``). ``/reset`` forgets the conversation, ``/exit`` (or
Ctrl-D) ends it; ``--prompt "..."`` answers once and exits, for scripts.

Input must be UTF-8 text: a line of standard input (or a ``--prompt`` / ``--system``) that is not stops
the chat with one message naming it (exit status 2), rather than sending the model mangled text or
dropping the lines read with it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Thread
from typing import Any

from ftpipe.config.paths import results_root
from ftpipe.config.schema import PipelineConfig
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

PROMPT = "you> "
REPLY = "model> "


class ChatError(FtpipeError, ValueError):
    """The chat cannot start; the message names the option to change."""


@dataclass(kw_only=True)
class ChatOptions:
    """What ``ftpipe chat`` talks to and how.

    Args:
        model_dir: an exported model folder (default: ``<results_root>/export/merged`` of the configuration).
        prompt: answer this one message and exit (for scripts); without it the chat is interactive.
        system: system prompt of the conversation (default: ``system_prompt``, else the template's own).
        tools: JSON file holding a list of function schemas the model may call.
    """

    model_dir: str | None = None
    prompt: str | None = None
    system: str | None = None
    tools: str | None = None


def _model_dir(cfg: PipelineConfig, options: ChatOptions) -> Path:
    folder = (
        Path(options.model_dir).expanduser() if options.model_dir else results_root(cfg) / "export" / "merged"
    )
    if not (folder / "config.json").is_file():
        raise ChatError(
            f"model_dir: {folder} holds no model (config.json); export one first (`ftpipe export` or `ftpipe "
            "run`) or give --model_dir a model folder"
        )
    return folder


def _tools(options: ChatOptions) -> list[dict[str, Any]] | None:
    if not options.tools:
        return None
    path = Path(options.tools).expanduser()
    try:
        tools = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ChatError(f"tools: {path} cannot be read as JSON ({err})") from err
    except RecursionError as err:
        raise ChatError(f"tools: {path} nests lists or objects too deeply to be read") from err
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ChatError(f"tools: {path} must hold a list of function schemas (objects)")
    return tools


class _Transformers:
    """transformers' ``generate`` with a token streamer (a generation thread feeds the terminal)."""

    def __init__(self, folder: Path, cfg: PipelineConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from ftpipe.model.serving_handler import device_and_dtype

        self.device, dtype = device_and_dtype()
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
        )
        self.model.to(self.device).eval()
        self.cfg = cfg
        self.torch = torch

    def stream(self, tokenizer: Any, ids: list[int]) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        ev = self.cfg.eval
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = ev.temperature > 0
        kwargs = {
            "input_ids": self.torch.tensor([ids], device=self.device),
            "max_new_tokens": ev.max_new_tokens,
            "do_sample": sampling,
            "temperature": ev.temperature if sampling else None,
            "top_p": ev.top_p if sampling else None,
            "top_k": None,
            "pad_token_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            "streamer": streamer,
        }
        thread = Thread(target=self._generate, kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()

    def _generate(self, **kwargs: Any) -> None:
        with self.torch.inference_mode():
            self.model.generate(**kwargs)


class _VLLM:
    """vLLM's engine, stepped request by request so that each new piece of text shows at once."""

    def __init__(self, folder: Path, cfg: PipelineConfig) -> None:
        import torch
        from vllm import EngineArgs, LLMEngine

        from ftpipe.evaluate.generate import GenerationSettings, effective_max_model_len

        settings = GenerationSettings.from_config(cfg)
        if not torch.cuda.is_available():  # on the CPU the KV cache is sized in GiB (as the evaluation does)
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_cpu_kvcache_gib))
        os.environ.setdefault(
            "VLLM_CONFIGURE_LOGGING", "0"
        )  # its messages through ftpipe's log, not the chat
        self.engine = LLMEngine.from_engine_args(
            EngineArgs(
                model=str(folder),
                max_model_len=effective_max_model_len(str(folder), settings),
                gpu_memory_utilization=settings.gpu_memory_utilization,
                enforce_eager=not torch.cuda.is_available(),
                seed=settings.seed,
                trust_remote_code=settings.trust_remote_code,
            )
        )
        self.cfg = cfg
        self.count = 0

    def stream(self, tokenizer: Any, ids: list[int]) -> Iterator[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ev = self.cfg.eval
        params = SamplingParams(
            temperature=ev.temperature,
            top_p=ev.top_p if ev.temperature > 0 else 1.0,
            max_tokens=ev.max_new_tokens,
        )
        self.count += 1
        self.engine.add_request(str(self.count), TokensPrompt(prompt_token_ids=ids), params)
        shown = ""
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                text = output.outputs[0].text
                if text.startswith(shown) and len(text) > len(shown):
                    yield text[len(shown) :]
                    shown = text


class Conversation:
    """A chat with an exported model: the history, its rendering, and the streamed answers."""

    def __init__(self, cfg: PipelineConfig, options: ChatOptions) -> None:
        from ftpipe.evaluate.generate import select_backend
        from ftpipe.model.tokenizer import load_folder_tokenizer

        self.folder = _model_dir(cfg, options)
        self.tools = _tools(options)
        self.system = options.system or cfg.data.system_prompt
        if self.system:
            utf8_text(self.system, "system")
        self.tokenizer = load_folder_tokenizer(self.folder, "model_dir", cfg.model.trust_remote_code)
        if not self.tokenizer.chat_template:
            raise ChatError(f"model_dir: the tokenizer in {self.folder} has no chat template to talk through")
        backend = select_backend(cfg.eval.eval_backend)
        log.info("chat with %s (%s)", self.folder, backend)
        self.backend = _VLLM(self.folder, cfg) if backend == "vllm" else _Transformers(self.folder, cfg)
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to ``text``; the answer joins the history when it is complete."""
        self.messages.append({"role": "user", "content": text})
        rendered = self.tokenizer.apply_chat_template(
            self.messages, tools=self.tools, add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        answer = []
        for piece in self.backend.stream(self.tokenizer, ids):
            answer.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(answer).strip()})


def utf8_text(text: str, where: str) -> str:
    """``text`` when it is UTF-8 text; a ChatError naming ``where`` when it holds bytes that were not (which
    Python keeps as surrogate escapes on a non-UTF-8 locale or in command-line arguments)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ChatError(
            f"{where} is not UTF-8 text (an invalid byte at character {err.start + 1}); give UTF-8 text "
            "(a terminal and locale set to UTF-8, or a UTF-8 file piped in)"
        ) from None
    return text


def _read_line(number: int) -> str:
    """Line ``number`` of standard input, after the prompt; EOFError at its end; a ChatError when it is not
    UTF-8 text. Piped input is read line by line as bytes, so the lines before a bad one are answered."""
    where = f"standard input: line {number}"
    raw = getattr(sys.stdin, "buffer", None)
    try:
        if raw is None or sys.stdin.isatty():
            return utf8_text(input(PROMPT), where)  # a terminal: with line editing
        sys.stdout.write(PROMPT)
        sys.stdout.flush()
        line = raw.readline()
        if not line:
            raise EOFError
        return line.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as err:
        raise ChatError(
            f"{where} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at byte {err.start + 1}); the chat "
            "stops here. Type or pipe UTF-8 text (a terminal and locale set to UTF-8, or a UTF-8 file)"
        ) from None


def _say(conversation: Conversation, text: str) -> str:
    sys.stdout.write(REPLY)
    sys.stdout.flush()
    pieces = []
    for piece in conversation.ask(text):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def chat(cfg: PipelineConfig, options: ChatOptions | None = None) -> list[dict[str, Any]]:
    """Talk to the model (interactively, or once with ``prompt``); returns the conversation."""
    options = options or ChatOptions()
    if options.prompt is not None:
        utf8_text(options.prompt, "prompt")
    conversation = Conversation(cfg, options)
    if options.prompt is not None:
        _say(conversation, options.prompt)
        return conversation.messages
    sys.stdout.write("Chat with the model: /reset starts over, /exit (or Ctrl-D) ends.\n")
    lines = 0
    while True:
        lines += 1
        try:
            text = _read_line(lines)
        except EOFError:
            sys.stdout.write("\n")
            break
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            conversation.reset()
            sys.stdout.write("(conversation cleared)\n")
            continue
        if command:
            _say(conversation, text)
    return conversation.messages
