"""Checkpoint storage rules without training: atomic publishing, leftovers, room and resume choice."""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from ftpipe.config import PipelineConfig
from ftpipe.train.atomic import CheckpointRoom, _swap, checkpoint_bytes, remove_leftovers
from ftpipe.train.resume import ResumeError, newest_checkpoint, resolve_resume

Usage = namedtuple("Usage", "total used free")


def _module() -> torch.nn.Module:
    module = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 10))
    module[0].requires_grad_(False)
    return module


@pytest.mark.timeout(30)
def test_checkpoint_size_counts_trainable_weights_and_two_adam_moments():
    assert checkpoint_bytes(_module()) == (100 * 10 + 10) * (4 + 8)


@pytest.mark.timeout(30)
def test_room_check_refuses_a_full_disk_and_an_unwritable_folder(tmp_path, monkeypatch):
    assert CheckpointRoom.problem(tmp_path / "ckpt", _module()) is None
    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    problem = CheckpointRoom.problem(tmp_path / "ckpt", _module())
    assert problem and "two checkpoints need about" in problem and str(tmp_path / "ckpt") in problem
    monkeypatch.undo()
    blocker = tmp_path / "a-file"  # a folder cannot be made under a file (root included)
    blocker.write_text("")
    assert "not writable" in CheckpointRoom.problem(blocker / "ckpt", _module())


@pytest.mark.timeout(30)
def test_swap_replaces_a_folder_checkpoint_and_leftovers_are_removed(tmp_path):
    final, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.tmp"
    final.mkdir()
    (final / "old").write_text("1")
    tmp.mkdir()
    (tmp / "new").write_text("2")
    _swap(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new"] and not tmp.exists()
    assert not (tmp_path / "last.ckpt.old").exists()
    (tmp_path / "r1-step=4.ckpt.tmp").mkdir()
    (tmp_path / "r1-last.ckpt.old").write_text("")
    (tmp_path / "notes.tmp").write_text("the user's")  # not a run's own: never deleted by its suffix
    (tmp_path / "data.old").mkdir()
    owned = {"r1-step=4.ckpt", "r1-last.ckpt"}
    assert remove_leftovers(tmp_path, owned.__contains__) == ["r1-last.ckpt.old", "r1-step=4.ckpt.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.old", "last.ckpt", "notes.tmp"]


@pytest.mark.timeout(30)
def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    cfg = PipelineConfig.from_flat({"checkpoint_dir": str(tmp_path), "resume_from_checkpoint": "auto"})
    assert resolve_resume(cfg) is None  # nothing there: a fresh start
    older = tmp_path / "step=2.ckpt"
    older.write_bytes(b"x")
    os.utime(older, (1, 1))
    incomplete = tmp_path / "last.ckpt"  # a folder without its index: skipped
    incomplete.mkdir()
    (incomplete / "meta.pt").write_bytes(b"x")
    (tmp_path / "step=9.ckpt.tmp").write_bytes(b"x")  # an unpublished save: skipped
    assert newest_checkpoint(cfg) == older
    with pytest.raises(ResumeError, match="is incomplete"):
        resolve_resume(cfg.replace(resume_from_checkpoint=str(incomplete)))
    with pytest.raises(ResumeError, match="does not exist"):
        resolve_resume(cfg.replace(resume_from_checkpoint=str(Path(tmp_path) / "nope.ckpt")))
