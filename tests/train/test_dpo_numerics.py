"""Preference tuning (``objective: dpo``) through the whole training stack, on REAL processes.

A tiny random Llama (the ``tiny_llama`` fixture) in fp32, LoRA dropout 0, and 8 seeded preference pairs
(4 for training, 3 for validation): every run's global batch is the 4 training pairs, so every optimizer
step sees the whole split whatever the order, and one process, accumulation, DDP, FSDP1 and FSDP2 must
give the same losses, gradient norms, reward metrics and LoRA weights. The numbers are also checked
against values computed here, independently, from the model's full logits.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY

from ftpipe.model.checkpoint import read_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOPICS = ["rivers", "tea", "chess", "owls", "copper", "tides", "maps", "bread"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """8 seeded text pairs (prompt, chosen, rejected) of varied lengths."""
    rng = random.Random(7)
    rows = []
    for i, topic in enumerate(TOPICS):
        words = " ".join(rng.choice(["very", "quite", "most", "rather"]) for _ in range(i % 3 + 1))
        rows.append(
            {
                "prompt": f"Tell me something {words} interesting about {topic}.",
                "chosen": f"Here is a fact about {topic}: it is {words} interesting. Thanks for asking!",
                "rejected": f"I do not know anything about {topic}.",
            }
        )
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_dpo(pairs_file: Path, tiny_llama: Path) -> dict[str, object]:
    """The tiny numerics runs' settings (``tiny_runs.TINY``) on preference pairs."""
    return {
        **TINY,
        "objective": "dpo",
        "dpo_beta": 0.5,
        "dataset": str(pairs_file),
        "hf_model_id": str(tiny_llama),
        "max_samples": None,
        "max_seq_length": 128,  # every pair fits one shared-prompt row (share_prompt auto)
        "activation_checkpointing": False,
    }


@pytest.fixture(scope="module")
def dpo_runner(train_runner, tiny_llama, pairs_file):
    def run(name: str, **overrides):
        return train_runner(name, {**tiny_dpo(pairs_file, tiny_llama), **overrides}, timeout=300)

    return run


@pytest.fixture(scope="module")
def reference(dpo_runner):
    """One process, micro-batch 4 pairs (8 sequences in one forward), no accumulation."""
    return dpo_runner("dpo_single_micro4", strategy="single", gpus_per_node=1, micro_batch_size=4)


@pytest.fixture(scope="module")
def fsdp2_run(dpo_runner):
    return dpo_runner("dpo_fsdp2_2x2", strategy="fsdp2", gpus_per_node=2, micro_batch_size=2)


METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def _assert_same_steps(run, reference, rel=1e-4, abs_=1e-6):
    (steps, vals), (ref_steps, ref_vals) = run.metrics, reference.metrics
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["label_tokens"] for s in steps] == [s["label_tokens"] for s in ref_steps]
    for key in ("loss", "grad_norm", *METRICS):
        assert [s[key] for s in steps] == pytest.approx([s[key] for s in ref_steps], rel=rel, abs=abs_), key
    for key in ("val_loss", "val_reward_accuracy", "val_rewards/margins", "val_logps/chosen"):
        assert [v[key] for v in vals] == pytest.approx([v[key] for v in ref_vals], rel=rel, abs=abs_), key


def _assert_same_weights(run, reference, atol=1e-5):
    weights = read_checkpoint(run.checkpoint("last.ckpt")).weights
    ref = read_checkpoint(reference.checkpoint("last.ckpt")).weights
    assert sorted(weights) == sorted(ref) and all(".lora_" in k for k in ref)
    worst = max(float((weights[k] - ref[k]).abs().max()) for k in ref)
    assert worst < atol, f"LoRA weights differ by up to {worst}"


def _train_pairs_logps(run) -> list[tuple[float, float, int, int]]:
    """(chosen, rejected) summed answer log-probabilities and token counts of the training pairs under the
    untrained model, from its full logits (independent of the training code's chunked head)."""
    from transformers import AutoModelForCausalLM

    from ftpipe.config import load_config, prepared_data_dir
    from ftpipe.data.build import SPLIT_FILES
    from ftpipe.data.pairs import encode_pair
    from ftpipe.data.prepare import read_jsonl
    from ftpipe.model.tokenizer import load_tokenizer

    cfg = load_config(run.root / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    rows = read_jsonl(prepared_data_dir(cfg.data, cfg.objective.objective) / SPLIT_FILES["train"])
    assert len(rows) == 4
    model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_model_id, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            pair = encode_pair(tokenizer, row, cfg.data)
            assert pair.drop is None
            sides = []
            for ids, labels in (
                (pair.chosen_input_ids, pair.chosen_labels),
                (pair.rejected_input_ids, pair.rejected_labels),
            ):
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
                targets = torch.tensor(labels[1:])
                keep = targets != -100
                logps = torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep].unsqueeze(-1)).sum()
                sides += [float(logps), int(keep.sum())]
            out.append((sides[0], sides[2], sides[1], sides[3]))
    return out


@pytest.mark.timeout(900)
def test_dpo_first_step_and_metrics_match_an_independent_computation(reference):
    """At step 1 the policy IS the reference (LoRA B = 0): the loss is exactly ln 2, the rewards 0, and
    the logged log-probabilities are the model's own (computed here from full logits); the model learns."""
    steps, vals = reference.metrics
    first = steps[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/accuracies"] == 0.0  # ties are not wins
    expected = _train_pairs_logps(reference)
    assert first["logps/chosen"] == pytest.approx(sum(e[0] for e in expected) / 4, rel=1e-5)
    assert first["logps/rejected"] == pytest.approx(sum(e[1] for e in expected) / 4, rel=1e-5)
    assert first["label_tokens"] == sum(e[2] + e[3] for e in expected)
    assert steps[2]["loss"] < steps[0]["loss"] and steps[2]["rewards/margins"] > 0
    assert [v["step"] for v in vals] == [2] and 0.0 <= vals[0]["val_reward_accuracy"] <= 1.0
    manifest = reference.manifest()
    assert manifest["config"]["objective"] == "dpo"
    assert (
        "objective dpo (dpo_loss sigmoid, beta 0.5; reference: the policy with its adapter disabled"
        in reference.log()
    )


@pytest.mark.timeout(900)
def test_dpo_accumulation_equivalence(dpo_runner, reference):
    """1 pair x 4 accumulated == 4 pairs in one micro-batch: the loss is the mean over the step's pairs."""
    run = dpo_runner(
        "dpo_single_micro1_acc4",
        strategy="single",
        gpus_per_node=1,
        micro_batch_size=1,
        accumulate_grad_batches=4,
    )
    _assert_same_steps(run, reference, rel=1e-5)
    _assert_same_weights(run, reference)


@pytest.mark.timeout(900)
def test_dpo_fsdp2_two_ranks_match_one_process(fsdp2_run, reference):
    _assert_same_steps(fsdp2_run, reference)
    _assert_same_weights(fsdp2_run, reference)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["fsdp1", "ddp"])
def test_dpo_fsdp1_and_ddp_two_ranks_match_one_process(dpo_runner, reference, strategy):
    run = dpo_runner(f"dpo_{strategy}_2x2", strategy=strategy, gpus_per_node=2, micro_batch_size=2)
    _assert_same_steps(run, reference)
    _assert_same_weights(run, reference)


@pytest.mark.timeout(900)
def test_dpo_resume_reproduces_the_uninterrupted_step(dpo_runner, fsdp2_run):
    best = fsdp2_run.checkpoint("step=2-*")
    resumed = dpo_runner(
        "dpo_fsdp2_resumed",
        strategy="fsdp2",
        gpus_per_node=2,
        micro_batch_size=2,
        resume_from_checkpoint=str(best),
    )
    steps = resumed.metrics[0]
    assert [s["step"] for s in steps] == [3]
    for key in ("loss", *METRICS):
        assert steps[0][key] == pytest.approx(fsdp2_run.metrics[0][2][key], rel=1e-6, abs=1e-7), key
    _assert_same_weights(resumed, fsdp2_run, atol=1e-7)


@pytest.mark.timeout(900)
def test_cached_reference_and_two_rows_per_pair_train_like_the_reference_run(dpo_runner, reference):
    """``reference: cached``: the reference pass runs once before training (in eval mode: the same values
    without dropout) and is stored beside the prepared data. This run also batches each pair as two rows
    (``share_prompt: false``) where the reference run computes the prompt once per pair: the training is
    the same, on fewer positions."""
    run = dpo_runner(
        "dpo_cached_two_rows",
        strategy="single",
        gpus_per_node=1,
        micro_batch_size=4,
        reference="cached",
        share_prompt=False,
    )
    _assert_same_steps(run, reference, rel=1e-5)
    # the layouts differ in float rounding only (a block mask vs the causal kernel), which AdamW's
    # normalised updates carry to ~1e-5 in 3 steps at lr 1e-3; a wrong answer would differ by ~lr
    _assert_same_weights(run, reference, atol=5e-5)
    assert "reference log-probabilities of 4 train pairs computed and cached" in run.log()
    assert "prompt batched once per pair: no" in run.log()
    assert "prompt batched once per pair: where the row fits max_seq_length" in reference.log()
    for step, ref_step in zip(run.metrics[0], reference.metrics[0], strict=True):
        assert ref_step["tokens"] < step["tokens"]  # each prompt's positions once, not twice
        assert ref_step["padded_tokens"] <= step["padded_tokens"]


@pytest.mark.timeout(900)
def test_simpo_first_step_matches_its_formula(dpo_runner, reference):
    """SimPO (no reference): step 1's loss is -log sigmoid(beta * (avg logp chosen - avg logp rejected) -
    gamma), averaged over the pairs, from the model's own log-probabilities."""
    beta, gamma = 2.0, 0.5
    run = dpo_runner(
        "dpo_simpo",
        strategy="single",
        gpus_per_node=1,
        micro_batch_size=4,
        dpo_loss="simpo",
        dpo_beta=beta,
        simpo_gamma=gamma,
    )
    expected = _train_pairs_logps(reference)
    losses = [
        -torch.nn.functional.logsigmoid(torch.tensor(beta * (c / nc - r / nr) - gamma)).item()
        for c, r, nc, nr in expected
    ]
    first = run.metrics[0][0]
    assert first["loss"] == pytest.approx(sum(losses) / 4, rel=1e-5)
    assert first["rewards/chosen"] == pytest.approx(
        sum(beta * c / nc for c, _, nc, _ in expected) / 4, rel=1e-5
    )
    assert "reference: none (reference-free)" in run.log()


@pytest.mark.timeout(900)
def test_full_fine_tuning_with_a_frozen_copy_as_reference(dpo_runner):
    """Full fine-tuning: the reference is a frozen copy of the starting model (not trained, not saved)."""
    run = dpo_runner(
        "dpo_full_copy",
        strategy="single",
        gpus_per_node=1,
        micro_batch_size=4,
        finetuning="full",
        learning_rate=1e-4,
        min_lr=1e-5,
    )
    steps = run.metrics[0]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[2]["rewards/margins"] > 0
    assert "reference: a frozen copy of the starting model" in run.log()
    weights = read_checkpoint(run.checkpoint("last.ckpt")).weights
    assert weights and not any("reference" in k for k in weights)
