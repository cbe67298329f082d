"""The SageMaker serving handler (``code/inference.py``) on a model exported by ``ftpipe export``.

The embedded SmolLM2 gets a LoRA checkpoint with small random adapters, ``export_model`` merges it into
a Hugging Face folder (as the SageMaker entry point does into SM_MODEL_DIR), ``write_inference_code``
puts the handler beside it, and the tests import the COPIED file by its path, as the serving container
does, and call model_fn / input_fn / predict_fn / output_fn. Greedy answers must equal transformers'
own ``generate`` on the chat-templated prompt token for token (same fp32 weights on the CPU).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ftpipe.config import PipelineConfig, checkpoints_dir
from ftpipe.errors import FtpipeError
from ftpipe.export.export import export_model
from ftpipe.sagemaker.handler import INFERENCE_REQUIREMENTS, handler_source, write_inference_code

REPO_ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 8
SHORT = "What is the capital of France?"
LONG = "Write one sentence about the sea, the wind and the long summer evenings on the coast of Brittany."
GREEDY = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
ALLOWED_IMPORTS = {"__future__", "json", "os", "typing", "torch", "transformers", "sagemaker_inference"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the 2 shared cores a second thread waits on a busy one (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, embedded_model_path: Path) -> Path:
    """The embedded model with random LoRA adapters (a 'best' checkpoint), exported and merged, with
    the serving code written beside it; returns the model folder."""
    from transformers import AutoModelForCausalLM

    from ftpipe.model.lora import apply_lora

    tmp = tmp_path_factory.mktemp("served")
    cfg = PipelineConfig.from_flat(
        {
            "hf_model_id": str(embedded_model_path),
            "results_dir": str(tmp / "results"),
            "data_dir": str(tmp / "data"),
            "lora_rank": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "precision": "32-true",
        }
    )
    base = AutoModelForCausalLM.from_pretrained(embedded_model_path, dtype=torch.float32)
    peft_model = apply_lora(base, cfg, announce=False)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            state["model." + name] = torch.randn(param.shape, generator=gen) * 0.02
    del base, peft_model
    ckpt = checkpoints_dir(cfg) / "version_0" / "step=2-val_loss=1.0.ckpt"
    ckpt.parent.mkdir(parents=True)
    meta = {"config": cfg.to_flat(), "finetuning": "lora", "state_dict_prefix": "model."}
    torch.save({"state_dict": state, "global_step": 2, "epoch": 0, "ftpipe": meta}, ckpt)
    result = export_model(cfg.replace(checkpoint=str(ckpt)))
    assert result.kind == "merged"
    folder = Path(result.path)
    code = write_inference_code(folder)
    assert code == folder / "code"
    return folder


@pytest.fixture(scope="module")
def handler(exported: Path):
    """``code/inference.py`` imported from the model folder by its path."""
    path = exported / "code" / "inference.py"
    spec = importlib.util.spec_from_file_location("served_inference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def served(handler, exported: Path):
    return handler.model_fn(str(exported))


@pytest.fixture(scope="module")
def reference(exported: Path):
    """Greedy answers of transformers' own generate: ``reference(prompt, chat=True)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()

    @functools.cache
    def answer(prompt: str, chat: bool = True) -> str:
        if chat:
            messages = [{"role": "user", "content": prompt}]
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return answer


def _invoke(handler, served, body, content_type="application/json", accept="application/json"):
    """One request through the four serving functions, as the toolkit chains them; parsed JSON back."""
    if isinstance(body, dict):
        body = json.dumps(body)
    data = handler.input_fn(body, content_type)
    return json.loads(handler.output_fn(handler.predict_fn(data, served), accept))


@pytest.mark.timeout(120)
def test_model_fn_loads_the_export_for_generation(handler, served, exported):
    assert Path(handler.__file__) == exported / "code" / "inference.py"
    assert not served.model.training
    assert served.device.type == "cpu"
    assert {p.dtype for p in served.model.parameters()} == {torch.float32}  # fp32 on the CPU
    assert served.tokenizer.padding_side == "left"
    assert served.tokenizer.chat_template


@pytest.mark.timeout(120)
def test_answer_equals_transformers_generate_on_the_chat_prompt(handler, served, reference):
    out = _invoke(handler, served, {"inputs": SHORT, "parameters": GREEDY})
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    chat = reference(SHORT)
    assert chat.strip() and out[0]["generated_text"] == chat
    # raw: true skips the template: transformers' answer on the bare prompt, a different one
    raw = _invoke(handler, served, {"inputs": SHORT, "raw": True, "parameters": GREEDY})
    assert raw == [{"generated_text": reference(SHORT, chat=False)}]
    assert raw[0]["generated_text"] != chat
    # the same request as bytes with a charset, and as a conversation, and with the prompt echoed
    body = json.dumps({"messages": [{"role": "user", "content": SHORT}], "parameters": GREEDY}).encode()
    assert _invoke(handler, served, body, "application/json; charset=utf-8", "*/*") == out
    full = _invoke(handler, served, {"inputs": SHORT, "parameters": {**GREEDY, "return_full_text": True}})
    text = full[0]["generated_text"]
    assert text.endswith(chat) and SHORT in text and text.startswith("<|im_start|>")


@pytest.mark.timeout(120)
def test_batch_is_left_padded_and_equals_one_by_one(handler, served, reference):
    lengths = [len(served.tokenizer(p)["input_ids"]) for p in (SHORT, LONG)]
    assert lengths[1] > lengths[0] + 5  # the short prompt really gets padding
    batch = _invoke(handler, served, {"inputs": [SHORT, LONG], "parameters": GREEDY})
    singles = [_invoke(handler, served, {"inputs": p, "parameters": GREEDY})[0] for p in (LONG, SHORT)]
    assert batch == singles[::-1]
    assert [b["generated_text"] for b in batch] == [reference(SHORT), reference(LONG)]
    conversations = [[{"role": "user", "content": p}] for p in (SHORT, LONG)]
    assert _invoke(handler, served, {"messages": conversations, "parameters": GREEDY}) == batch


@pytest.mark.timeout(120)
def test_sampling_follows_the_seed(handler, served):
    request = {"inputs": SHORT, "parameters": {"max_new_tokens": NEW_TOKENS, "temperature": 1.5, "seed": 7}}
    first = _invoke(handler, served, request)
    assert _invoke(handler, served, request) == first
    others = {
        _invoke(handler, served, {**request, "parameters": {**request["parameters"], "seed": s}})[0][
            "generated_text"
        ]
        for s in range(3)
    }
    assert len(others) > 1  # it samples: other seeds, other answers


def test_plain_text_body_is_one_prompt(handler):
    data = handler.input_fn(f"  {SHORT}\n".encode(), "text/plain")
    assert data == {"prompts": [f"  {SHORT}\n"], "parameters": {}, "raw": False}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        ('{"inputs": "hi"}', "text/csv", 415, "text/csv"),
        ("{inputs: hi", "application/json", 400, "not valid JSON"),
        ('["hi"]', "application/json", 400, "must be an object"),
        ('{"prompt": "hi"}', "application/json", 400, "unknown request keys ['prompt']"),
        ('{"parameters": {}}', "application/json", 400, "exactly one of"),
        ('{"inputs": "a", "messages": []}', "application/json", 400, "exactly one of"),
        ('{"inputs": "a", "parameters": {"max_tokens": 5}}', "application/json", 400, "max_tokens"),
        ('{"inputs": "a", "parameters": {"max_new_tokens": 0}}', "application/json", 400, "max_new_tokens"),
        ('{"inputs": "a", "parameters": {"top_p": 1.5}}', "application/json", 400, "top_p"),
        ('{"inputs": "a", "parameters": {"do_sample": "yes"}}', "application/json", 400, "do_sample"),
        ('{"inputs": [1, 2]}', "application/json", 400, 'inputs"[0]'),
        ('{"messages": [{"role": "user"}]}', "application/json", 400, "role and content"),
        ('{"messages": [{"role": "user", "content": "a"}], "raw": true}', "application/json", 400, "raw"),
        ("", "text/plain", 400, "empty"),
    ],
)
def test_bad_requests_are_value_errors_with_a_client_status(handler, body, content_type, status, words):
    with pytest.raises(ValueError, match=None) as info:
        handler.input_fn(body, content_type)
    assert isinstance(info.value, handler.RequestError)
    assert info.value.status_code == status
    assert words in str(info.value)


def test_unsupported_accept_type_is_refused(handler):
    with pytest.raises(ValueError, match="accept type 'text/csv'") as info:
        handler.output_fn([{"generated_text": "x"}], "text/csv")
    assert info.value.status_code == 406


def test_written_code_is_the_self_contained_handler_with_the_project_pins(exported):
    code = exported / "code"
    assert sorted(p.name for p in code.iterdir()) == ["inference.py", "requirements.txt"]
    source = (code / "inference.py").read_text()
    assert source == handler_source()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS  # no ftpipe in the serving container
    assert all(f"def {fn}(" in source for fn in ("model_fn", "input_fn", "predict_fn", "output_fn"))

    lines = (code / "requirements.txt").read_text().splitlines()
    assert lines == list(INFERENCE_REQUIREMENTS)
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    for requirement in lines:  # the same version ranges as the project's own dependencies
        assert f'"{requirement}"' in pyproject, f"{requirement} differs from pyproject.toml's dependencies"


def test_write_inference_code_needs_an_exported_model(tmp_path):
    with pytest.raises(FtpipeError, match=r"no config\.json"):
        write_inference_code(tmp_path)
