"""The ``eval`` configuration section: defaults, flat names, validation ranges."""

from __future__ import annotations

import pytest

from ftpipe.config.schema import EvalConfig, PipelineConfig, field_section_map
from ftpipe.config.validate import collect_problems
from ftpipe.evaluate.metrics import MetricSettings


@pytest.mark.timeout(30)
def test_eval_defaults_and_flat_names():
    ev = PipelineConfig().eval
    assert ev == EvalConfig()
    assert (ev.eval_backend, ev.temperature, ev.top_p, ev.max_new_tokens) == ("auto", 0.1, 0.95, 512)
    assert (ev.max_model_len, ev.gpu_memory_utilization, ev.tensor_parallel_size) == (8192, 0.9, None)
    assert (ev.bertscore_model, ev.bertscore_num_layers, ev.eval_batch_size, ev.max_eval_samples) == (
        None,
        None,
        8,
        None,
    )
    sections = field_section_map()
    assert {name for name, section in sections.items() if section == "eval"} >= {
        "eval_backend",
        "temperature",
        "top_p",
        "max_new_tokens",
        "max_model_len",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "vllm_cpu_kvcache_gib",
        "bertscore_model",
        "bertscore_num_layers",
        "eval_batch_size",
        "max_eval_samples",
        "eval_seed",
    }
    cfg = PipelineConfig().replace(
        bertscore_model="roberta-large", bertscore_num_layers=17, eval_batch_size=4
    )
    assert MetricSettings.from_config(cfg) == MetricSettings(
        bertscore_model="roberta-large", bertscore_num_layers=17, batch_size=4
    )


@pytest.mark.timeout(30)
def test_eval_ranges_are_validated():
    assert collect_problems(PipelineConfig()) == []
    assert (
        collect_problems(PipelineConfig().replace(temperature=0.0, top_p=1.0, gpu_memory_utilization=1.0))
        == []
    )
    bad = PipelineConfig().replace(
        temperature=-0.1,
        top_p=0.0,
        max_new_tokens=0,
        gpu_memory_utilization=1.5,
        tensor_parallel_size=0,
        eval_batch_size=0,
        max_eval_samples=-1,
    )
    problems = collect_problems(bad)
    for name in (
        "temperature",
        "top_p",
        "max_new_tokens",
        "gpu_memory_utilization",
        "tensor_parallel_size",
        "eval_batch_size",
        "max_eval_samples",
    ):
        assert sum(p.startswith(f"{name}: ") for p in problems) == 1, (name, problems)
    assert len(problems) == 7
