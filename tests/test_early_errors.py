"""Hostile input fails early: one clear error naming the culprit, before processes start or weights load.

Covered elsewhere (not repeated here):

* invalid configuration values, all problems at once, exit 2 without a traceback:
  tests/config/test_config.py (test_validation_reports_every_problem_at_once,
  test_cli_rejects_unknown_keys_and_bad_values, test_cli_validation_errors_exit_with_all_problems);
* a dataset file that does not exist: tests/data/test_prepare.py::test_missing_file_is_named and the
  console script in tests/config/test_config.py (exit 2, names the file, no traceback);
* a missing column: tests/data/test_prepare.py::test_missing_column_is_named_before_any_work;
* an unknown model id in the model loader: tests/model/test_model_load.py::
  test_offline_unknown_model_id_is_a_clear_error.

Here: a YAML file that does not parse, an unknown model id and a tokenizer without a chat template
through ``ftpipe train`` itself (as users run it: 2 processes, FSDP2), and chat rows with roles out
of order (prepare with ``on_bad_row: fail``, and rows given ready-prepared).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftpipe.config.schema import DataConfig, PipelineConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ftpipe_train(args: list[str], timeout: float = 120) -> tuple[int, str, float]:
    """Run ``python -m ftpipe train ...`` offline; (exit status, output, seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTEST_CURRENT_TEST", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ftpipe", "train", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def assert_stopped_before_training(output: str) -> None:
    """No traceback, no weights loaded, no Lightning trainer or second process started."""
    assert "Traceback" not in output
    assert not re.search(r"loaded .* weights", output)  # what ftpipe.model.load logs
    for started in ("GLOBAL_RANK", "Initializing distributed", "LOCAL_RANK: 1", "trainable params"):
        assert started not in output


# --------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.timeout(60)
def test_yaml_that_does_not_parse_is_one_error(tmp_path, caplog):
    from ftpipe.cli.main import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [1,\nlora_rank: 3\n", encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(bad)])
    assert info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"--config: {bad}: line 3, column 1: not valid YAML" in errors[0]
    assert "Traceback" not in caplog.text


# --------------------------------------------------------------------------------------------------
# the model


@pytest.mark.timeout(150)
def test_unknown_model_id_fails_fast_offline_naming_hf_model_id(tmp_path):
    code, output, seconds = ftpipe_train(
        [
            "--config",
            "configs/demo.yaml",
            "--hf_model_id",
            "does/not-exist",
            "--data_dir",
            str(tmp_path / "data"),
            "--results_dir",
            str(tmp_path / "results"),
            "--max_steps",
            "2",
            "--warmup_steps",
            "0",
            "--val_check_interval",
            "2",
        ]
    )
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output[-3000:]
    assert "hf_model_id: cannot load the tokenizer of 'does/not-exist'" in errors[0]
    assert "hub is offline (HF_HUB_OFFLINE=1)" in errors[0] and "'embedded'" in errors[0]
    assert_stopped_before_training(output)
    assert not (tmp_path / "data").exists()  # failed before preparing any data
    assert not (tmp_path / "results").exists()  # and before writing anything for the run
    assert seconds < 90


# --------------------------------------------------------------------------------------------------
# chat data


@pytest.fixture
def model_without_chat_template(tiny_llama: Path, tmp_path: Path) -> Path:
    """The tiny Llama folder with its tokenizer's chat template removed."""
    folder = tmp_path / "no_template"
    shutil.copytree(tiny_llama, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(config_file.read_text())
    tok_cfg.pop("chat_template", None)
    config_file.write_text(json.dumps(tok_cfg))
    return folder


@pytest.mark.timeout(150)
def test_chat_data_with_a_tokenizer_without_chat_template_fails_before_fit(
    model_without_chat_template, tmp_path
):
    rows = [{"messages": [{**CHAT[0], "content": f"Hi {i}"}, CHAT[1]]} for i in range(20)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code, output, _ = ftpipe_train(
        [
            "--hf_model_id",
            str(model_without_chat_template),
            "--dataset",
            str(data),
            "--data_dir",
            str(tmp_path / "data"),
            "--results_dir",
            str(tmp_path / "results"),
            "--gpus_per_node",
            "2",
            "--strategy",
            "fsdp2",
            "--precision",
            "32-true",
            "--max_steps",
            "2",
            "--warmup_steps",
            "0",
            "--val_check_interval",
            "2",
            "--micro_batch_size",
            "1",
        ]
    )
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output[-3000:]
    assert f"the tokenizer of {model_without_chat_template} has no chat template" in errors[0]
    assert "the data has chat rows (messages)" in errors[0] and "training.jsonl" in errors[0]
    assert_stopped_before_training(output)


@pytest.mark.timeout(60)
def test_data_module_checks_the_chat_template_when_built(tokenizer, tmp_path):
    """``ftpipe train`` builds the data module before ``trainer.fit``: the check runs there, and needs
    no tokenization (nor a process group) yet."""
    import copy

    from ftpipe.data.datamodule import SFTDataModule
    from ftpipe.data.tokenize import ChatTemplateError

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    folder = tmp_path / "prepared"
    folder.mkdir()
    write_jsonl(folder / "training.jsonl", [{"id": 0, "messages": CHAT}])
    for name in ("validation.jsonl", "test.jsonl"):
        write_jsonl(folder / name, [])
    cfg = PipelineConfig.from_flat({"hf_model_id": "embedded", "prepared_dir": str(folder)})
    with pytest.raises(ChatTemplateError, match=r"has no chat template, but the data has chat rows"):
        SFTDataModule(cfg, tok)
    with pytest.raises(ChatTemplateError, match=r"has no chat template, but use_chat_template is true"):
        write_jsonl(folder / "training.jsonl", [{"id": 0, "input": "Q", "output": "A"}])
        SFTDataModule(cfg.replace(use_chat_template=True), tok)
    SFTDataModule(cfg, tok)  # alpaca rows, plain prompts: no template needed
    SFTDataModule(cfg.replace(use_chat_template=True), tokenizer)  # the template is there


OUT_OF_ORDER = [
    (
        [("assistant", "a"), ("user", "b"), ("assistant", "c")],
        "turn 0: the conversation starts with an assistant",
    ),
    ([("user", "a"), ("user", "b"), ("assistant", "c")], "turn 1: two user turns in a row"),
    (
        [("user", "a"), ("system", "s"), ("assistant", "c")],
        "turn 1: a system turn is only allowed as the first",
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("turns", "detail"), OUT_OF_ORDER, ids=["assistant-first", "user-user", "late-system"]
)
def test_chat_roles_out_of_order_fail_in_prepare_naming_file_line_and_turn(tmp_path, turns, detail):
    from ftpipe.config import validate_config
    from ftpipe.data.errors import BadRowError
    from ftpipe.data.prepare import prepare_data

    good = {"messages": CHAT}
    bad = {"messages": [{"role": r, "content": c} for r, c in turns]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, good, bad, good])
    cfg = validate_config(
        PipelineConfig.from_flat(
            {"dataset": str(path), "data_dir": str(tmp_path / "out"), "on_bad_row": "fail"}
        )
    )
    with pytest.raises(BadRowError) as err:
        prepare_data(cfg)
    assert f"{path}: line 3: bad row (chat_role_order): {detail}" in str(err.value)
    assert not any((tmp_path / "out").rglob(".data_ready"))


@pytest.mark.timeout(60)
def test_chat_roles_out_of_order_in_prepared_rows_fail_naming_file_and_row(tokenizer, tmp_path):
    """Rows given ready-prepared (``prepared_dir``) skip the prepare checks; tokenization refuses them."""
    from ftpipe.data.dataset import SFTDataset

    rows = [
        {"id": 1, "messages": CHAT},
        {"id": 2, "messages": [CHAT[1], CHAT[0], CHAT[1]]},  # starts with an assistant turn
    ]
    path = write_jsonl(tmp_path / "training.jsonl", rows)
    with pytest.raises(
        ValueError, match=r"training\.jsonl: row id 2: turn 0: the conversation starts with an assistant turn"
    ):
        SFTDataset(path, tokenizer, DataConfig(), name=str(path), cache_dir=str(tmp_path / "cache"))
    # a trailing user turn is fine (left out of training)
    ok = write_jsonl(
        tmp_path / "ok.jsonl", [{"id": 3, "messages": [*CHAT, {"role": "user", "content": "x"}]}]
    )
    assert len(SFTDataset(ok, tokenizer, DataConfig(), cache_dir=str(tmp_path / "cache"))) == 1
