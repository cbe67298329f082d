"""One TRL ``SFTTrainer`` + PEFT LoRA run for ``vs_trl.py``: the peer side of the benchmark.

Reads a JSON spec (model folder, prepared ``training.jsonl``, LoRA, batch, schedule, packing, threads),
turns ftpipe's prepared rows into conversational prompt-completion rows (so TRL applies the same chat
template and trains on the completions only), trains for ``steps`` optimizer steps in fp32 on the CPU
without evaluation or saving, and writes ``rank<R>.json`` into the spec's ``out_dir`` with one record per
optimizer step (real and padded tokens, seconds, loss) and this process's peak memory.

Real tokens are counted by wrapping TRL's own data collator: the attention-mask sum of a padded batch, or
the length of the flattened row when TRL trains padding-free (its packing). A micro-batch is counted when
the Trainer consumes it (``on_substep_end`` / ``on_step_end``), so the Trainer's prefetching does not
shift counts between steps. The step time runs from ``on_step_begin`` to ``on_step_end`` (forward and
backward of every micro-batch, clipping, the optimizer and scheduler step; data loading, which the
Trainer does before ``on_step_begin``, and logging are outside).

    python benchmarks/trl_sft_run.py SPEC.json                                  # one process
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/trl_sft_run.py SPEC.json   # DDP (gloo)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

GIB = 1024**3


def prompt_completion_rows(training_jsonl: Path) -> list[dict[str, Any]]:
    """ftpipe's prepared alpaca rows (``input`` = the formatted prompt, ``output`` = the answer) as TRL
    conversational prompt-completion rows; chat rows (``messages``) are split before the last assistant turn."""
    rows = []
    for line in Path(training_jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("messages") is not None:
            messages = row["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            rows.append({"prompt": messages[:last], "completion": [messages[last]]})
        else:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": row["input"]}],
                    "completion": [{"role": "assistant", "content": row["output"]}],
                }
            )
    return rows


def peak_rss_bytes() -> dict[str, int]:
    """This process's peak resident set: ``VmHWM`` (this process image only) and ``ru_maxrss`` (which on
    Linux also keeps the parent's resident set at the time it started this process)."""
    hwm = 0
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return {"vmhwm": hwm, "ru_maxrss": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


class CountingCollator:
    """Wraps a collator; remembers ``(real tokens, padded positions)`` of every batch it builds, in order."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.pending: deque[tuple[int, int]] = deque()

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.pending.append(batch_token_counts(batch))
        return batch


def batch_token_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """``(real tokens, padded positions)`` of a collated batch: the attention-mask sum, or for a padding-free
    batch (no mask, one flattened row) every position up to the end of its last sequence."""
    padded = int(batch["input_ids"].numel())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), padded
    cu = batch.get("cu_seq_lens_q")
    if cu is not None:  # padding to a multiple appends sequences of padding at the end; none on the CPU
        return int(cu[-1]), padded
    return padded, padded


def make_step_timer(collator: CountingCollator):
    """A TrainerCallback recording per optimizer step: seconds, real tokens, padded positions, micro-batches."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self._t0: float | None = None
            self._tokens = self._padded = self._micro = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()
            self._tokens = self._padded = self._micro = 0

        def _consume(self) -> None:
            tokens, padded = collator.pending.popleft()
            self._tokens += tokens
            self._padded += padded
            self._micro += 1

        def on_substep_end(self, args, state, control, **kwargs):
            self._consume()

        def on_step_end(self, args, state, control, **kwargs):
            self._consume()
            elapsed = time.perf_counter() - self._t0 if self._t0 is not None else float("nan")
            self.steps.append(
                {
                    "step": state.global_step,
                    "step_time_s": elapsed,
                    "tokens": self._tokens,
                    "padded_tokens": self._padded,
                    "micro_batches": self._micro,
                }
            )

    return StepTimer()


def count_params(model: Any) -> tuple[int, int]:
    """(total, trainable) parameters, each shared (tied) parameter once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def sft_config(spec: dict[str, Any], world: int):
    """The SFTConfig of ``spec``: fp32 on the CPU (``device: cuda`` and ``bf16: true`` for a GPU), AdamW,
    cosine to ``min_lr`` after a linear warm-up, no evaluation, no saving, a loss record every step."""
    from trl import SFTConfig

    # gradient_checkpointing None (or absent): SFTConfig's own default
    checkpointing = spec.get("gradient_checkpointing")
    own_default = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}
    return SFTConfig(
        output_dir=str(Path(spec["out_dir"]) / "trainer"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": spec["min_lr"]},
        warmup_steps=spec["warmup_steps"],
        optim="adamw_torch",
        adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"],
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"],
        seed=spec["seed"],
        bf16=bool(spec.get("bf16", False)),
        fp16=False,
        use_cpu=spec.get("device", "cpu") == "cpu",
        **own_default,
        max_length=spec["max_length"],
        packing=spec["packing"],
        train_sampling_strategy="group_by_length" if spec.get("group_by_length") else "random",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        ddp_backend=("gloo" if spec.get("device", "cpu") == "cpu" else "nccl") if world > 1 else None,
        ddp_find_unused_parameters=False if world > 1 else None,
    )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as ``spec`` says; returns (and writes to ``out_dir/rank<R>.json``) this rank's record."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="sdpa"
    )
    lora = spec["lora"]
    peft_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        bias="none",
    )
    dataset = Dataset.from_list(prompt_completion_rows(Path(spec["train_file"])))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(spec, world),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    collator = CountingCollator(trainer.data_collator)
    trainer.data_collator = collator  # the train loader is built in train(), from this attribute
    timer = make_step_timer(collator)
    trainer.add_callback(timer)
    total, trainable = count_params(trainer.model)
    setup_s = time.perf_counter() - started
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    memory = peak_rss_bytes()
    record = {
        "rank": rank,
        "world_size": world,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "steps": timer.steps,
        "losses": losses,
        "trl_num_tokens": int(trainer._total_train_tokens),  # TRL's own count, over all ranks
        "total_params": total,
        "trainable_params": trainable,
        "train_rows": len(trainer.train_dataset),
        "padding_free": bool(getattr(trainer, "padding_free", False)),
        "completion_only_loss": bool(getattr(trainer, "completion_only_loss", False)),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "setup_s": setup_s,
        "peak_vmhwm_gib": memory["vmhwm"] / GIB,
        "peak_ru_maxrss_gib": memory["ru_maxrss"] / GIB,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None,
    }
    out = Path(spec["out_dir"]) / f"rank{rank}.json"
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: trl_sft_run.py SPEC.json")
    run(json.loads(Path(args[0]).read_text(encoding="utf-8")))


if __name__ == "__main__":
    main()
