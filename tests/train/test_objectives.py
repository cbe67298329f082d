"""The objective seam, piece by piece: the registry, the preference losses against their formulas, the
per-row log-probabilities of the chunked head, the memory estimate, the SageMaker hyperparameters and
the model card of a preference run."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ftpipe.config.schema import ObjectiveConfig, ObjectiveName, PipelineConfig
from ftpipe.objectives import OBJECTIVES, get_objective
from ftpipe.objectives.dpo import METRICS, preference_losses, resolve_reference
from ftpipe.train.loss import chunked_sequence_logps, sequence_logps_from_logits

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(60)
def test_every_configurable_objective_is_registered_and_declares_its_costs():
    assert set(typing.get_args(ObjectiveName)) == set(OBJECTIVES)
    sft = get_objective(PipelineConfig())
    dpo = get_objective(PipelineConfig().replace(objective="dpo"))
    assert (sft.name, sft.unit, sft.sequences_per_sample, sft.reference, sft.metric_names) == (
        "sft",
        "label token",
        1,
        None,
        (),
    )
    assert (dpo.name, dpo.unit, dpo.sequences_per_sample, dpo.reference) == ("dpo", "pair", 2, "adapter")
    assert dpo.metric_names == METRICS and dpo.reference_passes == 1 and sft.supports_packing
    assert "rewards/accuracies" in METRICS


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "adapter"),
        ({"init_adapter": "a.ckpt"}, "cached"),
        ({"finetuning": "full"}, "copy"),
        ({"finetuning": "full", "strategy": "fsdp1"}, "cached"),
        ({"dpo_loss": "simpo"}, None),
        ({"reference": "cached"}, "cached"),
    ],
)
def test_the_reference_follows_the_fine_tuning_mode(changes, expected):
    assert resolve_reference(PipelineConfig().replace(objective="dpo", **changes)) == expected


@pytest.mark.timeout(60)
def test_preference_losses_are_their_formulas():
    chosen, rejected = torch.tensor([-10.0, -8.0]), torch.tensor([-12.0, -7.0])
    ref_c, ref_r = torch.tensor([-11.0, -8.5]), torch.tensor([-11.5, -7.5])
    n_c, n_r = torch.tensor([4.0, 5.0]), torch.tensor([2.0, 3.0])
    beta = 0.2
    h = (chosen - ref_c) - (rejected - ref_r)  # [1.5, 0.0]
    losses, rc, rr = preference_losses(
        chosen, rejected, ref_c, ref_r, n_c, n_r, loss_type="sigmoid", beta=beta
    )
    assert torch.allclose(losses, -F.logsigmoid(beta * h))
    assert torch.allclose(rc, beta * (chosen - ref_c)) and torch.allclose(rr, beta * (rejected - ref_r))
    assert float(losses[1]) == pytest.approx(math.log(2))  # no margin: ln 2
    smooth, _, _ = preference_losses(
        chosen, rejected, ref_c, ref_r, n_c, n_r, loss_type="sigmoid", beta=beta, label_smoothing=0.1
    )
    assert torch.allclose(smooth, -0.9 * F.logsigmoid(beta * h) - 0.1 * F.logsigmoid(-beta * h))
    ipo, _, _ = preference_losses(chosen, rejected, ref_c, ref_r, n_c, n_r, loss_type="ipo", beta=beta)
    h_avg = (chosen - ref_c) / n_c - (rejected - ref_r) / n_r
    assert torch.allclose(ipo, (h_avg - 1 / (2 * beta)) ** 2)
    simpo, sc, _ = preference_losses(
        chosen, rejected, None, None, n_c, n_r, loss_type="simpo", beta=2.0, gamma=0.5
    )
    margin = chosen / n_c - rejected / n_r - 0.5 / 2.0
    assert torch.allclose(simpo, -F.logsigmoid(2.0 * margin)) and torch.allclose(sc, 2.0 * chosen / n_c)
    with pytest.raises(ValueError, match="needs reference log-probabilities"):
        preference_losses(chosen, rejected, None, None, n_c, n_r, loss_type="sigmoid", beta=beta)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_row_log_probabilities_equal_the_full_logits_and_their_gradients(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :4] = -100
    labels[1] = -100  # a row without labels: 0
    labels[2, 0] = -100
    full = sequence_logps_from_logits(head(hidden), labels)
    (g_full,) = torch.autograd.grad(full.sum() * 2 + full[2], hidden)
    chunked = chunked_sequence_logps(head, hidden, labels, chunk)
    (g_chunked,) = torch.autograd.grad(chunked.sum() * 2 + chunked[2], hidden)
    assert torch.allclose(chunked, full, atol=1e-5) and float(chunked[1]) == 0.0
    assert torch.allclose(g_chunked, g_full, atol=1e-6)


@pytest.mark.timeout(120)
def test_the_estimate_counts_two_sequences_per_pair_and_a_reference_copy(monkeypatch, repo_root):
    from ftpipe.cli.main import parse
    from ftpipe.estimate.memory import plan

    monkeypatch.chdir(repo_root)
    _, sft = parse(["train", "--config", "configs/benchmark.yaml", "--activation_checkpointing", "false"])
    doubled = plan(sft.replace(micro_batch_size=2 * sft.train.micro_batch_size))
    dpo = plan(sft.replace(objective="dpo"))
    assert dpo.activations == doubled.activations and dpo.reference_weights == 0
    full = plan(sft.replace(objective="dpo", finetuning="full"))
    assert full.reference_weights == full.weights > 0
    cached = plan(sft.replace(objective="dpo", finetuning="full", reference="cached"))
    assert cached.reference_weights == 0 and cached.total == full.total - full.reference_weights


@pytest.mark.timeout(60)
def test_sagemaker_passes_the_objective_through(tmp_path):
    from ftpipe.cli.main import parse
    from ftpipe.sagemaker.entry import hyperparameter_args
    from ftpipe.sagemaker.launch import job_hyperparameters

    cfg = PipelineConfig().replace(
        objective="dpo", dpo_beta=0.25, dpo_loss="ipo", monitor="val_reward_accuracy"
    )
    hps = job_hyperparameters(cfg)
    assert {k: hps[k] for k in ("objective", "dpo_beta", "dpo_loss", "monitor")} == {
        "objective": "dpo",
        "dpo_beta": "0.25",
        "dpo_loss": "ipo",
        "monitor": "val_reward_accuracy",
    }
    _, received = parse(["train", *hyperparameter_args(hps, tmp_path)])
    assert received.objective == ObjectiveConfig(
        objective="dpo", dpo_beta=0.25, dpo_loss="ipo", monitor="val_reward_accuracy"
    )


@pytest.mark.timeout(60)
def test_the_model_card_says_how_the_model_was_trained():
    from ftpipe.export.card import _training_lines

    sft = "\n".join(_training_lines(PipelineConfig(), "x.ckpt"))
    assert "objective: supervised fine-tuning" in sft
    dpo = "\n".join(_training_lines(PipelineConfig().replace(objective="dpo", rpo_alpha=0.5), "x.ckpt"))
    assert (
        "preference tuning (dpo, loss sigmoid, beta 0.1, SFT term on chosen answers (rpo_alpha 0.5))" in dpo
    )
    assert "reference model: the starting model (the adapter disabled)" in dpo
