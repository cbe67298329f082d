"""``ftpipe chat`` under a pseudo-terminal: two turns with the embedded model, /reset and /exit, and the
one-shot ``--prompt`` for scripts (transformers; the answers stream to the terminal)."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

pytestmark = pytest.mark.timeout(240)


def _args(model: str) -> list[str]:
    return [
        "-m",
        "ftpipe",
        "chat",
        "--model_dir",
        model,
        "--hf_model_id",
        "embedded",
        "--eval_backend",
        "transformers",
        "--temperature",
        "0",
        "--max_new_tokens",
        "24",
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_a_two_turn_session_with_reset_and_exit(embedded_model_path, tmp_path):
    child = pexpect.spawn(
        sys.executable,
        _args(str(embedded_model_path)),
        cwd=str(tmp_path),
        env=_env(),
        encoding="utf-8",
        timeout=180,
    )
    try:
        child.expect("/reset starts over")
        child.expect_exact("you> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("model> ")
        child.expect("Paris")
        child.expect_exact("you> ")
        child.sendline("And the capital of Italy?")  # the second turn sees the first
        child.expect_exact("model> ")
        child.expect("Rome")
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_one_prompt_for_scripts_with_a_system_prompt(embedded_model_path, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            *_args(str(embedded_model_path)),
            "--prompt",
            "What is the capital of France?",
            "--system",
            "Answer in one short sentence.",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("model> ") and "Paris" in proc.stdout
