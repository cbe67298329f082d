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


def _tiny_args(model) -> list[str]:
    return [*_args(str(model)), "--hf_model_id", str(model), "--max_new_tokens", "2"]


def test_a_piped_line_that_is_not_utf8_stops_the_chat_naming_the_line(tiny_llama, tmp_path):
    """Piped input: the first line is answered; the second, not UTF-8, stops the chat with one message
    (exit 2) instead of reaching the model mangled."""
    proc = subprocess.run(
        [sys.executable, *_tiny_args(tiny_llama)],
        cwd=tmp_path,
        env=_env(),
        input=b"hello\ncaf\xe9 \xff\n/exit\n",
        capture_output=True,
        timeout=180,
    )
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err[-2000:]
    assert out.count("model> ") == 1 and "Traceback" not in out + err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err[-2000:]
    assert "standard input: line 2 is not UTF-8 text (byte 0xe9 at byte 4)" in errors[0]


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_a_typed_line_that_is_not_utf8_stops_the_chat(tiny_llama, tmp_path, errors):
    """A terminal whose input is not UTF-8 (decoded strictly, or with surrogate escapes)."""
    child = pexpect.spawn(
        sys.executable,
        _tiny_args(tiny_llama),
        cwd=str(tmp_path),
        env={**_env(), "PYTHONIOENCODING": f"utf-8:{errors}"},
        timeout=180,
    )
    try:
        child.expect_exact(b"you> ")
        child.sendline(b"hello")
        child.expect_exact(b"model> ")
        child.expect_exact(b"you> ")
        child.send(b"caf\xe9\r")
        child.expect(b"standard input: line 2 is not UTF-8 text")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 2, child.before
    assert b"Traceback" not in child.before
