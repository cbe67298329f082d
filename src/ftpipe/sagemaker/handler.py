"""Put the SageMaker serving handler beside an exported model: ``<model_dir>/code/inference.py``.

A SageMaker PyTorch inference container serves a ``model.tar.gz`` that holds the model files at its
top level and the handler in ``code/``: it installs ``code/requirements.txt`` at start-up and loads
``code/inference.py`` (``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn``). The handler is the
self-contained module ``ftpipe/model/serving_handler.py`` (no ftpipe imports), copied as it is.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ftpipe.errors import FtpipeError
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)

CODE_DIR = "code"
HANDLER_FILE = "inference.py"
#: The handler's source in the package (``ftpipe.model``: the serving rules live beside the model).
HANDLER_SOURCE = "serving_handler.py"
REQUIREMENTS_FILE = "requirements.txt"
# what the serving container installs over its own torch: the same ranges as pyproject.toml's
# dependencies (tests/sagemaker/test_inference_handler.py checks that they agree)
INFERENCE_REQUIREMENTS = ("transformers>=5.16.1,<5.20", "accelerate>=1.0")


class HandlerError(FtpipeError, RuntimeError):
    """The serving code cannot be written; the message says which folder to fix."""


def handler_source() -> str:
    """The text of the serving handler (``ftpipe/model/serving_handler.py``, shipped in the package)."""
    return resources.files("ftpipe.model").joinpath(HANDLER_SOURCE).read_text(encoding="utf-8")


def write_inference_code(model_dir: str | Path) -> Path:
    """Write ``code/inference.py`` and ``code/requirements.txt`` into the exported model folder
    ``model_dir`` (replacing earlier copies); returns the ``code`` folder."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise HandlerError(
            f"model_dir: {model_dir} holds no exported model (no config.json); "
            "export the model there first (ftpipe export / export_dir)"
        )
    code = model_dir / CODE_DIR
    code.mkdir(exist_ok=True)
    (code / HANDLER_FILE).write_text(handler_source(), encoding="utf-8")
    (code / REQUIREMENTS_FILE).write_text("\n".join(INFERENCE_REQUIREMENTS) + "\n", encoding="utf-8")
    log.info("wrote the SageMaker serving handler to %s (%s, %s)", code, HANDLER_FILE, REQUIREMENTS_FILE)
    return code
