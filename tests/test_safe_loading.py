"""Safe loading: checkpoints never unpickle code, trust_remote_code warns, exports are safetensors only.

A "hostile" checkpoint here carries a pickled object whose ``__reduce__`` calls ``os.mkdir(marker)``:
loading it with a plain unpickler creates the marker folder (checked, so the payload is real); ftpipe
must refuse the file with a CheckpointError naming it, and the marker must not exist afterwards.
The exports' safetensors-only rule is asserted in tests/export/test_export.py (merged, adapter and
full fine-tune folders hold no .bin / .pt / .pth / .ckpt / .pkl file).
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from ftpipe.errors import FtpipeError
from ftpipe.model.checkpoint import CheckpointError, check_distributed_metadata, read_checkpoint

pytestmark = pytest.mark.timeout(60)


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _weights() -> dict[str, torch.Tensor]:
    return {"model.model.layers.0.self_attn.q_proj.weight": torch.ones(2, 2)}


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """Guards the tests below: a plain unpickler (torch.load(weights_only=False)) runs the payload."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _weights(), "evil": Payload(marker)}, path)
    assert not marker.exists()  # saving does not run it
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_checkpoint_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _weights(), "global_step": 3, "evil": Payload(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path}: cannot be read with torch.load(weights_only=True)")
    assert "posix.mkdir" in message or "os.mkdir" in message  # names the refused global
    assert "only checkpoints of plain tensors" in message
    assert isinstance(err.value, FtpipeError)  # the CLI prints it without a traceback, exit 2
    assert not marker.exists()
    # the same file without the payload reads fine: the refusal is about the object, not the file
    clean = tmp_path / "clean.ckpt"
    torch.save({"state_dict": _weights(), "global_step": 3}, clean)
    read = read_checkpoint(clean)
    assert read.global_step == 3 and list(read.weights) == ["model.layers.0.self_attn.q_proj.weight"]


def _dcp_folder(folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(
            {"state_dict.model.model.norm.weight": torch.arange(4.0)}, checkpoint_id=str(folder), no_dist=True
        )
    torch.save({"global_step": 5, "ftpipe": {"finetuning": "full"}}, folder / "meta.pt")
    return folder


def test_distributed_checkpoint_metadata_with_code_is_refused(tmp_path):
    """torch's own DCP reader unpickles ``.metadata`` with plain pickle.load; ftpipe's reader does not."""
    folder = _dcp_folder(tmp_path / "step=5")
    read = read_checkpoint(folder)  # the genuine folder reads
    check_distributed_metadata(folder)
    assert read.global_step == 5 and torch.equal(read.weights["model.norm.weight"], torch.arange(4.0))

    marker = tmp_path / "pwned"
    metadata = (folder / ".metadata").read_bytes()
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump([Payload(marker), metadata], fh)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(folder)
    message = str(err.value)
    assert f"checkpoint {folder}: .metadata cannot be read safely" in message
    assert "refused global posix.mkdir" in message or "refused global os.mkdir" in message
    with pytest.raises(CheckpointError, match=r"\.metadata cannot be read safely"):
        check_distributed_metadata(folder)  # the check a resume can run before Lightning reads it
    assert not marker.exists()


def test_distributed_checkpoint_meta_pt_with_code_is_refused(tmp_path):
    folder = _dcp_folder(tmp_path / "step=5")
    marker = tmp_path / "pwned"
    torch.save({"global_step": 5, "evil": Payload(marker)}, folder / "meta.pt")
    with pytest.raises(
        CheckpointError, match=r"step=5: meta\.pt cannot be read with torch\.load\(weights_only=True\)"
    ):
        read_checkpoint(folder)
    assert not marker.exists()


def _warnings_about_remote_code(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "trust_remote_code is on" in r.getMessage()]


def test_trust_remote_code_is_opt_in_and_warned(embedded_model_path, caplog):
    """Off by default; on, both the tokenizer and the model configuration log a WARNING naming the model."""
    from ftpipe.config.schema import PipelineConfig
    from ftpipe.model.load import load_model_config
    from ftpipe.model.tokenizer import load_tokenizer

    quiet = PipelineConfig.from_flat({"hf_model_id": "embedded"})
    assert quiet.model.trust_remote_code is False
    caplog.set_level(logging.INFO, logger="ftpipe")
    load_tokenizer(quiet.model)
    load_model_config(quiet)
    assert _warnings_about_remote_code(caplog) == []

    trusting = quiet.replace(trust_remote_code=True)
    load_tokenizer(trusting.model)
    load_model_config(trusting)
    records = _warnings_about_remote_code(caplog)
    assert len(records) == 2 and {r.levelno for r in records} == {logging.WARNING}
    assert {r.name for r in records} == {"ftpipe.model.tokenizer", "ftpipe.model.load"}
