"""Tokenizer loading: any Hugging Face tokenizer (or the embedded SmolLM2's), ready for SFT batching."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from ftpipe.templates import SHIPPED_CHAT_TEMPLATES, chat_template_text

    value = model_cfg.chat_template
    shipped = value in SHIPPED_CHAT_TEMPLATES
    source = value if shipped else str(Path(value).expanduser().resolve())
    where = f"chat_template: {source}"
    try:
        text = chat_template_text(value)
    except OSError as err:
        raise TokenizerLoadError(str(err)) from err
    except UnicodeDecodeError as err:
        raise TokenizerLoadError(
            f"{where}: not UTF-8 text (byte {err.start}); save the Jinja template as UTF-8"
        ) from err
    if not text.strip():
        raise TokenizerLoadError(
            f"{where}: the file is empty; write a Jinja chat template into it, or remove chat_template "
            "to use the model's own"
        )
    tokenizer.chat_template = text
    origin = f"ftpipe's {value} chat template" if shipped else f"the chat template file {source}"
    setattr(tokenizer, _ORIGIN, (f"{origin} (chat_template)", text))
    check_chat_template(tokenizer, where)
    log.debug("chat template: %s (chat_template)", value)


#: attribute of a tokenizer given ``chat_template``: (where its template comes from, the template's text).
_ORIGIN = "ftpipe_chat_template_origin"
#: the plainest conversations a chat template must render: one of them at least.
_PROBES = (
    [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ping"},
        {"role": "assistant", "content": "pong"},
    ],
)


def chat_template_origin(tokenizer: PreTrainedTokenizerBase) -> str:
    """Where the tokenizer's chat template comes from, for messages: the ``chat_template`` file (or shipped
    name) it was given, else the model's own."""
    origin = getattr(tokenizer, _ORIGIN, None)
    if origin and origin[1] == getattr(tokenizer, "chat_template", None):
        return origin[0]
    return f"the chat template of {tokenizer.name_or_path or type(tokenizer).__name__}"


def template_error_text(err: BaseException) -> str:
    """A Jinja error as the user's template shows it: ``line N: <message>`` for a syntax error,
    ``raise_exception: <message>`` for the template's own stop, else ``<type>: <message>``."""
    import jinja2

    if isinstance(err, jinja2.TemplateSyntaxError):
        return f"line {err.lineno}: Jinja syntax error: {err.message}"
    if type(err) is jinja2.TemplateError:  # what the templates' raise_exception(...) raises
        return f"the template raised an error: {err}"
    return f"{type(err).__name__}: {err}"


def check_chat_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Raise TokenizerLoadError naming ``where`` (the ``chat_template`` setting) when the template does not
    compile, or renders neither a plain user / assistant conversation nor one with a system turn."""
    first: Exception | None = None
    for probe in _PROBES:
        try:
            tokenizer.apply_chat_template(probe, tokenize=False)
            return
        except Exception as err:  # the user's Jinja: whatever it raises is the template's problem
            first = first or err
            if type(err).__name__ == "TemplateSyntaxError":
                break
    assert first is not None
    raise TokenizerLoadError(
        f"{where}: {template_error_text(first)} (rendering a plain user / assistant conversation). Fix the "
        "template, or remove chat_template to use the model's own"
    ) from first


#: files a saved tokenizer needs: its settings, and its vocabulary in one of these forms.
_TOKENIZER_SETTINGS = "tokenizer_config.json"
_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def missing_tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files ``folder`` lacks (empty when it holds a tokenizer to load)."""
    missing = [] if (folder / _TOKENIZER_SETTINGS).is_file() else [_TOKENIZER_SETTINGS]
    vocabularies = [folder / name for name in _VOCABULARIES] + list(folder.glob("*.tiktoken"))
    has_vocabulary = any(path.is_file() for path in vocabularies)
    return ([] if has_vocabulary else ["tokenizer.json"]) + missing


def load_folder_tokenizer(folder: str | Path, field: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in a model folder (an export); a TokenizerLoadError naming ``field``, the folder
    and the missing files when it has none, or naming what went wrong when it cannot be loaded."""
    check_tokenizer_files(folder, field)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # the folder's own files: any failure to read them is the folder's
        raise TokenizerLoadError(
            f"{field}: cannot load the tokenizer in {folder} ({short_reason(err)}); export the model again "
            "or copy its tokenizer files back"
        ) from err


def check_tokenizer_files(folder: str | Path, field: str) -> None:
    """Raise TokenizerLoadError naming ``field``, the folder and the missing files when a model folder (an
    export) holds no tokenizer; a hub id or a missing folder is left to the loader."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return
    missing = missing_tokenizer_files(path)
    if missing:
        raise TokenizerLoadError(
            f"{field}: {path} holds no tokenizer ({' and '.join(missing)} missing); export the model again, "
            "or copy the tokenizer files of the model it was trained from into the folder"
        )
