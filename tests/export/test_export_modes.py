"""An export's files and folders get the modes the umask gives new files (0644 / 0755 under umask 022),
whatever mode the writers (safetensors writes 0600) gave them in the staging folder."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ftpipe.config import PipelineConfig


@pytest.fixture
def umask_022() -> Iterator[None]:
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def _lora_checkpoint(folder: Path, model: Path) -> Path:
    """A LoRA checkpoint (rank 4) of the tiny Llama, as ``ftpipe train`` writes one."""
    from transformers import AutoModelForCausalLM

    from ftpipe.model.lora import apply_lora

    cfg = PipelineConfig.from_flat(
        {"hf_model_id": str(model), "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    )
    peft = apply_lora(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), cfg, announce=False)
    gen = torch.Generator().manual_seed(3)
    state = {
        "model." + n: torch.randn(p.shape, generator=gen) * 0.1
        for n, p in peft.named_parameters()
        if "lora_" in n
    }
    path = folder / "step=2-val_loss=1.0.ckpt"
    meta = {"config": cfg.to_flat(), "finetuning": "lora", "state_dict_prefix": "model."}
    torch.save({"state_dict": state, "global_step": 2, "epoch": 0, "ftpipe": meta}, path)
    return path


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_an_export_under_umask_022_has_0644_files_and_0755_folders(tmp_path, tiny_model, umask_022, merge):
    from ftpipe.export.export import export_model

    ckpt = _lora_checkpoint(tmp_path, tiny_model)
    out = tmp_path / "export"
    cfg = PipelineConfig.from_flat(
        {
            "hf_model_id": str(tiny_model),
            "results_dir": str(tmp_path / "results"),
            "lora_rank": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "export_dtype": "float32",
            "checkpoint": str(ckpt),
            "merge": merge,
            "export_dir": str(out),
        }
    )
    export_model(cfg)
    modes = _modes(out)
    weights = [name for name in modes if name.endswith(".safetensors")]
    assert weights, sorted(modes)  # the file safetensors writes 0600 is among those checked
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o755 if (out / name).is_dir() and name != "." else 0o644) and name != "."
    }
    assert not wrong, wrong
    assert modes["."] == 0o755


@pytest.mark.timeout(30)
def test_the_modes_follow_the_umask_and_keep_execute_bits(tmp_path):
    from ftpipe.utils.folders import swap_in

    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    private = staging / "sub" / "weights.safetensors"
    private.write_bytes(b"x")
    private.chmod(0o600)
    script = staging / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o700)
    (staging / "sub").chmod(0o700)
    before = os.umask(0o027)
    try:
        swap_in(staging, tmp_path / "target")
    finally:
        os.umask(before)
    modes = _modes(tmp_path / "target")
    assert modes == {".": 0o750, "sub": 0o750, "sub/weights.safetensors": 0o640, "run.sh": 0o750}
