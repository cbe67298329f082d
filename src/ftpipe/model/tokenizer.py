"""Tokenizer loading: any Hugging Face tokenizer (or the embedded SmolLM2's), ready for SFT batching."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ftpipe.config.schema import ModelConfig
from ftpipe.model.embedded import resolve_model_path
from ftpipe.model.errors import TokenizerLoadError, load_hint, short_reason
from ftpipe.utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = get_logger(__name__)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give ``tokenizer`` a pad token when it has none (the EOS token, else the unknown token).

    Padding positions are masked out of attention and of the loss by the collator, so reusing EOS as
    the pad token is safe: EOS tokens that belong to a sample keep their labels. Returns the same
    tokenizer (changed in place).
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    name = tokenizer.name_or_path or type(tokenizer).__name__
    for kind in ("eos", "unk"):
        token = getattr(tokenizer, f"{kind}_token")
        if token is not None:
            tokenizer.pad_token = token
            log.info(
                "tokenizer of %s has no pad token: using its %s token %r (id %d) for padding",
                name,
                kind.upper(),
                token,
                tokenizer.pad_token_id,
            )
            return tokenizer
    raise TokenizerLoadError(
        f"tokenizer of {name} has no pad, EOS or unknown token to pad with; "
        "give it a pad token (tokenizer.pad_token = ...) or choose another hf_model_id"
    )


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_cfg.hf_model_id`` with a pad token and right padding (for training).

    Raises TokenizerLoadError (an FtpipeError and OSError) naming ``hf_model_id`` when it cannot be
    loaded: the training stage loads the tokenizer first, so an unknown model id fails in seconds.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(model_cfg.hf_model_id, model_cfg.model_cache_dir)
    if model_cfg.trust_remote_code:
        log.warning("trust_remote_code is on: %s may run its own Python code while loading", path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as err:  # the model's own tokenizer files: any failure to read them is the model's
        model_id = model_cfg.hf_model_id
        raise TokenizerLoadError(
            f"hf_model_id: cannot load the tokenizer of {model_id!r}: {load_hint(model_id, path, err)} "
            f"({short_reason(err)})"
        ) from err
    ensure_pad_token(tokenizer)
    apply_chat_template_setting(tokenizer, model_cfg)
    tokenizer.padding_side = "right"
    return tokenizer


def apply_chat_template_setting(tokenizer: PreTrainedTokenizerBase, model_cfg: ModelConfig) -> None:
    """Give ``tokenizer`` the configured ``chat_template`` (a shipped name or a Jinja file), in place.

    Every stage loads its tokenizer through :func:`load_tokenizer`, so training, evaluation and the
    exported tokenizer (``save_pretrained`` writes the template) all render with the same template.
    """
    if model_cfg.chat_template is None:
        return
    from ftpipe.templates import chat_template_text

    try:
        tokenizer.chat_template = chat_template_text(model_cfg.chat_template)
    except OSError as err:
        raise TokenizerLoadError(str(err)) from err
    log.debug("chat template: %s (chat_template)", model_cfg.chat_template)
