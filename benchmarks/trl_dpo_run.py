"""One TRL ``DPOTrainer`` + PEFT LoRA run for ``dpo_vs_trl.py``: the peer side of the DPO benchmark.

Reads a JSON spec (model folder, a JSONL file of preference rows in the order to train on, LoRA, batch,
schedule, activation checkpointing, threads), trains for ``steps`` optimizer steps in fp32 on the CPU
without evaluation or saving, with the reference being the policy with its adapter disabled (TRL's
default with a PEFT model), and writes ``rank<R>.json`` into the spec's ``out_dir`` with one record per
optimizer step (real, padded and completion tokens, seconds) and TRL's own logged values (loss, rewards,
log-probabilities), and this process's peak memory.

The rows are read in file order and batched without shuffling (``train_sampling_strategy="sequential"``):
the benchmark writes them in the order ftpipe's sampler visits its pairs. Under ``torch.distributed.run``
Accelerate gives rank ``r`` the ``r``-th, ``(r + world)``-th, ... micro-batch of that sequence.

Each step also records this process's CPU time (``time.process_time``, all threads) at its end: the
benchmark takes the CPU seconds between the ends of the first and the last step, which a busy machine does
not inflate the way it inflates the step times.

Real tokens are counted by wrapping TRL's data collator (``DataCollatorForPreference``): the attention-mask
sum of each padded batch of ``2 x pairs`` rows (chosen and rejected sides), and the completion-mask sum
(the tokens the log-probabilities are summed over). A micro-batch is counted when the Trainer consumes it
(``on_substep_end`` / ``on_step_end``). The step time runs from ``on_step_begin`` to ``on_step_end``
(forward of the policy and of the reference, backward, clipping, the optimizer and scheduler step; data
loading, which the Trainer does before ``on_step_begin``, and logging are outside).

    python benchmarks/trl_dpo_run.py SPEC.json                                  # one process
    python -m torch.distributed.run --nproc_per_node 2 benchmarks/trl_dpo_run.py SPEC.json   # DDP (gloo)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from types import ModuleType
from typing import Any

GIB = 1024**3
#: TRL's per-step values kept in the record (``log_history`` keys).
LOGGED = (
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def _sibling(name: str) -> ModuleType:
    """A script of this folder (``trl_sft_run``, ``vs_trl``) as a module, loaded by path once."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[key]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The preference rows of a JSONL file, in file order (text or conversational ``prompt``/``chosen``/``rejected``)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
    return rows


def batch_counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    """``(real tokens, padded positions, completion tokens)`` of a collated preference batch (both sides)."""
    return (
        int(batch["attention_mask"].sum()),
        int(batch["input_ids"].numel()),
        int(batch["completion_mask"].sum()),
    )


class PairCountingCollator:
    """Wraps a preference collator; remembers :func:`batch_counts` of every batch it builds, in order."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.pending: deque[tuple[int, int, int]] = deque()

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.pending.append(batch_counts(batch))
        return batch


def make_step_timer(collator: PairCountingCollator):
    """A TrainerCallback recording per optimizer step: seconds, real / padded / completion tokens, micro-batches."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self._t0: float | None = None
            self._counts = [0, 0, 0]
            self._micro = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()
            self._counts = [0, 0, 0]
            self._micro = 0

        def _consume(self) -> None:
            for i, n in enumerate(collator.pending.popleft()):
                self._counts[i] += n
            self._micro += 1

        def on_substep_end(self, args, state, control, **kwargs):
            self._consume()

        def on_step_end(self, args, state, control, **kwargs):
            self._consume()
            elapsed = time.perf_counter() - self._t0 if self._t0 is not None else float("nan")
            tokens, padded, label_tokens = self._counts
            self.steps.append(
                {
                    "step": state.global_step,
                    "step_time_s": elapsed,
                    "tokens": tokens,
                    "padded_tokens": padded,
                    "label_tokens": label_tokens,
                    "micro_batches": self._micro,
                    # this process's CPU time (all threads) at the end of the step, as ftpipe's side is sampled
                    "cpu_end_s": time.process_time(),
                }
            )

    return StepTimer()


def dpo_config(spec: dict[str, Any], world: int):
    """The DPOConfig of ``spec``: fp32 on the CPU, the spec's AdamW settings and cosine-to-``min_lr`` schedule,
    sequential batches, no evaluation, no saving, a log record every step. ``gradient_checkpointing`` and
    ``optim`` None (or absent) keep DPOConfig's own defaults."""
    from trl import DPOConfig

    own = {k: spec[k] for k in ("gradient_checkpointing", "optim") if spec.get(k) is not None}
    return DPOConfig(
        output_dir=str(Path(spec["out_dir"]) / "trainer"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["accumulation"],
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": spec["min_lr"]},
        warmup_steps=spec["warmup_steps"],
        adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"],
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"],
        seed=spec["seed"],
        bf16=False,  # DPOConfig's default is bf16 unless fp16: emulated (very slow) on these CPUs
        fp16=False,
        use_cpu=True,
        **own,
        max_length=spec["max_length"],
        beta=spec["beta"],
        loss_type=[spec["loss_type"]],
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None,
        ddp_find_unused_parameters=False if world > 1 else None,
    )


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train as ``spec`` says; returns (and writes to ``out_dir/rank<R>.json``) this rank's record."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    sft = _sibling("trl_sft_run")
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
    dataset = Dataset.from_list(read_rows(Path(spec["rows_file"])))
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(spec, world),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    collator = PairCountingCollator(trainer.data_collator)
    trainer.data_collator = collator  # the train loader is built in train(), from this attribute
    timer = make_step_timer(collator)
    trainer.add_callback(timer)
    total, trainable = sft.count_params(trainer.model)
    first = trainer.train_dataset[0]
    setup_s = time.perf_counter() - started
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    memory = sft.peak_rss_bytes()
    record = {
        "rank": rank,
        "world_size": world,
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "steps": timer.steps,
        "logged": [{k: h.get(k) for k in LOGGED} for h in logged],
        "trl_num_tokens": int(trainer._total_train_tokens),  # TRL's own count (attention masks), all ranks
        "total_params": total,
        "trainable_params": trainable,
        "train_rows": len(trainer.train_dataset),
        "first_row_ids": {k: list(first[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")},
        "reference": "adapter disabled" if trainer.ref_model is None else "separate model",
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "padding_free": bool(trainer.padding_free),
        "setup_s": setup_s,
        "peak_vmhwm_gib": memory["vmhwm"] / GIB,
        "peak_ru_maxrss_gib": memory["ru_maxrss"] / GIB,
    }
    out = Path(spec["out_dir"]) / f"rank{rank}.json"
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: trl_dpo_run.py SPEC.json")
    run(json.loads(Path(args[0]).read_text(encoding="utf-8")))


if __name__ == "__main__":
    main()
