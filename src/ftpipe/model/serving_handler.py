"""SageMaker PyTorch serving handler for an exported ftpipe model: chat text generation.

This file is copied as ``code/inference.py`` (by ``ftpipe.sagemaker.handler``) next to the exported
Hugging Face model (``config.json``,
safetensors, tokenizer with its chat template) and runs in a SageMaker PyTorch inference container,
where ftpipe is not installed: it imports only the standard library, torch and transformers (and the
serving toolkit's error class when it is there). ``code/requirements.txt`` pins transformers.

The toolkit calls ``model_fn(model_dir)`` once per worker, then for every request
``input_fn(body, content_type)`` -> ``predict_fn(data, model)`` -> ``output_fn(prediction, accept)``.

Requests (``application/json``, the Hugging Face inference toolkit's shape)::

    {"inputs": "Name three colours." | ["prompt 1", "prompt 2"],
     "parameters": {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "do_sample": true}}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}]}
    {"messages": [[...conversation 1...], [...conversation 2...]]}
    {"messages": [...], "tools": [{"type": "function", "function": {"name": ..., "parameters": ...}}],
     "chat_template_kwargs": {"enable_thinking": false}}

``inputs`` may also hold a conversation (a list of role/content objects) or a list of them. A text
prompt becomes one user turn and every prompt goes through the tokenizer's chat template with the
generation prompt, unless ``"raw": true`` (text prompts only) or the tokenizer has no template. A
``text/plain`` body is one prompt with the default parameters. Several prompts are generated as one
left-padded batch. Response: ``[{"generated_text": "..."}, ...]``, one object per prompt, holding only
the new text (``"return_full_text": true`` in ``parameters`` puts the prompt text before it).

Tools: ``tools`` (function schemas) go to the chat template with every prompt, and conversations may
hold assistant ``tool_calls`` (``content`` null or empty) and ``tool`` results, rendered by the
template the model was trained with (ftpipe saves it in the export); ``chat_template_kwargs`` passes
template switches such as ``enable_thinking``.

Parameters: ``max_new_tokens`` (default 256, at most ``$FTPIPE_MAX_NEW_TOKENS_LIMIT``, 4096),
``do_sample``, ``temperature`` (0 means greedy; above 0 samples unless ``do_sample`` is false),
``top_p``, ``top_k``, ``repetition_penalty``, ``seed``, ``return_full_text``; anything unset comes from
the model's ``generation_config.json``.

Environment: ``FTPIPE_DEVICE_MAP`` (e.g. ``auto``: spread the model over every GPU of the instance
with accelerate; run one model server worker then), ``FTPIPE_TRUST_REMOTE_CODE=true`` for models
with their own code. The model loads in bfloat16 on GPUs that support it, float16 on other GPUs and
float32 on the CPU.

Bad requests raise ``RequestError`` (a ValueError; in the serving container also the toolkit's
``BaseInferenceToolkitError`` with status 400, 406 or 415, so the client gets a 4xx and the message).

Because it stands alone, this module is also the one home of the rules that serving shares with
ftpipe's own generation (the evaluation's transformers backend and ``ftpipe chat``): the device and
dtype a model is served in (:func:`device_and_dtype`) and the tokens that end an answer
(:func:`eos_token_ids`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:  # present in the SageMaker inference containers: lets the toolkit answer with our status code
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:  # pragma: no cover - outside the serving container

    class _ToolkitError(Exception):  # type: ignore[no-redef]
        """Stand-in with the toolkit's attributes (status_code, message, phrase)."""

        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            self.status_code = status_code
            self.message = message
            self.phrase = phrase
            super().__init__(status_code, message, phrase)


JSON = "application/json"
TEXT = "text/plain"
DEFAULT_MAX_NEW_TOKENS = 256
MAX_NEW_TOKENS_LIMIT = int(os.environ.get("FTPIPE_MAX_NEW_TOKENS_LIMIT", "4096"))
_REQUEST_KEYS = {"inputs", "messages", "parameters", "raw", "tools", "chat_template_kwargs"}
#: message keys kept for the chat template besides role and content.
_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
_PARAMETERS = {
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "return_full_text",
}


class RequestError(ValueError, _ToolkitError):
    """A request the handler cannot serve; ``status_code`` is the HTTP status for the client."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        _ToolkitError.__init__(self, status_code, message, message)

    def __str__(self) -> str:
        return self.message


class LoadedModel:
    """What ``model_fn`` returns: the model in eval mode, its tokenizer (left padding) and device."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device


# --------------------------------------------------------------------------------------------------
# model_fn


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """bfloat16 on GPUs that support it, float16 on other GPUs, float32 on the CPU."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda", torch.cuda.current_device()), dtype
    return torch.device("cpu"), torch.float32


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def model_fn(model_dir: str) -> LoadedModel:
    """Load the exported model and tokenizer from ``model_dir`` for generation."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(
            f"{model_dir} has no config.json: the model archive must hold the exported Hugging Face "
            "model at its top level (config.json, *.safetensors, tokenizer files) and this code/ folder"
        )
    trust = _flag("FTPIPE_TRUST_REMOTE_CODE")
    device, dtype = device_and_dtype()
    device_map = os.environ.get("FTPIPE_DEVICE_MAP") or None
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, trust_remote_code=trust, device_map=device_map
    )
    if device_map is None:
        model.to(device)
    else:
        device = model.get_input_embeddings().weight.device  # where the inputs go
    model.eval()
    return LoadedModel(model, tokenizer, device)


# --------------------------------------------------------------------------------------------------
# input_fn


def _media_type(content_type: str | None) -> str:
    return (content_type or JSON).split(";", 1)[0].strip().lower()


def _as_text(body: str | bytes | bytearray) -> str:
    if isinstance(body, (bytes, bytearray)):
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(f"the request body is not UTF-8 text: {err}") from err
    return body


def _is_message(item: Any) -> bool:
    return isinstance(item, dict) and "role" in item and ("content" in item or "tool_calls" in item)


def _conversation(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RequestError(f"{where}: a conversation must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, message in enumerate(value):
        if not _is_message(message):
            raise RequestError(f"{where}[{i}]: each message must be an object with role and content")
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            content = ""  # an assistant turn that only calls tools
        if not isinstance(message["role"], str) or not isinstance(content, str):
            raise RequestError(f"{where}[{i}]: role and content must be strings")
        if "tool_calls" in message and not isinstance(message["tool_calls"], list):
            raise RequestError(f"{where}[{i}]: tool_calls must be a list of calls")
        extra = {k: message[k] for k in _MESSAGE_KEYS if message.get(k) is not None}
        messages.append({"role": message["role"], "content": content, **extra})
    return messages


def _prompts(request: dict[str, Any]) -> list[str | list[dict[str, str]]]:
    """The prompts of a request: text strings and/or conversations, in request order."""
    if ("inputs" in request) == ("messages" in request):
        raise RequestError('give exactly one of "inputs" (text or a list of texts) or "messages"')
    key = "inputs" if "inputs" in request else "messages"
    value = request[key]
    if isinstance(value, str):
        if key == "messages":
            raise RequestError('"messages" must be a list of {role, content} objects (or a list of them)')
        return [value]
    if not isinstance(value, list) or not value:
        raise RequestError(f'"{key}" must be a non-empty string or list')
    if any(isinstance(item, dict) for item in value):  # one conversation
        return [_conversation(value, key)]
    prompts: list[str | list[dict[str, str]]] = []
    for i, item in enumerate(value):
        if isinstance(item, str) and key == "inputs":
            prompts.append(item)
        elif isinstance(item, list):
            prompts.append(_conversation(item, f"{key}[{i}]"))
        else:
            raise RequestError(
                f'"{key}"[{i}]: expected {"a string or " if key == "inputs" else ""}'
                "a conversation (list of {role, content} objects)"
            )
    return prompts


def _number(params: dict[str, Any], name: str, kind: type, low: float, high: float | None = None) -> None:
    if name not in params:
        return
    value = params[name]
    ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise RequestError(f"parameters.{name}: expected {kind.__name__} {bound}, got {value!r}")


def _parameters(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError('"parameters" must be an object')
    unknown = sorted(set(value) - _PARAMETERS)
    if unknown:
        raise RequestError(f"parameters: unknown {unknown}; supported: {sorted(_PARAMETERS)}")
    params = dict(value)
    _number(params, "max_new_tokens", int, 1, MAX_NEW_TOKENS_LIMIT)
    _number(params, "temperature", float, 0.0)
    _number(params, "top_p", float, 0.0, 1.0)
    _number(params, "top_k", int, 0)
    _number(params, "repetition_penalty", float, 0.0)
    _number(params, "seed", int, 0)
    for name in ("do_sample", "return_full_text"):
        if name in params and not isinstance(params[name], bool):
            raise RequestError(f"parameters.{name}: expected true or false, got {params[name]!r}")
    if params.get("top_p") == 0 or params.get("repetition_penalty") == 0:
        raise RequestError("parameters: top_p and repetition_penalty must be above 0")
    return params


def input_fn(request_body: str | bytes | bytearray, content_type: str | None) -> dict[str, Any]:
    """Parse a JSON (or plain-text) request into ``{"prompts", "parameters", "raw"}``."""
    media = _media_type(content_type)
    text = _as_text(request_body)
    if media == TEXT:
        if not text.strip():
            raise RequestError("the text/plain request body is empty: send the prompt")
        return {"prompts": [text], "parameters": {}, "raw": False}
    if media != JSON:
        raise RequestError(
            f"content type {content_type!r} is not supported: send {JSON} "
            '({"inputs": ..., "parameters": {...}}) or text/plain (one prompt)',
            status_code=415,
        )
    try:
        request = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from err
    if not isinstance(request, dict):
        raise RequestError('the JSON request must be an object: {"inputs": ..., "parameters": {...}}')
    unknown = sorted(set(request) - _REQUEST_KEYS)
    if unknown:
        raise RequestError(f"unknown request keys {unknown}; supported: {sorted(_REQUEST_KEYS)}")
    raw = request.get("raw", False)
    if not isinstance(raw, bool):
        raise RequestError(f'"raw" must be true or false, got {raw!r}')
    prompts = _prompts(request)
    if raw and any(not isinstance(p, str) for p in prompts):
        raise RequestError('"raw": true needs text prompts; conversations always use the chat template')
    tools = request.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RequestError('"tools" must be a list of function schemas (objects)')
    kwargs = request.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError('"chat_template_kwargs" must be an object, e.g. {"enable_thinking": false}')
    if raw and (tools or kwargs):
        raise RequestError(
            '"raw": true sends the text as it is: "tools" and "chat_template_kwargs" need the chat template'
        )
    return {
        "prompts": prompts,
        "parameters": _parameters(request.get("parameters")),
        "raw": raw,
        "tools": tools or None,
        "chat_template_kwargs": kwargs,
    }


# --------------------------------------------------------------------------------------------------
# predict_fn


def _render(
    tokenizer: Any,
    prompt: str | list[dict[str, Any]],
    raw: bool,
    tools: list[dict[str, Any]] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """The prompt text and whether it came from the chat template (then it holds its special tokens)."""
    if raw:
        return prompt, False  # type: ignore[return-value]
    if not tokenizer.chat_template:
        if isinstance(prompt, str) and not tools:
            return prompt, False
        raise RequestError("this model's tokenizer has no chat template: send text prompts with raw: true")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **(kwargs or {})
        )
    except Exception as err:  # the template rejects the conversation (e.g. roles out of order)
        raise RequestError(f"the chat template rejected the conversation: {err}") from err
    return text, True


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the generation config's EOS ids and the tokenizer's EOS (as vLLM
    stops); empty when neither names one."""
    eos = model.generation_config.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _generate_kwargs(params: dict[str, Any], eos_ids: list[int], pad_id: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
    }
    for name in ("top_p", "top_k", "repetition_penalty"):
        if name in params:
            kwargs[name] = params[name]
    temperature = params.get("temperature")
    do_sample = params.get("do_sample")
    if temperature == 0:  # the common "greedy" spelling
        do_sample, temperature = (False if do_sample is None else do_sample), None
    elif temperature is not None and do_sample is None:
        do_sample = True
    if temperature is not None:
        kwargs["temperature"] = temperature
    if do_sample is not None:
        kwargs["do_sample"] = do_sample
        if not do_sample:  # no sampling warnings from a sampling generation_config
            kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def predict_fn(data: dict[str, Any], model: LoadedModel) -> list[dict[str, str]]:
    """Generate an answer for every prompt of ``data`` (one left-padded batch)."""
    tokenizer = model.tokenizer
    params = data.get("parameters", {})
    rendered = [
        _render(tokenizer, p, data.get("raw", False), data.get("tools"), data.get("chat_template_kwargs"))
        for p in data["prompts"]
    ]
    texts = [text for text, _ in rendered]
    templated = rendered[0][1]  # all prompts or none: raw is per request, conversations need the template
    # a rendered chat template already holds its special tokens (BOS, ...): add none twice
    batch = tokenizer(texts, add_special_tokens=not templated, padding=True, return_tensors="pt")
    batch = {k: v.to(model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    eos_ids = eos_token_ids(model.model, tokenizer)
    kwargs = _generate_kwargs(params, eos_ids, tokenizer.pad_token_id)
    if "seed" in params:
        torch.manual_seed(params["seed"])
    with torch.inference_mode():
        output = model.model.generate(**batch, **kwargs)
    new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
    results = []
    for prompt_text, ids in zip(texts, new_tokens, strict=True):
        end = next((i for i, token in enumerate(ids) if token in eos_ids), len(ids))
        answer = tokenizer.decode(ids[:end], skip_special_tokens=True)
        full = params.get("return_full_text", False)
        results.append({"generated_text": prompt_text + answer if full else answer})
    return results


# --------------------------------------------------------------------------------------------------
# output_fn


def output_fn(prediction: list[dict[str, str]], accept: str | None) -> str:
    """The predictions as a JSON array (``accept``: application/json, ``*/*`` or none)."""
    media = _media_type(accept)
    if media not in (JSON, "*/*"):
        raise RequestError(f"accept type {accept!r} is not supported: ask for {JSON}", status_code=406)
    return json.dumps(prediction, ensure_ascii=False)
