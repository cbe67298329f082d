"""The project's own example data: each data set is written by a seeded script beside it (the committed file
is what the script writes), and the tool-calling configuration names the shipped tool template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ftpipe.config import ConfigError, PipelineConfig, load_config, validate_config

pytestmark = pytest.mark.timeout(60)
REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "examples" / "tool_calling"


def _generator(folder: Path = EXAMPLE):
    spec = importlib.util.spec_from_file_location("make_data", folder / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("folder", "data", "args"),
    [("alpaca", "instructions.json", (999, 0)), ("identity", "identity.json", (0,))],
)
def test_the_committed_example_data_is_what_its_seeded_script_writes(tmp_path, folder, data, args):
    base = REPO_ROOT / "examples" / folder
    written = _generator(base).write(tmp_path / data, *args)
    assert written.read_bytes() == (base / data).read_bytes()
    rows = json.loads(written.read_text())
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in rows)


def test_the_committed_data_is_what_the_seeded_script_writes(tmp_path):
    generator = _generator()
    written = generator.write(tmp_path / "tool_calls.jsonl", rows=800, seed=0)
    assert written.read_bytes() == (EXAMPLE / "tool_calls.jsonl").read_bytes()
    assert (
        generator.write_tools(tmp_path / "tools.json").read_bytes() == (EXAMPLE / "tools.json").read_bytes()
    )
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert all(row["conversations"][-1]["from"] == "function_call" for row in rows)
    kinds = {tuple(t["from"] for t in row["conversations"]) for row in rows}
    assert ("human", "function_call", "observation", "gpt", "human", "function_call") in kinds
    assert any(
        isinstance(json.loads(row["conversations"][-1]["value"]), list) for row in rows
    )  # parallel calls


def test_the_proof_configuration_is_valid_and_names_the_shipped_template():
    cfg = validate_config(load_config(REPO_ROOT / "configs" / "tool-calling.yaml"))
    assert cfg.model.chat_template == "chatml-tools" and cfg.data.dataset.endswith("tool_calls.jsonl")


def test_unknown_chat_template_is_a_configuration_error_listing_the_shipped_ones(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"chat_template: 'chatml-toolz' is neither a chat template shipped with ftpipe \(chatml-tools\)",
    ):
        validate_config(PipelineConfig.from_flat({"chat_template": "chatml-toolz"}))
    template = tmp_path / "mine.jinja"
    template.write_text("{{ messages }}")
    validate_config(PipelineConfig.from_flat({"chat_template": str(template)}))


def test_the_preference_pairs_are_what_their_seeded_script_writes(tmp_path):
    """examples/preference: every chosen answer has the checked property, its rejected twin does not, and
    the held-out prompts are not training prompts."""
    base = REPO_ROOT / "examples" / "preference"
    generator = _generator(base)
    written = generator.write(tmp_path / "pairs.jsonl", 0)
    assert written.read_bytes() == (base / "pairs.jsonl").read_bytes()
    heldout = generator.write_heldout(tmp_path / "heldout_prompts.jsonl")
    assert heldout.read_bytes() == (base / "heldout_prompts.jsonl").read_bytes()
    spec = importlib.util.spec_from_file_location("preference_property", base / "property.py")
    prop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prop)
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert len(rows) >= 300 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert all(prop.has_property(r["chosen"]) and not prop.has_property(r["rejected"]) for r in rows)
    prompts = {r["prompt"] for r in rows}
    assert not prompts & {json.loads(line)["prompt"] for line in heldout.read_text().splitlines()}
    validate_config(load_config(REPO_ROOT / "configs" / "dpo.yaml"))
