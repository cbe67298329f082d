"""ftpipe's DPO against TRL's DPOTrainer with PEFT LoRA, on the same machine in one invocation.

Both sides train the same base model (the embedded SmolLM2-135M-Instruct, fp32, sdpa, CPU) with the same
LoRA (r, alpha, dropout 0, the same target modules, the same initial adapter), preference pairs
(``examples/preference/pairs.jsonl``, prepared once by ``ftpipe prepare`` with ``objective: dpo``; the
prompt goes through the model's chat template), maximum length, pairs per micro-batch and per optimizer
step, step count, DPO loss (sigmoid, ``beta``, log-probabilities summed over the answer tokens), reference
(the policy with its adapter disabled: ftpipe's ``reference: auto`` with LoRA, TRL's default with a PEFT
model) and optimizer (AdamW: lr, betas, eps, weight decay; no warm-up, cosine to ``min_lr``; clipping),
without evaluation.

**Same pairs, same order.** ftpipe shuffles its training split with its seeded sampler; the benchmark
computes that order with the same sampler classes (``StatefulDataLoader`` with a seeded generator on one
process, ``DistributedSampler(shuffle=True, seed)`` per rank on several) and writes TRL's rows in that
order, which TRL reads without shuffling (``train_sampling_strategy="sequential"``; Accelerate hands rank
``r`` the micro-batches ``r, r + world, ...``). Every optimizer step of both sides then holds the same
pairs. Checked per step: with identical token ids (``matched``) the real and answer tokens of every step
are equal on both sides; at the defaults TRL has exactly one token more per sequence (the template's
newline after ``<|im_end|>``).

**Two settings** (``--variants``), each run by both sides:

* ``defaults``: each side as it comes, apart from what both must share (above) and fp32 (DPOConfig's
  ``bf16`` default is emulated, very slowly, on these CPUs). ftpipe: activation checkpointing ``auto``
  (its memory estimate), its fused AdamW, its malloc settings. TRL: ``gradient_checkpointing=True``,
  conversational rows rendered by its own chat-template path, glibc's default malloc, DPOConfig's
  optimizer implementation (``adamw_torch_fused``).
* ``matched``: the same on both sides wherever they differ: activation checkpointing
  ``--matched-checkpointing`` (default off, what ftpipe's ``auto`` picks here), the same glibc malloc
  tunables (the ones the ``ftpipe`` command sets for itself), and TRL fed ftpipe's rendered text (prompt
  through the chat template, answer ending in EOS) so both train on identical token ids.

Per run, over the optimizer steps after the first (warm-up): real tokens/s (non-padding tokens of the chosen
and the rejected sequences, however many positions a side computes for them), seconds per step and the
padding share; over the whole run: the peak resident
memory of every training process (``VmHWM``, polled from /proc for both sides alike; each side's own figure
is in the JSON), the wall time of the process (start-up, data, model, training, saving), the training time
(the sum of the step times), the loss and the log-probabilities of every step, and the 1-minute load average
before and after. The losses of the two sides agree at step 1 exactly (``ln 2``: the policy is its reference
there) and at every later step within ``--loss-tolerance`` (1e-4). A busy machine stretches the step times of
whichever run it hits, so the report also gives the CPU seconds of the training processes per step (one thread
per process: time spent waiting for a core is not in it) and real tokens per CPU-second, and an estimate of the
matmul work of a step on each side (``matmul_gflops``). ``--report-only`` recomputes these from the JSON and
writes the Markdown again.

    python benchmarks/dpo_vs_trl.py                                  # 4 runs of 12 steps, 8 pairs per step
    python benchmarks/dpo_vs_trl.py --steps 4 --variants matched     # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
TRL_RUNNER = HERE / "trl_dpo_run.py"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "dpo_vs_trl.json"
DEFAULT_PAIRS = REPO / "examples" / "preference" / "pairs.jsonl"
LN2 = math.log(2.0)
#: ``|loss - ln 2|`` allowed at step 1 on every run (fp32 rounding of a zero margin).
STEP1_TOLERANCE = 1e-6
#: Default ``|ftpipe loss - TRL loss|`` allowed at every step (fp32: the two sides differ in kernels and
#: reduction order, which moves the loss by about 1e-6 over 12 steps; a step of training moves it by about 1e-2).
LOSS_TOLERANCE = 1e-4
#: ftpipe's real tokens/s at each side's defaults at least this many times TRL's.
TARGET_RATIO = 2.0
#: Per-step values compared between the sides (ftpipe's metrics.jsonl and TRL's log have the same names).
COMPARED = ("loss", "logps/chosen", "logps/rejected", "rewards/margins")


def _sibling(name: str) -> ModuleType:
    """A script of this folder (``vs_trl``, ``trl_dpo_run``) as a module, loaded by path once."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[key]


@dataclass(frozen=True)
class Variant:
    """One run: ``side`` ftpipe or trl, ``setting`` defaults or matched."""

    name: str
    side: str
    setting: str
    description: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("ftpipe-defaults", "ftpipe", "defaults", "ftpipe train, objective dpo, its defaults"),
        Variant("trl-defaults", "trl", "defaults", "TRL DPOTrainer + PEFT, DPOConfig defaults (fp32)"),
        Variant("ftpipe-matched", "ftpipe", "matched", "ftpipe, checkpointing as matched"),
        Variant(
            "trl-matched",
            "trl",
            "matched",
            "TRL, checkpointing and malloc as ftpipe, ftpipe's token ids",
        ),
    )
}
SETTINGS = ("defaults", "matched")


@dataclass(frozen=True)
class Settings:
    """What both sides share, and how each side uses the cores."""

    model: str  # folder given to TRL (and to ftpipe unless hf_model_id is "embedded")
    hf_model_id: str
    config: Path
    pairs: Path
    steps: int
    max_length: int
    micro_batch_size: int
    global_batch: int
    ftpipe_strategy: str
    ftpipe_processes: int
    trl_processes: int
    matched_checkpointing: str  # "off" or "on"
    cpu_count: int
    beta: float
    lora: dict[str, Any]
    optim: dict[str, Any]
    timeout_s: int

    def accumulation(self, processes: int) -> int:
        return self.global_batch // (self.micro_batch_size * processes)

    def ftpipe_overrides(self) -> dict[str, Any]:
        """Flat ftpipe configuration fields on top of ``config`` (prepare and train alike)."""
        return {
            "hf_model_id": self.hf_model_id,
            "objective": "dpo",
            "dpo_loss": "sigmoid",
            "dpo_beta": self.beta,
            "dataset": str(self.pairs),
            "dataset_subset": None,
            "max_samples": None,
            "use_chat_template": True,
            "max_seq_length": self.max_length,
            "lora_rank": self.lora["r"],
            "lora_alpha": self.lora["alpha"],
            "lora_dropout": self.lora["dropout"],
            "precision": "32-true",
            "num_workers": 0,
            "learning_rate": self.optim["learning_rate"],
            "min_lr": self.optim["min_lr"],
            "warmup_steps": self.optim["warmup_steps"],
            "adam_beta1": self.optim["adam_beta1"],
            "adam_beta2": self.optim["adam_beta2"],
            "weight_decay": self.optim["weight_decay"],
            "gradient_clip_val": self.optim["max_grad_norm"],
            "seed": self.optim["seed"],
        }


def _flag_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def as_flags(values: dict[str, Any]) -> list[str]:
    """``{"a": 1, "b": None}`` -> ``["--a", "1", "--b", "null"]`` (ftpipe's flat command-line form)."""
    flags: list[str] = []
    for key, value in values.items():
        flags += [f"--{key}", _flag_value(value)]
    return flags


# ------------------------------------------------------------------------------------------ data order


def ftpipe_batches(n: int, world: int, micro: int, seed: int) -> list[list[list[int]]]:
    """Per rank, the micro-batches (dataset indices) of ftpipe's first epoch, drawn by the sampler classes
    its data module uses (``ftpipe.data.datamodule``: one process, a seeded shuffling StatefulDataLoader;
    several, ``DistributedSampler(shuffle=True, seed)``; incomplete batches dropped)."""
    import torch
    from torch.utils.data import DistributedSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    indices = list(range(n))
    if world == 1:
        generator = torch.Generator().manual_seed(seed)
        loader = StatefulDataLoader(
            indices, batch_size=micro, shuffle=True, generator=generator, drop_last=True, collate_fn=list
        )
        return [[list(batch) for batch in loader]]
    per_rank = []
    for rank in range(world):
        sampler = DistributedSampler(indices, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(0)
        loader = StatefulDataLoader(
            indices, batch_size=micro, sampler=sampler, drop_last=True, collate_fn=list
        )
        per_rank.append([list(batch) for batch in loader])
    return per_rank


def step_pairs(batches: list[list[list[int]]], accumulation: int, steps: int) -> list[list[int]]:
    """The pairs of each of the first ``steps`` optimizer steps: micro-batch by micro-batch of the step, each
    over the ranks in order (the order in which TRL's sequential batches reach its ranks when both sides
    share the layout)."""
    world = len(batches)
    available = min(len(b) for b in batches) // accumulation
    if steps > available:
        raise SystemExit(
            f"--steps {steps}: the training split gives {available} optimizer steps per epoch at this batch"
        )
    return [
        [i for a in range(accumulation) for r in range(world) for i in batches[r][k * accumulation + a]]
        for k in range(steps)
    ]


def trl_order(steps: list[list[int]], n: int) -> list[int]:
    """TRL's row order: the pairs of every benchmarked step in ftpipe's order, then the rest of the split (so
    TRL prepares as many pairs as ftpipe)."""
    first = [i for step in steps for i in step]
    seen = set(first)
    return first + [i for i in range(n) if i not in seen]


# ------------------------------------------------------------------------------------------ pairs


@dataclass(frozen=True)
class EncodedPairs:
    """ftpipe's encoding of the prepared training split: the kept rows (dataset order), their token ids and the
    text and conversational rows given to TRL."""

    rows: list[dict[str, Any]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    prompt_lengths: list[int]
    text_rows: list[dict[str, str]]
    conversational_rows: list[dict[str, Any]]
    dropped: int
    longest: int


def encode_split(cfg: Any, tokenizer: Any, rows: Sequence[dict[str, Any]]) -> EncodedPairs:
    """Encode ``rows`` as ftpipe's PairDataset does (``encode_pair``) and derive TRL's rows: the text rows are
    ftpipe's rendered prompt and answers (the answer ending in EOS) decoded from its ids, so TRL's text path
    tokenizes them back to the same ids; the conversational rows are the raw prompt as a user turn and the
    answers as assistant turns."""
    from ftpipe.data.pairs import encode_pair

    kept, chosen, rejected, lengths, text, conv = [], [], [], [], [], []
    dropped = longest = 0

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    for row in rows:
        pair = encode_pair(tokenizer, row, cfg.data)
        if pair.drop is not None:
            dropped += 1
            continue
        n = pair.prompt_length
        kept.append(row)
        chosen.append(pair.chosen_input_ids)
        rejected.append(pair.rejected_input_ids)
        lengths.append(n)
        longest = max(longest, pair.full_length)
        text.append(
            {
                "prompt": decode(pair.chosen_input_ids[:n]),
                "chosen": decode(pair.chosen_input_ids[n:]),
                "rejected": decode(pair.rejected_input_ids[n:]),
            }
        )
        conv.append(
            {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
        )
    return EncodedPairs(kept, chosen, rejected, lengths, text, conv, dropped, longest)


def trl_token_check(tokenizer: Any, encoded: EncodedPairs, indices: Sequence[int]) -> dict[str, int]:
    """Tokenize the TRL rows of ``indices`` as ``DPOTrainer._prepare_dataset`` does (TRL's ``_tokenize``, the
    prompt up to the common prefix) and count the pairs whose ids equal ftpipe's (text rows) and equal ftpipe's
    plus one trailing token (conversational rows: the template's newline after the end-of-turn token)."""
    from trl.data_utils import _tokenize
    from trl.trainer.dpo_trainer import common_prefix_length

    def tokenized(row: dict[str, Any]) -> tuple[list[int], list[int], int]:
        """(prompt + chosen ids, prompt + rejected ids, where the answers start) as TRL prepares the row."""
        conversational = isinstance(row["prompt"], list)
        extra = {"add_generation_prompt": True} if conversational else {}
        prompt = _tokenize(tokenizer, row["prompt"], **extra)["input_ids"]
        sides = []
        for side in ("chosen", "rejected"):
            answer = row[side]
            if not conversational and not answer.endswith(tokenizer.eos_token):
                answer += tokenizer.eos_token  # TRL's add_eos for text rows
            sides.append(_tokenize(tokenizer, row["prompt"] + answer)["input_ids"])
        return sides[0], sides[1], min(common_prefix_length(prompt, s) for s in sides)

    same_text = newline_more = 0
    for i in indices:
        ours = (encoded.chosen_ids[i], encoded.rejected_ids[i], encoded.prompt_lengths[i])
        chosen, rejected, start = tokenized(encoded.text_rows[i])
        same_text += (chosen, rejected, start) == ours
        chosen, rejected, start = tokenized(encoded.conversational_rows[i])
        newline_more += (chosen[:-1], rejected[:-1], start) == ours
    return {"pairs": len(indices), "text_rows_identical": same_text, "conversational_one_more": newline_more}


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ processes


def _not_timeout(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name != "timeout"


def is_ftpipe_trainer(argv: list[str]) -> bool:
    """An ``ftpipe train`` process or rank (not the ``timeout`` wrapper around it)."""
    return _not_timeout(argv) and _sibling("vs_trl").is_ftpipe_trainer(argv)


def is_trl_trainer(argv: list[str]) -> bool:
    """A process running ``trl_dpo_run.py`` (not the launcher, not the ``timeout`` wrapper)."""
    return (
        _not_timeout(argv)
        and any(a.endswith(TRL_RUNNER.name) for a in argv)
        and "torch.distributed.run" not in argv
    )


class RunPoller(_sibling("vs_trl").PeakMemory):
    """``PeakMemory`` that also samples the CPU time (user + system, all threads) of the training processes each
    time ``progress()`` (the optimizer steps logged so far) grows: ``cpu_samples`` holds ``(steps, CPU s)``."""

    def __init__(
        self, root_pid: int, is_trainer: Callable[[list[str]], bool], progress: Callable[[], int] | None
    ):
        super().__init__(root_pid)
        self.is_trainer = is_trainer
        self.progress = progress
        self.cpu_samples: list[tuple[int, float]] = []

    def _poll(self) -> None:
        super()._poll()
        if self.progress is None:
            return
        done = self.progress()
        if done <= (self.cpu_samples[-1][0] if self.cpu_samples else 0):
            return
        import psutil

        cpu = 0.0
        for pid, argv in self.cmdlines.items():
            if self.is_trainer(argv):
                try:
                    times = psutil.Process(pid).cpu_times()
                    cpu += times.user + times.system
                except psutil.Error:
                    pass
        self.cpu_samples.append((done, cpu))


def run_child(
    cmd: list[str],
    log_path: Path,
    is_trainer: Callable[[list[str]], bool],
    timeout_s: int,
    env: dict[str, str] | None = None,
    progress: Callable[[], int] | None = None,
) -> tuple[int, float, list[tuple[int, float]], list[tuple[int, float]]]:
    """``cmd`` under ``timeout`` (TERM at ``timeout_s``, KILL 30 s later) with its memory polled; (exit code, wall
    seconds, peak GiB of each training process, ``(steps, CPU s)`` samples when ``progress`` is given).
    Processes of a failed run still alive afterwards (a rank whose parent was killed) are ended by their ids."""
    full_env = {**os.environ, **_sibling("vs_trl").CHILD_ENV, **(env or {})}
    start = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            ["timeout", "-k", "30", str(timeout_s), *cmd],
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        poller = RunPoller(proc.pid, is_trainer, progress)
        poller.start()
        code = proc.wait()
        poller.stop()
    wall = time.monotonic() - start
    if code != 0:
        _end_leftovers(poller.cmdlines)
    return code, wall, poller.training_processes(is_trainer), poller.cpu_samples


def logged_steps(results: Path) -> Callable[[], int]:
    """The number of training steps in the ``metrics.jsonl`` under ``results`` so far (0 before it exists)."""
    found: list[Path] = []

    def count() -> int:
        if not found:
            found.extend(results.rglob("metrics.jsonl"))
            if not found:
                return 0
        try:
            text = found[0].read_text()
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if line.endswith("}") and '"val_loss"' not in line)

    return count


def cpu_between(samples: Sequence[tuple[int, float]], first: int, last: int) -> float | None:
    """CPU seconds from the end of step ``first`` to the end of step ``last``, from ``(steps, CPU s)`` samples
    taken when the step count grew (None unless both ends were sampled)."""
    at = dict(samples)
    return at[last] - at[first] if first in at and last in at else None


def _end_leftovers(cmdlines: dict[int, list[str]]) -> None:
    """SIGKILL the processes of a failed run that are still alive: by pid, and only a pid whose command line is
    still the one recorded for it (never a reused pid)."""
    import psutil

    for pid, argv in cmdlines.items():
        try:
            if argv and psutil.Process(pid).cmdline() == argv:
                os.kill(pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def _loadavg() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------------ runs


def ftpipe_command(settings: Settings, variant: Variant, results: Path, prepared: Path) -> list[str]:
    """``ftpipe train`` of the DPO run with the shared settings; the variant decides activation checkpointing."""
    s, n = settings, settings.ftpipe_processes
    checkpointing = (
        "auto" if variant.setting == "defaults" else {"off": "false", "on": "true"}[s.matched_checkpointing]
    )
    return [
        sys.executable,
        "-m",
        "ftpipe",
        "train",
        "--config",
        str(s.config),
        *as_flags(s.ftpipe_overrides()),
        "--prepared_dir",
        str(prepared),
        "--results_dir",
        str(results),
        "--strategy",
        s.ftpipe_strategy,
        "--num_nodes",
        "1",
        "--gpus_per_node",
        str(n),
        "--micro_batch_size",
        str(s.micro_batch_size),
        "--accumulate_grad_batches",
        str(s.accumulation(n)),
        "--max_steps",
        str(s.steps),
        "--val_check_interval",
        str(s.steps + 1),  # no validation
        "--early_stopping_patience",
        "0",
        "--activation_checkpointing",
        checkpointing,
    ]


#: Per-step keys kept from ftpipe's metrics.jsonl.
FTPIPE_KEYS = (
    "step",
    "step_time_s",
    "tokens",
    "padded_tokens",
    "label_tokens",
    "loss",
    "grad_norm",
    "lr",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def rates(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Real tokens/s, seconds per step and padding share over the steps after the first (all when only one).

    Real tokens: both sequences of every pair (``tokens``); the padding share is of the positions computed
    (``positions``: ftpipe computes a shared prompt once; TRL computes every token of both rows)."""
    measured = list(steps[1:] if len(steps) > 1 else steps)
    time_s = sum(s["step_time_s"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    positions = sum(s.get("positions", s["tokens"]) for s in measured)
    padded = sum(s["padded_tokens"] for s in measured)
    return {
        "measured_steps": len(measured),
        "tokens_per_s": tokens / time_s if time_s > 0 else None,
        "s_per_step": time_s / len(measured) if measured else None,
        "padding_share": (padded - positions) / padded if padded else None,
        "positions_per_pair_token": positions / tokens if tokens else None,
        "train_time_s": sum(s["step_time_s"] for s in steps),
        "real_tokens": tokens,
    }


def head_params(model_dir: str | Path) -> int:
    """Parameters of the LM head (vocabulary x hidden size; tied to the embedding in SmolLM2)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    return int(config["vocab_size"]) * int(config["hidden_size"])


def matmul_gflops(
    padded: int, scored: int, *, blocks: int, lora: int, head: int, checkpointing: bool
) -> float:
    """Matmul work of one DPO step in GFLOP (attention left out): ``padded`` positions through the frozen decoder
    blocks in the policy forward, the backward to the inputs and the reference forward (2 per parameter each),
    through the LoRA adapters in the policy forward and backward (2 + 4: inputs and weights; the reference runs
    without them), both once more with activation checkpointing (the recomputed forward); the LM head over
    ``scored`` positions in the policy forward and backward and the reference forward (2 each)."""
    passes = 3 + int(checkpointing)
    return (2 * (blocks + lora) * passes * padded + 6 * head * scored) / 1e9


def work(record: dict[str, Any], side: str, head: int, rows_per_step: int) -> dict[str, Any]:
    """Estimated matmul work of a run's rated steps (:func:`matmul_gflops`): per step, and per CPU-second. The LM
    head scores the labelled positions in ftpipe (its chunked head) and every position of every row but the last
    in TRL (its fused head on the CPU)."""
    lora = record["trainable_params"]
    blocks = record["total_params"] - lora - head
    measured = record["steps"][1:] or record["steps"]
    total = sum(
        matmul_gflops(
            s["padded_tokens"],
            s["label_tokens"] if side == "ftpipe" else s["padded_tokens"] - rows_per_step,
            blocks=blocks,
            lora=lora,
            head=head,
            checkpointing=bool(record["gradient_checkpointing"]),
        )
        for s in measured
    )
    cpu = record.get("cpu_s_after_first")
    return {
        "gflop_per_step": total / len(measured),
        "gflop_per_cpu_s": total / cpu if cpu else None,
    }


def run_record(
    processes: int,
    threads: int,
    steps: list[dict[str, Any]],
    peaks: Sequence[tuple[int, float]],
    wall: float,
    cpu_s: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """The record of one run, either side. ``cpu_s``: CPU seconds (user + system) of all training processes
    from the end of step 1 to the end of the last step, the work behind the rated steps whatever else ran on the
    machine (with one thread per process, time spent waiting for a core is not in it)."""
    record = {
        "processes": processes,
        "threads_per_process": threads,
        "steps": steps,
        "losses": [s["loss"] for s in steps],
        "peak_rss_gib": [gib for _, gib in peaks],
        "wall_s": wall,
        **extra,
        **rates(steps),
    }
    measured = len(steps) - 1
    record["cpu_s_after_first"] = cpu_s
    record["cpu_s_per_step"] = cpu_s / measured if cpu_s and measured > 0 else None
    record["tokens_per_cpu_s"] = record["real_tokens"] / cpu_s if cpu_s and measured > 0 else None
    return record


def run_ftpipe(
    settings: Settings, variant: Variant, workdir: Path, prepared: Path, sequence_tokens: Sequence[int]
) -> dict[str, Any]:
    """One ``ftpipe train`` run: its ``metrics.jsonl`` and ``train_summary.json`` as a run record.

    ``sequence_tokens``: per step, the tokens of both sequences of its pairs (from ftpipe's encoding): the
    step's real tokens, as TRL counts them. ftpipe's own ``tokens`` are the positions it computed (fewer
    where a pair's prompt is computed once), kept as ``positions``."""
    results = workdir / "results"
    log = workdir / "train.log"
    code, wall, peaks, cpu = run_child(
        ftpipe_command(settings, variant, results, prepared),
        log,
        is_ftpipe_trainer,
        settings.timeout_s,
        progress=logged_steps(results),
    )
    metrics = next(results.rglob("metrics.jsonl"), None)
    if code != 0 or metrics is None:
        return {"error": f"ftpipe train exited with {code}", "wall_s": wall, "log_tail": _tail(log)}
    summary = json.loads(metrics.with_name("train_summary.json").read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [{k: r.get(k) for k in FTPIPE_KEYS} for r in records if "val_loss" not in r and "loss" in r]
    for step in steps:
        step["positions"], step["tokens"] = step["tokens"], sequence_tokens[step["step"] - 1]
    text = log.read_text(errors="replace")
    chosen = re.search(r"activation checkpointing (on|off) \(auto\)", text)
    n = settings.ftpipe_processes
    return run_record(
        n,
        max(1, settings.cpu_count // n),
        steps,
        peaks,
        wall,
        cpu_between(cpu, 1, len(steps)),
        self_reported_peak_gib=summary["peak_mem_gib_per_rank"],  # ru_maxrss per rank
        gradient_checkpointing=(chosen.group(1) == "on")
        if chosen
        else (variant.setting == "matched" and settings.matched_checkpointing == "on"),
        reference="adapter disabled"
        if "reference: the policy with its adapter disabled" in text
        else "other",
        prompt_once=all(s["positions"] < s["tokens"] for s in steps),
        total_params=summary["total_params"],
        trainable_params=summary["trainable_params"],
    )


def trl_spec(settings: Settings, variant: Variant, out_dir: Path, rows_file: Path) -> dict[str, Any]:
    """The JSON spec that ``trl_dpo_run.py`` trains from."""
    s, n = settings, settings.trl_processes
    matched = variant.setting == "matched"
    return {
        "model": s.model,
        "rows_file": str(rows_file),
        "out_dir": str(out_dir),
        "steps": s.steps,
        "micro_batch_size": s.micro_batch_size,
        "accumulation": s.accumulation(n),
        "max_length": s.max_length,
        "beta": s.beta,
        "loss_type": "sigmoid",
        # None: DPOConfig's own default (gradient checkpointing on)
        "gradient_checkpointing": (s.matched_checkpointing == "on") if matched else None,
        "optim": None,
        "threads": max(1, s.cpu_count // n),
        "lora": s.lora,
        **s.optim,
    }


def run_trl(settings: Settings, variant: Variant, workdir: Path, rows_file: Path) -> dict[str, Any]:
    """One TRL run (one process, or ``torch.distributed.run`` with several): its per-rank records merged."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(
        json.dumps(trl_spec(settings, variant, workdir, rows_file), indent=1), encoding="utf-8"
    )
    n = settings.trl_processes
    launcher = [sys.executable]
    if n > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    env = {}
    if variant.setting == "matched":
        from ftpipe.utils.allocator import TUNABLES

        env["GLIBC_TUNABLES"] = ":".join(TUNABLES)
    log = workdir / "train.log"
    code, wall, peaks, _ = run_child(
        [*launcher, str(TRL_RUNNER), str(spec_path)], log, is_trl_trainer, settings.timeout_s, env
    )
    ranks = sorted(workdir.glob("rank*.json"))
    if code != 0 or len(ranks) != n:
        return {"error": f"TRL run exited with {code}", "wall_s": wall, "log_tail": _tail(log)}
    per_rank = [json.loads(p.read_text()) for p in ranks]
    first = per_rank[0]
    steps = []
    for i, step in enumerate(first["steps"]):
        logged = first["logged"][i] if i < len(first["logged"]) else {}
        steps.append(
            {
                "step": step["step"],
                "step_time_s": max(r["steps"][i]["step_time_s"] for r in per_rank),
                "tokens": sum(r["steps"][i]["tokens"] for r in per_rank),
                "padded_tokens": sum(r["steps"][i]["padded_tokens"] for r in per_rank),
                "label_tokens": sum(r["steps"][i]["label_tokens"] for r in per_rank),
                "micro_batches": step["micro_batches"],
                "lr": logged.get("learning_rate"),
                **{k: v for k, v in logged.items() if k != "learning_rate"},
            }
        )
    return run_record(
        n,
        first["threads"],
        steps,
        peaks,
        wall,
        sum(r["steps"][-1]["cpu_end_s"] - r["steps"][0]["cpu_end_s"] for r in per_rank),
        self_reported_peak_gib=[r["peak_vmhwm_gib"] for r in per_rank],  # VmHWM read in each rank
        gradient_checkpointing=first["gradient_checkpointing"],
        reference=first["reference"],
        optim=first["optim"],
        padding_free=first["padding_free"],
        trl_num_tokens=first["trl_num_tokens"],
        train_rows=first["train_rows"],
        first_row_ids=first["first_row_ids"],
        glibc_tunables=env.get("GLIBC_TUNABLES"),
        total_params=first["total_params"],
        trainable_params=first["trainable_params"],
    )


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


# ------------------------------------------------------------------------------------------ comparison


def agreement(ours: dict[str, Any], theirs: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Step by step, ftpipe's and TRL's values (:data:`COMPARED`), their largest absolute difference, the token
    counts of each step on both sides, and whether the losses agree: step 1 within :data:`STEP1_TOLERANCE` of
    ln 2 on both sides, every step within ``tolerance`` of each other."""
    if "error" in ours or "error" in theirs:
        return {"evaluated": False, "why": "a run failed"}
    n = min(len(ours["steps"]), len(theirs["steps"]))
    per_step = []
    for a, b in zip(ours["steps"][:n], theirs["steps"][:n], strict=True):
        entry: dict[str, Any] = {"step": a["step"]}
        for key in COMPARED:
            x, y = a.get(key), b.get(key)
            entry[key] = [x, y]
            entry[f"{key} diff"] = None if x is None or y is None else abs(x - y)
        for key in ("tokens", "label_tokens"):
            entry[key] = [a[key], b[key]]
        per_step.append(entry)
    diffs = [e["loss diff"] for e in per_step if e["loss diff"] is not None]
    step1 = [ours["steps"][0]["loss"], theirs["steps"][0]["loss"]]
    step1_ok = all(v is not None and abs(v - LN2) <= STEP1_TOLERANCE for v in step1)
    max_diff = max(diffs) if len(diffs) == n and diffs else None
    return {
        "evaluated": True,
        "steps": n,
        "tolerance": tolerance,
        "step1_losses": step1,
        "step1_is_ln2": step1_ok,
        "max_loss_diff": max_diff,
        "max_logps_chosen_diff": max(
            (e["logps/chosen diff"] for e in per_step if e["logps/chosen diff"] is not None), default=None
        ),
        "losses_agree": step1_ok and max_diff is not None and max_diff <= tolerance,
        "same_tokens_every_step": all(e["tokens"][0] == e["tokens"][1] for e in per_step),
        "same_label_tokens_every_step": all(e["label_tokens"][0] == e["label_tokens"][1] for e in per_step),
        "token_difference_per_step": sorted({e["tokens"][1] - e["tokens"][0] for e in per_step}),
        "per_step": per_step,
    }


def targets(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """At each side's defaults: ftpipe's real tokens/s at least :data:`TARGET_RATIO` x TRL's, and the peak of its
    largest process at most TRL's."""
    ours, theirs = runs.get("ftpipe-defaults"), runs.get("trl-defaults")
    if not ours or not theirs or "error" in ours or "error" in theirs:
        return {"evaluated": False, "why": "needs successful ftpipe-defaults and trl-defaults runs"}
    ratio = _ratio(ours["tokens_per_s"], theirs["tokens_per_s"])
    cpu_ratio = _ratio(ours.get("tokens_per_cpu_s"), theirs.get("tokens_per_cpu_s"))
    mem, base = max(ours["peak_rss_gib"], default=None), max(theirs["peak_rss_gib"], default=None)
    return {
        "evaluated": True,
        "tokens_per_s_ratio": ratio,
        "tokens_per_s_ratio_met": ratio is not None and ratio >= TARGET_RATIO,
        "tokens_per_cpu_s_ratio": cpu_ratio,
        "tokens_per_cpu_s_ratio_met": cpu_ratio is not None and cpu_ratio >= TARGET_RATIO,
        "peak_rss_gib_max_process": mem,
        "trl_peak_rss_gib_max_process": base,
        "peak_memory_met": mem is not None and base is not None and mem <= base,
    }


# ------------------------------------------------------------------------------------------ set-up


def prepare_data(settings: Settings, data_dir: Path, log_path: Path) -> Path:
    """``ftpipe prepare`` of the pairs into ``data_dir``; the folder holding ``training.jsonl``."""
    cmd = [
        sys.executable,
        "-m",
        "ftpipe",
        "prepare",
        "--config",
        str(settings.config),
        *as_flags(settings.ftpipe_overrides()),
        "--data_dir",
        str(data_dir),
    ]
    code, _, _, _ = run_child(cmd, log_path, lambda argv: False, settings.timeout_s)
    if code != 0:
        raise SystemExit(f"ftpipe prepare failed ({code}):\n{_tail(log_path)}")
    return next(data_dir.rglob("training.jsonl")).parent


def build_settings(args: argparse.Namespace) -> Settings:
    """The shared settings from the arguments (LoRA target modules: ftpipe's default, the 7 projections)."""
    from ftpipe.config.io import load_config
    from ftpipe.config.schema import EMBEDDED_MODEL

    cfg = load_config(args.config)
    cpus = args.cpus or os.cpu_count() or 1
    ftpipe_processes = 1 if args.ftpipe_strategy == "single" else cpus
    trl_processes = args.trl_processes or ftpipe_processes
    micro, global_batch = args.micro_batch_size, args.global_batch
    for side, n in (("ftpipe", ftpipe_processes), ("trl", trl_processes)):
        if global_batch % (micro * n):
            raise SystemExit(
                f"--global-batch {global_batch} is not a multiple of --micro-batch-size {micro} x {n} "
                f"{side} process(es): choose a global batch that both sides can reach"
            )
    if args.steps < 2:
        raise SystemExit("--steps: at least 2 (the first optimizer step is warm-up and not measured)")
    if args.model:
        model, hf_model_id = str(Path(args.model).resolve()), str(Path(args.model).resolve())
    else:
        from ftpipe.model.embedded import embedded_model_dir

        model, hf_model_id = str(embedded_model_dir()), EMBEDDED_MODEL
    return Settings(
        model=model,
        hf_model_id=hf_model_id,
        config=args.config.resolve(),
        pairs=args.pairs.resolve(),
        steps=args.steps,
        max_length=args.max_length,
        micro_batch_size=micro,
        global_batch=global_batch,
        ftpipe_strategy=args.ftpipe_strategy,
        ftpipe_processes=ftpipe_processes,
        trl_processes=trl_processes,
        matched_checkpointing=args.matched_checkpointing,
        cpu_count=cpus,
        beta=args.beta,
        lora={
            "r": args.lora_rank,
            "alpha": args.lora_alpha,
            "dropout": 0.0,
            "target_modules": list(cfg.lora.lora_target_modules),
        },
        optim={
            "learning_rate": args.learning_rate,
            "min_lr": args.min_lr,
            "warmup_steps": 0,
            "adam_beta1": cfg.train.adam_beta1,
            "adam_beta2": cfg.train.adam_beta2,
            "weight_decay": cfg.train.weight_decay,
            "max_grad_norm": cfg.train.gradient_clip_val,
            "seed": cfg.train.seed,
        },
        timeout_s=args.timeout,
    )


# ------------------------------------------------------------------------------------------ report

#: TRL 1.16's DPOConfig defaults that differ from ftpipe's, and what this benchmark does with them.
TRL_DEFAULTS = (
    "max_length 1024 (ftpipe: max_seq_length, 2048 by default): both get --max-length here",
    "truncation_mode keep_start: the end of an over-long prompt + answer is cut (ftpipe cuts the prompt from the "
    "left first, then both answers to the same budget); no pair reaches the maximum length here",
    "padding_free False (and disabled in TRL 1.16: setting it warns and pads anyway); pad_to_multiple_of None on "
    "the CPU (ftpipe: None); both pad each micro-batch to its longest sequence",
    "gradient_checkpointing True (ftpipe: auto, from its memory estimate: off here); matched: the same on both",
    "bf16 True unless fp16 (ftpipe: precision auto, fp32 on the CPU); set False here: bf16 is emulated on these CPUs",
    "learning_rate 1e-6, lr_scheduler_type linear, warmup 0, adam_beta2 0.999, weight_decay 0 (ftpipe: 1e-5, "
    "linear warm-up + cosine to min_lr, 0.95, 0.01): both sides get the same values here (see the settings)",
    "per_device_train_batch_size 8, gradient_accumulation_steps 1 (ftpipe: micro 2, accumulation 4): both get "
    "the same pairs per micro-batch and per step here",
    "train_sampling_strategy random: sequential here, with the rows in ftpipe's order",
    "precompute_ref_log_probs False: the reference forward (adapter disabled) runs every step, as ftpipe's "
    "reference adapter; disable_dropout True (ftpipe keeps lora_dropout; 0 here); optim adamw_torch_fused "
    "(ftpipe: fused AdamW on the CPU too); beta 0.1 and loss_type sigmoid (sum of the answer's token "
    "log-probabilities) as ftpipe's dpo_beta and dpo_loss",
    "logging_steps 10 and save_strategy steps: every step is logged and nothing saved here",
)

DIFFERENCES = (
    "Tokens at the defaults: TRL renders conversational rows with the chat template, so each answer ends with "
    "<|im_end|> and the template's newline (one token more per sequence, trained on); ftpipe ends the answer at "
    "EOS. Matched: TRL gets ftpipe's rendered text and tokenizes it to the same ids.",
    "LM head: ftpipe's chunked head computes log-probabilities at the answer positions only (policy and "
    "reference); TRL 1.16's fused LM head scores every position on the CPU (prompt and padding included; it "
    "compacts to labelled positions on CUDA/XPU only), and for the policy also entropy, mean logits and top-1 "
    "hits for its logs.",
    "Initial adapter: both seed PEFT's LoRA initialisation with seed 42 right before creating it (ftpipe: "
    "torch.manual_seed before building the model; TRL: set_seed in DPOTrainer before get_peft_model), which gives "
    "the same LoRA A matrices (checked in development: identical tensors); B is 0 on both.",
    "The prompt once: ftpipe batches a pair as one row (share_prompt auto), the prompt followed by both "
    "answers behind a block attention mask, so it computes each prompt's positions once per pass where TRL "
    "computes them in both rows; the answers' log-probabilities are the same up to float rounding (the loss "
    "agreement below). Real tokens count both sequences on both sides; the padding column is of the positions "
    "each side computed.",
    "Saving: ftpipe writes its last checkpoint after the final step (in its wall time, outside the step times); "
    "TRL saves nothing.",
    "Step time: ftpipe sums the time inside its training batches; TRL's runs from on_step_begin to on_step_end. "
    "Both include the policy and reference forwards, backward, clipping and the optimizer step.",
    "Wall time: the whole process (imports, start of the ranks, data, model loading, ftpipe's matmul-rate "
    "measurement for MFU, training, saving), so it includes each side's start-up costs.",
)


def _fmt(x: float | None, pattern: str) -> str:
    return "n/a" if x is None else pattern.format(x)


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine is not None and theirs else None


def _losses(run: dict[str, Any], k: int) -> str:
    return ", ".join(_fmt(v, "{:.5f}") for v in run["losses"][:k])


def markdown(report: dict[str, Any], first_steps: int = 5) -> str:
    """The Markdown report: the table, per-step losses, the agreement, the settings and the differences."""
    s, runs = report["settings"], report["runs"]
    lines = [
        "# ftpipe DPO vs TRL DPOTrainer + PEFT LoRA",
        "",
        f"{report['machine']['cpu']}, {report['machine']['cpu_count']} cores; "
        + ", ".join(f"{k} {v}" for k, v in report["machine"]["versions"].items() if v)
        + f". One run per variant, in this order; rates over steps 2-{s['steps']}; load average (1 min, the "
        "machine was shared) before and after each run.",
        "",
        "| variant | processes x threads | checkpointing | real tokens/s | ratio to TRL (same setting) | "
        "real tokens per CPU-s | ratio (CPU) | peak RSS per process (GiB) | wall (s) | train time (s) | s/step | "
        f"CPU s/step | padding | losses, steps 1-{first_steps} | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * 13)
            continue
        peer = runs.get(f"trl-{VARIANTS[name].setting}", {})
        ok = bool(peer) and "error" not in peer
        ratio = _ratio(r.get("tokens_per_s"), peer.get("tokens_per_s") if ok else None)
        cpu_ratio = _ratio(r.get("tokens_per_cpu_s"), peer.get("tokens_per_cpu_s") if ok else None)
        lines.append(
            f"| {name} | {r['processes']} x {r['threads_per_process']} | "
            f"{'on' if r['gradient_checkpointing'] else 'off'} | {_fmt(r['tokens_per_s'], '{:.1f}')} | "
            f"{_fmt(ratio, '{:.2f}x')} | {_fmt(r.get('tokens_per_cpu_s'), '{:.1f}')} | "
            f"{_fmt(cpu_ratio, '{:.2f}x')} | {', '.join(f'{g:.2f}' for g in r['peak_rss_gib'])} | "
            f"{r['wall_s']:.0f} | {r['train_time_s']:.0f} | {_fmt(r['s_per_step'], '{:.2f}')} | "
            f"{_fmt(r.get('cpu_s_per_step'), '{:.2f}')} | {_fmt(r['padding_share'], '{:.1%}')} | "
            f"{_losses(r, first_steps)} | {r['loadavg_before']:.2f} / {r['loadavg_after']:.2f} |"
        )
    lines += ["", "## Loss agreement", ""]
    for setting, a in report["agreement"].items():
        if not a.get("evaluated"):
            lines.append(f"- {setting}: not evaluated ({a.get('why')})")
            continue
        tokens = (
            "the same real and answer tokens at every step"
            if a["same_tokens_every_step"] and a["same_label_tokens_every_step"]
            else f"TRL's real tokens minus ftpipe's per step: {a['token_difference_per_step']}"
        )
        verdict = "agree" if a["losses_agree"] else "do NOT agree"
        lines.append(
            f"- {setting}: step 1 losses {a['step1_losses'][0]:.7f} (ftpipe) and {a['step1_losses'][1]:.7f} (TRL), "
            f"ln 2 = {LN2:.7f} (tolerance {STEP1_TOLERANCE:g}): {'yes' if a['step1_is_ln2'] else 'NO'}; largest "
            f"|loss difference| over {a['steps']} steps {_fmt(a['max_loss_diff'], '{:.2e}')} (tolerance "
            f"{a['tolerance']:g}): losses {verdict}; largest |logps/chosen difference| "
            f"{_fmt(a['max_logps_chosen_diff'], '{:.2e}')}; {tokens}"
        )
    lines += [
        "",
        "| step | " + " | ".join(runs) + " | " + " | ".join(f"diff {k}" for k in report["agreement"]) + " |",
    ]
    lines.append("|---" * (1 + len(runs) + len(report["agreement"])) + "|")
    for i in range(s["steps"]):
        cells = [
            _fmt(r["losses"][i], "{:.6f}") if "error" not in r and i < len(r["losses"]) else "n/a"
            for r in runs.values()
        ]
        diffs = []
        for a in report["agreement"].values():
            step = a.get("per_step", [])
            diffs.append(_fmt(step[i]["loss diff"], "{:.1e}") if i < len(step) else "n/a")
        lines.append(f"| {i + 1} | " + " | ".join(cells + diffs) + " |")
    lines += [
        "",
        "## Work per step (estimate)",
        "",
        "Matmul FLOPs of a rated step (`matmul_gflops`: frozen blocks and adapters over the padded positions, "
        "policy forward and backward, reference forward, the recomputed forward with checkpointing; the LM head "
        "over the positions each side scores), and that work per CPU-second of the training processes:",
        "",
    ]
    for name, r in runs.items():
        if "error" not in r and "gflop_per_step" in r:
            lines.append(
                f"- {name}: {r['gflop_per_step']:.0f} GFLOP per step, {_fmt(r['gflop_per_cpu_s'], '{:.1f}')} "
                "GFLOP per CPU-second"
            )
    t = report["targets"]
    lines += ["", "## Target (each side's defaults)", ""]
    if t.get("evaluated"):
        lines += [
            f"- real tokens/s {_fmt(t['tokens_per_s_ratio'], '{:.2f}x')} TRL's (target >= {TARGET_RATIO}x): "
            f"{'met' if t['tokens_per_s_ratio_met'] else 'NOT met'}",
            f"- real tokens per CPU-second {_fmt(t['tokens_per_cpu_s_ratio'], '{:.2f}x')} TRL's (the same target on "
            f"the work done, which other jobs on the machine inflate far less than the step times): "
            f"{'met' if t['tokens_per_cpu_s_ratio_met'] else 'NOT met'}",
            f"- peak RSS of the largest process {t['peak_rss_gib_max_process']:.2f} GiB vs TRL "
            f"{t['trl_peak_rss_gib_max_process']:.2f} GiB: {'met' if t['peak_memory_met'] else 'NOT met'}",
        ]
    else:
        lines.append(f"- not evaluated: {t['why']}")
    d, tc = report["data"], report["token_check"]
    lines += [
        "",
        "## Settings (both sides)",
        "",
        f"- model: {s['model']} (fp32, sdpa attention, CPU); LoRA r={s['lora']['r']} alpha={s['lora']['alpha']} "
        f"dropout={s['lora']['dropout']} on {', '.join(s['lora']['target_modules'])}; reference: the policy with "
        "its adapter disabled",
        f"- data: {s['pairs']} prepared by `ftpipe prepare` (objective dpo, chat template): {d['train_pairs']} "
        f"training pairs ({d['dropped']} dropped), longest prompt + answer {d['longest']} tokens; the first "
        f"{s['steps']} x {s['global_batch']} pairs in ftpipe's sampler order (seed {s['optim']['seed']}), "
        "TRL reading its rows in that order without shuffling",
        f"- tokens: TRL's tokenization of the benchmarked pairs: {tc['text_rows_identical']}/{tc['pairs']} text "
        f"rows (matched) give ftpipe's ids; {tc['conversational_one_more']}/{tc['pairs']} conversational rows "
        "(defaults) give ftpipe's ids plus the template's newline",
        f"- max length {s['max_length']}; {s['micro_batch_size']} pairs per micro-batch ({2 * s['micro_batch_size']} "
        f"sequences); {s['global_batch']} pairs per optimizer step (ftpipe {s['ftpipe_strategy']}: "
        f"{s['ftpipe_processes']} process(es) x accumulation {s['ftpipe_accumulation']}; TRL: "
        f"{s['trl_processes']} process(es) x accumulation {s['trl_accumulation']}"
        f"{', torch.distributed.run, DDP over gloo' if s['trl_processes'] > 1 else ''})",
        f"- {s['steps']} optimizer steps (the first is warm-up, not in the rates); DPO sigmoid, beta {s['beta']}; "
        f"AdamW lr {s['optim']['learning_rate']} betas {s['optim']['adam_beta1']}/{s['optim']['adam_beta2']} eps "
        f"1e-8 weight decay {s['optim']['weight_decay']}, no warm-up, cosine to {s['optim']['min_lr']} at the "
        f"last step (transformers' cosine_with_min_lr), clipping at {s['optim']['max_grad_norm']}",
        f"- defaults: ftpipe activation checkpointing auto, its malloc tunables; TRL gradient checkpointing on, "
        f"glibc's default malloc, conversational rows. matched: checkpointing {s['matched_checkpointing']} on both, "
        f"GLIBC_TUNABLES={report['matched_glibc_tunables']} for TRL (the ftpipe command sets them itself), TRL "
        "fed ftpipe's rendered text",
        "- real tokens: both sequences (prompt + answer) of every pair of the step, all ranks. ftpipe: counted "
        "from its encoding of the step's pairs (its metrics.jsonl counts the positions it computed, fewer with the "
        "prompt once); TRL: the attention-mask sum of every collated batch (chosen and rejected rows)",
        "- peak RSS: VmHWM of each training process, polled from /proc for both sides",
        "- CPU: user + system seconds of all training processes from the end of step 1 to the end of the last "
        "step (ftpipe: read from /proc when its metrics.jsonl gains a step, polled every 0.25 s; TRL: "
        "time.process_time() of each rank at the end of each step); CPU s/step sums the processes",
        "",
        "## TRL 1.16 DPOConfig defaults that differ from ftpipe's",
        "",
        *[f"- {x}" for x in TRL_DEFAULTS],
        "",
        "## Known differences",
        "",
        *[f"- {x}" for x in DIFFERENCES],
    ]
    failures = [(n, r) for n, r in runs.items() if "error" in r]
    if failures:
        lines += ["", "## Failed runs", ""] + [f"- {n}: {r['error']}" for n, r in failures]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main


def add_derived(report: dict[str, Any]) -> None:
    """The figures derived from the runs: each run's work estimate, the loss agreement of each setting, the
    target."""
    runs, s = report["runs"], report["settings"]
    report.setdefault("loss_tolerance", LOSS_TOLERANCE)
    head = head_params(s["model"])
    for record in runs.values():
        if "error" not in record:
            record.update(work(record, record["side"], head, 2 * s["global_batch"]))
    report["agreement"] = {
        setting: agreement(runs[f"ftpipe-{setting}"], runs[f"trl-{setting}"], report["loss_tolerance"])
        for setting in SETTINGS
        if f"ftpipe-{setting}" in runs and f"trl-{setting}" in runs
    }
    report["targets"] = targets(runs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "benchmark.yaml")
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="preference pairs (JSONL)")
    parser.add_argument(
        "--steps", type=int, default=12, help="optimizer steps per run (the first is warm-up)"
    )
    parser.add_argument(
        "--variants",
        default=",".join(SETTINGS),
        help="comma-separated settings, each run by both sides: defaults, matched",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report (Markdown beside it, .md)")
    parser.add_argument(
        "--ftpipe-strategy",
        default="ddp",
        choices=["single", "ddp", "fsdp2", "fsdp1"],
        help="single: 1 process x all cores; the others: one process per core, 1 thread each",
    )
    parser.add_argument(
        "--trl-processes",
        type=int,
        default=None,
        help="1: one process, all cores as threads; n>1: torch.distributed.run (default: as many as ftpipe)",
    )
    parser.add_argument("--cpus", type=int, default=None, help="cores to use (default: all)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sequence, both sides")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="pairs per forward and process")
    parser.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta, both sides")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--min-lr", type=float, default=5e-6, help="the cosine's end at the last step")
    parser.add_argument(
        "--matched-checkpointing",
        choices=["off", "on"],
        default="off",
        help="activation checkpointing of both sides in the matched runs",
    )
    parser.add_argument(
        "--loss-tolerance", type=float, default=LOSS_TOLERANCE, help="matched runs, every step"
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run before it is stopped")
    parser.add_argument("--model", default=None, help="model folder for both sides (default: embedded)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data, logs and runs here")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: recompute the derived figures of the JSON at --out and write its Markdown again",
    )
    args = parser.parse_args(argv)
    settings = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in settings if v not in SETTINGS]
    if unknown or not settings:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    args.settings = [s for s in SETTINGS if s in settings]
    if args.trl_processes is not None and args.trl_processes < 1:
        parser.error("--trl-processes: at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from ftpipe.config.io import load_config
    from ftpipe.data.prepare import read_jsonl
    from ftpipe.model.tokenizer import load_tokenizer
    from ftpipe.utils.allocator import TUNABLES
    from ftpipe.utils.logging import get_logger, setup_logging

    setup_logging()
    log = get_logger("benchmarks.dpo_vs_trl")
    args = parse_args(argv)
    vs = _sibling("vs_trl")
    if args.report_only:
        report = json.loads(args.out.read_text(encoding="utf-8"))
        add_derived(report)
        vs.write_report(args.out, report, markdown(report))
        return report
    settings = build_settings(args)
    with tempfile.TemporaryDirectory(prefix="ftpipe-dpo-vs-trl-") as tmp:
        work = args.workdir.resolve() if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = prepare_data(settings, work / "data", work / "prepare.log")
        cfg = load_config(settings.config, **settings.ftpipe_overrides())
        tokenizer = load_tokenizer(cfg.model)
        encoded = encode_split(cfg, tokenizer, read_jsonl(prepared / "training.jsonl"))
        n = len(encoded.rows)
        batches = ftpipe_batches(
            n, settings.ftpipe_processes, settings.micro_batch_size, settings.optim["seed"]
        )
        steps = step_pairs(batches, settings.accumulation(settings.ftpipe_processes), settings.steps)
        order = trl_order(steps, n)
        benchmarked = [i for step in steps for i in step]
        sequence_tokens = [
            sum(len(encoded.chosen_ids[i]) + len(encoded.rejected_ids[i]) for i in step) for step in steps
        ]
        token_check = trl_token_check(tokenizer, encoded, benchmarked)
        rows = {
            "defaults": write_jsonl(
                work / "trl_rows_conversational.jsonl", [encoded.conversational_rows[i] for i in order]
            ),
            "matched": write_jsonl(work / "trl_rows_text.jsonl", [encoded.text_rows[i] for i in order]),
        }
        runs: dict[str, dict[str, Any]] = {}
        for setting in args.settings:
            for side in ("ftpipe", "trl"):
                name = f"{side}-{setting}"
                variant = VARIANTS[name]
                run_dir = work / "runs" / name
                run_dir.mkdir(parents=True, exist_ok=True)
                before = _loadavg()
                if side == "ftpipe":
                    record = run_ftpipe(settings, variant, run_dir, prepared, sequence_tokens)
                else:
                    record = run_trl(settings, variant, run_dir, rows[setting])
                record = {"variant": name, "side": side, "setting": setting, **record}
                record.update(loadavg_before=before, loadavg_after=_loadavg())
                runs[name] = record
                if "error" in record:
                    log.warning("%s failed: %s (log: %s)", name, record["error"], run_dir)
                else:
                    log.info(
                        "%s: %.1f real tokens/s, %.2f s/step, peak RSS %s GiB, wall %.0f s, losses %s (load %.2f -> %.2f)",
                        name,
                        record["tokens_per_s"],
                        record["s_per_step"],
                        ", ".join(f"{g:.2f}" for g in record["peak_rss_gib"]),
                        record["wall_s"],
                        _losses(record, 4),
                        record["loadavg_before"],
                        record["loadavg_after"],
                    )
        report = {
            "benchmark": "dpo_vs_trl",
            "machine": vs.machine_info(),
            "variants": {n: VARIANTS[n].description for n in runs},
            "settings": {
                **{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
                "ftpipe_accumulation": settings.accumulation(settings.ftpipe_processes),
                "trl_accumulation": settings.accumulation(settings.trl_processes),
                "ftpipe_overrides": settings.ftpipe_overrides(),
            },
            "matched_glibc_tunables": ":".join(TUNABLES),
            "data": {
                "prepared_dir": str(prepared),
                "train_pairs": n,
                "dropped": encoded.dropped,
                "longest": encoded.longest,
                "step_pairs": [[encoded.rows[i].get("id") for i in step] for step in steps],
            },
            "token_check": token_check,
            "loss_tolerance": args.loss_tolerance,
            "runs": runs,
            "trl_defaults": list(TRL_DEFAULTS),
            "differences": list(DIFFERENCES),
        }
    add_derived(report)
    vs.write_report(args.out, report, markdown(report))
    return report


if __name__ == "__main__":
    main()
