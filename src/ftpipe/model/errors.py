"""Errors of loading a model or its tokenizer; messages name ``hf_model_id`` and say what to do."""

from __future__ import annotations

from pathlib import Path

from ftpipe.errors import FtpipeError


class ModelLoadError(FtpipeError, RuntimeError):
    """The model (or its configuration) cannot be loaded; the message says what to change."""


class TokenizerLoadError(ModelLoadError, OSError):
    """The tokenizer of ``hf_model_id`` cannot be loaded (an OSError, as transformers raises)."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_hint(model_id: str, path: str | Path, err: BaseException) -> str:
    """What to do when ``AutoConfig`` / ``AutoTokenizer`` cannot load ``model_id`` (resolved to ``path``)."""
    if "Validation" in type(err).__name__:
        return "its config.json holds values transformers refuses"
    if "trust_remote_code" in str(err):
        return "the model needs code from its repository: set trust_remote_code: true if you trust it"
    if Path(path).expanduser().is_dir():
        return "the folder has no usable config.json / tokenizer files"
    if _offline():
        return (
            "it is not a local folder, not in the Hugging Face cache, and the hub is offline "
            "(HF_HUB_OFFLINE=1): download it where there is internet "
            f"(`hf download {model_id}`), point hf_model_id at a local folder, or use 'embedded'"
        )
    return "check the id (and access rights / HF_TOKEN for gated models) or give a local folder"


def short_reason(err: BaseException) -> str:
    """The first line of ``err`` (transformers' messages run over several lines of generic advice); a
    configuration validation error keeps its lines, which name the refused values."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if "Validation" in type(err).__name__:
        return f"{type(err).__name__}: {' '.join(lines)}"
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
