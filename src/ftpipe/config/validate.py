"""Validation that reports every problem of a configuration at once."""

from __future__ import annotations

import dataclasses
import math
import string

from ftpipe.config.errors import ConfigError
from ftpipe.config.schema import DataConfig, PipelineConfig
from ftpipe.templates import chat_template_problem

__all__ = ["ConfigError", "collect_problems", "validate_config"]

#: Largest seed ``seed_everything`` (NumPy's 32-bit seed) accepts; the smallest is 0.
MAX_SEED = 2**32 - 1
#: Shortest ``max_seq_length`` that keeps a beginning-of-sequence token, a prompt token and an answer token.
MIN_SEQ_LENGTH = 3


def template_fields(template: str) -> list[str]:
    """Names of the ``{field}`` placeholders of a template (``{{`` and ``}}`` are literal braces).

    Raises ValueError for a malformed template (an unmatched brace, for example).
    """
    names = []
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or not name.isidentifier():
            raise ValueError(f"placeholder {{{name}}} is not a field name")
        if spec or conv:
            raise ValueError(f"placeholder {{{name}}} has a format spec or conversion; use plain {{{name}}}")
        names.append(name)
    return names


def _check_templates(d: DataConfig, problems: list[str], prefix: str = "") -> None:
    """Templates, field mapping and optional fields of one source (``prefix``: ``datasets[i].``)."""
    allowed = sorted(d.field_mapping)
    templates = {"input_template": d.input_template, "output_template": d.output_template}
    if d.input_template_no_input is not None and d.optional_fields:  # unused without optional fields
        templates["input_template_no_input"] = d.input_template_no_input
    for name, template in templates.items():
        try:
            fields = template_fields(template)
        except ValueError as err:
            problems.append(
                f"{prefix}{name}: malformed template ({err}); write literal braces as {{{{ and }}}}"
            )
            continue
        for f in fields:
            if f not in d.field_mapping:
                problems.append(
                    f"{prefix}{name}: unknown template field {{{f}}} (allowed: the keys of field_mapping: {allowed})"
                )
    try:
        if not template_fields(d.output_template):
            problems.append(f"{prefix}output_template: must contain at least one {{field}} placeholder")
    except ValueError:
        pass
    for f in d.optional_fields:
        if f not in d.field_mapping:
            problems.append(
                f"{prefix}optional_fields: {f!r} is not a key of field_mapping (allowed: {allowed})"
            )
    if d.converter is not None and ":" not in d.converter:
        problems.append(
            f"{prefix}converter: {d.converter!r} must be an import path 'package.module:function'"
        )


def _check_datasets(d: DataConfig, problems: list[str]) -> None:
    """The one ``dataset``, or every entry of the ``datasets`` mix with its own settings."""
    from ftpipe.config.mix import source_settings

    if not d.datasets:
        if not d.dataset.strip():
            problems.append("dataset: empty (give a hub id, a local file, a glob or a folder)")
        _check_templates(d, problems)
        return
    names: dict[str, int] = {}
    for i, (entry, spec) in enumerate(zip(d.datasets, source_settings(d), strict=True)):
        prefix = f"datasets[{i}]."
        if not entry.dataset.strip():
            problems.append(f"{prefix}dataset: empty (give a hub id, a local file, a glob or a folder)")
        if entry.weight is not None and entry.num_samples is not None:
            problems.append(f"{prefix}weight / num_samples: give one of them, not both")
        if entry.weight is not None and not (math.isfinite(entry.weight) and entry.weight > 0):
            problems.append(f"{prefix}weight: {entry.weight!r} is not allowed (must be a finite number > 0)")
        if entry.num_samples is not None and entry.num_samples <= 0:
            problems.append(f"{prefix}num_samples: {entry.num_samples!r} is not allowed (must be > 0)")
        if entry.name is not None:
            if entry.name in names:
                problems.append(
                    f"{prefix}name: {entry.name!r} is also the name of datasets[{names[entry.name]}]"
                )
            names.setdefault(entry.name, i)
        _check_templates(spec.data, problems, prefix)


def _positive(problems: list[str], obj: object, names: list[str], allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if (value < 0) if allow_zero else (value <= 0):
            bound = ">= 0" if allow_zero else "> 0"
            problems.append(f"{name}: {value!r} is not allowed (must be {bound})")


def collect_problems(cfg: PipelineConfig) -> list[str]:
    """Every problem of ``cfg`` as ``"field: what is wrong (allowed: ...)"`` lines.

    Types first (every field against its declared type; floats finite); the checks of meaning then run
    on the configuration with each mistyped field at its default, so one wrong value gives one line.
    """
    from ftpipe.config.types import meaning_problems, type_problems

    flat = cfg.to_flat()
    wrong = type_problems(flat)
    problems = [line for lines in wrong.values() for line in lines]
    problems += meaning_problems({k: v for k, v in flat.items() if k not in wrong})
    if wrong:
        cfg = PipelineConfig.from_flat({k: v for k, v in flat.items() if k not in wrong})
    return problems + _semantic_problems(cfg)


def _semantic_problems(cfg: PipelineConfig) -> list[str]:
    problems: list[str] = []
    m, lo, d, t, ds = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.dist

    if not m.hf_model_id.strip():
        problems.append("hf_model_id: empty (give a hub id, a local folder, or 'embedded')")
    if m.chat_template is not None:
        problem = chat_template_problem(m.chat_template)
        if problem:
            problems.append(f"chat_template: {problem}")

    _positive(problems, lo, ["lora_rank", "lora_alpha"])
    if not 0.0 <= lo.lora_dropout < 1.0:
        problems.append(f"lora_dropout: {lo.lora_dropout!r} is outside [0, 1)")
    if m.finetuning == "lora" and not lo.lora_target_modules:
        problems.append("lora_target_modules: empty (name at least one module, e.g. q_proj)")
    if "all-linear" in lo.lora_target_modules and len(lo.lora_target_modules) > 1:
        problems.append("lora_target_modules: all-linear already names every linear layer; give it alone")
    if lo.load_in_4bit and m.finetuning != "lora":
        problems.append("load_in_4bit: QLoRA trains adapters on a 4-bit base (needs finetuning: lora)")
    if lo.load_in_4bit and ds.strategy in ("fsdp1", "fsdp2"):
        problems.append(
            f"load_in_4bit: 4-bit base weights are not sharded by {ds.strategy} here; use strategy ddp or single"
        )

    ratios = {"train_ratio": d.train_ratio, "val_ratio": d.val_ratio, "test_ratio": d.test_ratio}
    for name, value in ratios.items():
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name}: {value!r} is outside [0, 1]")
    if not math.isclose(sum(ratios.values()), 1.0, abs_tol=1e-6):
        problems.append(
            f"train_ratio/val_ratio/test_ratio: {d.train_ratio} + {d.val_ratio} + {d.test_ratio} = "
            f"{sum(ratios.values()):.4g}, must sum to 1"
        )
    if d.train_ratio <= 0:
        problems.append("train_ratio: must be > 0 (there is nothing to train on)")
    _check_datasets(d, problems)
    _positive(problems, d, ["max_samples", "prepare_timeout_s", "max_seq_length", "pad_to_multiple_of"])
    if 0 < d.max_seq_length < MIN_SEQ_LENGTH:
        problems.append(
            f"max_seq_length: {d.max_seq_length} is too small (must be >= {MIN_SEQ_LENGTH}: room for a "
            "beginning-of-sequence token, a prompt token and an answer token; typical values are 512-4096)"
        )
    _positive(problems, d, ["num_workers"], allow_zero=True)
    if d.packing and d.group_by_length:
        problems.append(
            "group_by_length: only applies without packing (packed rows are already full); set one of "
            "packing / group_by_length to false"
        )

    _positive(
        problems,
        t,
        [
            "num_nodes",
            "gpus_per_node",
            "max_steps",
            "micro_batch_size",
            "accumulate_grad_batches",
            "learning_rate",
            "val_check_interval",
            "limit_val_batches",
            "log_every_n_steps",
            "gradient_clip_val",
            "peak_tflops_per_device",
            "max_nonfinite_steps",
        ],
    )
    _positive(
        problems,
        t,
        [
            "warmup_steps",
            "min_lr",
            "weight_decay",
            "early_stopping_patience",
            "early_stopping_min_delta",
            "loss_chunk_size",
        ],
        allow_zero=True,
    )
    if t.min_lr > t.learning_rate:
        problems.append(
            f"min_lr: {t.min_lr} is above learning_rate {t.learning_rate} (must be <= learning_rate)"
        )
    if t.warmup_steps >= t.max_steps > 0:
        problems.append(f"warmup_steps: {t.warmup_steps} must be below max_steps {t.max_steps}")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(t, name)
        if not 0.0 <= value < 1.0:
            problems.append(f"{name}: {value!r} is outside [0, 1)")

    if ds.strategy == "single" and t.num_nodes * t.gpus_per_node != 1:
        problems.append(
            f"strategy: 'single' runs one process but num_nodes x gpus_per_node = "
            f"{t.num_nodes * t.gpus_per_node} (allowed: set both to 1, or choose fsdp2/fsdp1/ddp)"
        )
    if ds.sharding_strategy == "HYBRID_SHARD" and ds.strategy != "fsdp1":
        problems.append("sharding_strategy: HYBRID_SHARD is an FSDP1 setting (allowed with strategy: fsdp1)")
    if m.precision == "16-mixed" and ds.strategy == "fsdp2":
        problems.append(
            "precision: '16-mixed' is not supported by FSDP2 (Lightning's ModelParallelStrategy); "
            "allowed: auto, 32-true, bf16-mixed, bf16-true, or strategy: fsdp1/ddp"
        )
    _positive(problems, ds, ["process_group_timeout_s", "gpu_memory_gib"])
    if not 0 < ds.plan_mfu <= 1:
        problems.append(f"plan_mfu: {ds.plan_mfu} is not in (0, 1] (a share of the GPU's peak, e.g. 0.4)")

    ev = cfg.eval
    _positive(
        problems,
        ev,
        [
            "max_new_tokens",
            "max_model_len",
            "tensor_parallel_size",
            "vllm_cpu_kvcache_gib",
            "bertscore_num_layers",
            "eval_batch_size",
            "max_eval_samples",
        ],
    )
    if ev.temperature < 0:
        problems.append(f"temperature: {ev.temperature!r} is not allowed (must be >= 0; 0 is greedy)")
    if not 0.0 < ev.top_p <= 1.0:
        problems.append(f"top_p: {ev.top_p!r} is outside (0, 1]")
    if not 0.0 < ev.gpu_memory_utilization <= 1.0:
        problems.append(f"gpu_memory_utilization: {ev.gpu_memory_utilization!r} is outside (0, 1]")
    _check_seeds(cfg, problems)
    _check_objective(cfg, problems)
    _check_sagemaker(cfg, problems)
    _check_debug(cfg, problems)
    return problems


def _check_seeds(cfg: PipelineConfig, problems: list[str]) -> None:
    """Seeds are what Lightning's ``seed_everything`` and NumPy accept: 0 to 2**32 - 1."""
    for name, value in (
        ("seed", cfg.train.seed),
        ("split_seed", cfg.data.split_seed),
        ("eval_seed", cfg.eval.eval_seed),
    ):
        if not 0 <= value <= MAX_SEED:
            problems.append(
                f"{name}: {value!r} is outside 0..{MAX_SEED} (a seed is a whole number 0 to 2**32 - 1)"
            )


def _check_objective(cfg: PipelineConfig, problems: list[str]) -> None:
    """The preference settings are in range and fit the fine-tuning mode."""
    ob = cfg.objective
    _positive(problems, ob, ["dpo_beta"])
    _positive(problems, ob, ["simpo_gamma", "rpo_alpha"], allow_zero=True)
    if not 0.0 <= ob.dpo_label_smoothing < 0.5:
        problems.append(f"dpo_label_smoothing: {ob.dpo_label_smoothing!r} is outside [0, 0.5)")
    if ob.objective == "sft":
        changed = [
            f.name
            for f in dataclasses.fields(ob)
            if f.name not in ("objective", "monitor") and getattr(ob, f.name) != f.default
        ]
        if changed:
            problems.append(
                f"{', '.join(changed)}: preference settings, but objective is 'sft' (set objective: dpo, "
                "or remove them)"
            )
        if ob.monitor == "val_reward_accuracy":
            problems.append(
                "monitor: 'val_reward_accuracy' needs a preference objective (objective: dpo); sft "
                "monitors val_loss"
            )
        return
    if ob.dpo_label_smoothing and ob.dpo_loss == "ipo":
        problems.append("dpo_label_smoothing: applies to dpo_loss 'sigmoid' and 'simpo', not 'ipo'")
    if ob.reference == "copy" and cfg.dist.strategy == "fsdp1":
        problems.append(
            "reference: 'copy' is not available with strategy fsdp1 (FSDP1 would wrap the copy into the "
            "trained module); use cached (or auto), or strategy fsdp2"
        )
    if ob.reference == "adapter" and cfg.model.finetuning != "lora":
        problems.append(
            "reference: 'adapter' disables the LoRA adapter, but finetuning is 'full' (allowed: copy, "
            "cached or auto)"
        )
    if ob.init_adapter and cfg.model.finetuning != "lora":
        problems.append("init_adapter: continues a LoRA adapter; it needs finetuning: lora")
    if ob.sft_config and cfg.model.finetuning != "lora":
        problems.append(
            "sft_config: the preference training continues the SFT run's LoRA adapter; it needs finetuning: lora"
        )
    if ob.sft_config and ob.init_adapter:
        problems.append(
            "sft_config / init_adapter: give one (sft_config trains the adapter that init_adapter would name)"
        )
    if (ob.init_adapter or ob.sft_config) and ob.reference == "adapter":
        problems.append(
            "reference: 'adapter' would make the base model without the SFT adapter of init_adapter the "
            "reference; use cached (or auto) so that the SFT model is the reference"
        )
    if cfg.data.packing:
        problems.append("packing: preference pairs are not packed (set packing: false)")
    if ob.share_prompt is True and cfg.model.attn_implementation == "flash_attention_2":
        problems.append(
            "share_prompt: true needs a custom attention mask, which flash_attention_2 does not take "
            "(set share_prompt: auto or false, or attn_implementation: sdpa)"
        )


def _check_debug(cfg: PipelineConfig, problems: list[str]) -> None:
    db = cfg.debug
    if [s for s in db.inject_nan_steps if s < 1]:
        problems.append(f"inject_nan_steps: {db.inject_nan_steps!r} holds a step below 1 (steps are 1-based)")
    _positive(problems, db, ["stop_at_step", "kill_at_checkpoint_step", "hang_at_step"])
    _positive(problems, db, ["hang_rank"], allow_zero=True)
    if (db.hang_rank is None) != (db.hang_at_step is None):
        problems.append(
            "hang_rank / hang_at_step: give both (which rank stops responding, and at which step)"
        )


def _check_sagemaker(cfg: PipelineConfig, problems: list[str]) -> None:
    from ftpipe.config.instances import (
        instance_problem,
        job_name_problem,
        region_problem,
        role_problem,
        s3_uri_problem,
    )

    sm = cfg.sagemaker
    problem = instance_problem(sm.instance_type)
    if problem:
        problems.append(f"instance_type: {problem}")
    _positive(problems, sm, ["instance_count", "volume_size_gb", "max_run_s", "max_wait_s"])
    for name in ("training_data_s3_uri", "output_s3_uri", "checkpoint_s3_uri"):
        value = getattr(sm, name)
        problem = s3_uri_problem(value) if value is not None else None
        if problem:
            problems.append(f"{name}: {problem}")
    for name, check in (
        ("role", role_problem),
        ("region", region_problem),
        ("base_job_name", job_name_problem),
    ):
        value = getattr(sm, name)
        problem = check(value) if value is not None else None
        if problem:
            problems.append(f"{name}: {problem}")
    if sm.max_wait_s is not None:
        if not sm.use_spot:
            problems.append("max_wait_s: only applies to spot training (set use_spot: true, or unset it)")
        elif sm.max_wait_s < sm.max_run_s:
            problems.append(f"max_wait_s: {sm.max_wait_s} is below max_run_s {sm.max_run_s} (must be >=)")


def validate_config(cfg: PipelineConfig) -> PipelineConfig:
    """Return ``cfg`` when valid, otherwise raise ConfigError listing every problem."""
    problems = collect_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg
