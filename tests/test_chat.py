"""``ftpipe chat`` under a pseudo-terminal: two turns with the embedded model, /reset and /exit, and the
one-shot ``--prompt`` for scripts (transformers; the answers stream to the terminal).

The answers are checked against transformers' own greedy ``generate`` on the same conversation rendered by
the model's chat template, on this machine: what the chat guarantees (the history, the system prompt,
greedy decoding at temperature 0), not the model's wording (which may differ between CPUs).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

pytestmark = pytest.mark.timeout(240)

FRANCE = "What is the capital of France?"
ITALY = "And of Italy?"  # answered from the history only (alone, the model answers something else)
SYSTEM = "Answer in one short sentence."
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def greedy(embedded_model_path):
    """``greedy((role, content), ...)``: the embedded model's greedy answer (``NEW_TOKENS`` at most) to a
    conversation, as transformers' ``generate`` gives it on the conversation rendered by the model's chat
    template."""
    import functools

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32).eval()

    @functools.cache
    def answer(*turns: tuple[str, str]) -> str:
        messages = [{"role": role, "content": content} for role, content in turns]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    return answer


def _on_terminal(text: str) -> str:
    """``text`` as a pseudo-terminal shows it (its newlines as CR LF)."""
    return text.replace("\n", "\r\n")


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
        str(NEW_TOKENS),
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_a_two_turn_session_with_reset_and_exit(embedded_model_path, tmp_path, greedy):
    first = greedy(("user", FRANCE))
    second = greedy(("user", FRANCE), ("assistant", first.strip()), ("user", ITALY))
    # what the test needs of the model: the second answer depends on the first turn
    assert first.strip() and second.strip() and second != greedy(("user", ITALY)), second
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
        child.sendline(FRANCE)
        child.expect_exact("model> ")
        child.expect_exact(_on_terminal(first))
        child.expect_exact("you> ")
        child.sendline(ITALY)  # the second turn sees the first
        child.expect_exact("model> ")
        child.expect_exact(_on_terminal(second))
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_one_prompt_for_scripts_with_a_system_prompt(embedded_model_path, tmp_path, greedy):
    answer = greedy(("system", SYSTEM), ("user", FRANCE))
    assert answer.strip()
    proc = subprocess.run(
        [sys.executable, *_args(str(embedded_model_path)), "--prompt", FRANCE, "--system", SYSTEM],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"model> {answer}"), proc.stdout


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
