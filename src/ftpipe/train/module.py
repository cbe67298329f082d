"""The one LightningModule of every objective: the model, its forwards, the step, AdamW, checkpoints.

What differs between objectives (records, batches, the loss) is the objective's
(``ftpipe.objectives``); this module keeps what does not differ. A training step reads in two places:

* ``training_step``: ``parts = objective.loss(self, batch)`` (the objective calls this module's
  forwards: ``token_loss_sum``, ``sequence_logps``, ``reference_logps``), then
  ``steps.add(counts)`` and the backward of the micro-batch's loss SUM;
* ``on_before_optimizer_step`` (after the last micro-batch's backward, before the update):
  ``steps.complete(...)``: the all-reduced units, the gradients rescaled to the unit mean, the global
  gradient norm and clipping, the skip decision (``ftpipe.train.step.OptimizerStep``). Lightning's own
  clipping hook does nothing.

Checkpoints of LoRA runs hold only the trainable weights (and their optimizer state), not the frozen
base model. The module's ``state_dict`` leaves out frozen parameters when called as the root module:
single device and DDP save ``lightning_module.state_dict()``, and FSDP2's ``get_model_state_dict``
calls it for saving *and* for the keys it asks a distributed checkpoint for when loading. Under FSDP1
the module is wrapped and FSDP's own state-dict hooks need every key, so a hook registered on the FSDP
root after FSDP's (it runs last) drops the frozen keys from the sharded state dict, again for saving
and loading alike. ``strict_loading`` is off for LoRA: resuming loads the adapters and the optimizer
state into a freshly loaded base model. ``on_save_checkpoint`` adds ftpipe's metadata (configuration,
finetuning mode) under ``ftpipe``.

The loss itself is computed by ``ftpipe.train.loss.ChunkedLossHead`` inside the model's forward, over
labelled positions only and ``loss_chunk_size`` of them at a time (no full-vocabulary logits of the
batch): the token-loss sum for SFT, per-row log-probability sums for preference objectives;
``loss_chunk_size: 0``, or a model whose logits fail the check at the first forward, uses the
model's own logits. Reference log-probabilities come from the batch (``reference: cached``, computed
once before training by ``ftpipe.train.reference``), the policy with its LoRA adapter disabled, or a
frozen copy built and sharded like the policy (kept out of the module tree: no optimizer state, no
checkpoint entries). Packed batches (``position_ids``, no attention mask) are passed
through as they are; the same first-forward check makes sure packed samples do not see each other.

Non-finite steps. ``OptimizerStep.complete`` (the last thing before the optimizer update, after
the closure and the gradient rescaling) checks the step's loss and its global gradient norm. Both
are the same on every rank (the loss is all-reduced, the norm is global; a NaN on one rank makes both
NaN everywhere), so every rank takes the same decision without another collective. A step with a
non-finite value is skipped: its gradients are set to None, so the optimizer's step changes neither
the weights nor its moments (AdamW skips parameters without a gradient). The skipped step still
counts in ``global_step`` and advances the learning-rate schedule. It is logged as a warning and in
the step metrics (``StepStats.skipped`` / ``nonfinite_steps``); ``max_nonfinite_steps`` skipped steps
in a row raise :class:`ftpipe.train.step.NonFiniteError` on every rank at the same step. Under ``16-mixed`` the gradient
scaler skips overflowing steps itself (normal while it calibrates the scale): only the loss is checked
there. Fault injection for tests: ``inject_nan_steps`` (the ``debug`` section, global steps, 1-based)
multiplies the loss of those steps by NaN on rank 0.
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from typing import Any

import lightning.pytorch as pl
import torch

from ftpipe.config.schema import PipelineConfig
from ftpipe.data.errors import DataError
from ftpipe.data.tokenize import IGNORE_INDEX
from ftpipe.model.recompute import recompute_saved
from ftpipe.objectives import LossParts, Objective, get_objective
from ftpipe.train.faults import NO_FAULTS, Faults
from ftpipe.train.loss import (
    ChunkedLossHead,
    check_model_numerics,
    pair_attention_mask,
    sequence_logps_from_logits,
    shifted_token_loss_sum,
)
from ftpipe.train.optim import (
    build_optimizer,
    build_scheduler,
    clean_param_name,
    no_decay_names,
    param_groups,
)
from ftpipe.train.step import COUNTS, OptimizerStep, micro_batch_counts
from ftpipe.utils.logging import get_logger
from ftpipe.utils.world import all_reduce

log = get_logger(__name__)

#: Key of ftpipe's own metadata in a checkpoint.
CHECKPOINT_META_KEY = "ftpipe"


class _ExpectedMissingFilter(logging.Filter):
    """Drops FSDP1's "Did not find param" warnings for frozen parameters (absent from LoRA checkpoints
    on purpose); a missing trainable parameter is still reported."""

    def __init__(self, trainable: set[str]):
        super().__init__()
        self.trainable = trainable

    def filter(self, record: logging.LogRecord) -> bool:
        match = re.search(r"Did not find param with FQN (\S+?),", record.getMessage())
        return match is None or clean_param_name(match.group(1)) in self.trainable


class FineTuneModule(pl.LightningModule):
    """Fine-tuning of the model that ``ftpipe.distributed.build.create_model`` builds, for any objective.

    Args:
        cfg: the pipeline configuration (model, LoRA, training and distribution sections are used).
        faults: the faults to inject (tests of the failure handling; none by default).
        steps: the optimizer-step accounting, shared with the callbacks that act on step boundaries
            (a new one when not given).
        objective: what is optimised (``cfg``'s objective when not given).
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        faults: Faults = NO_FAULTS,
        steps: OptimizerStep | None = None,
        objective: Objective | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.objective = objective if objective is not None else get_objective(cfg)
        self.model: torch.nn.Module | None = None
        self.lora = cfg.model.finetuning == "lora"
        # LoRA checkpoints hold only the adapters: loading them leaves the base weights as loaded.
        self.strict_loading = not self.lora
        self.total_params = 0
        self.trainable_params = 0
        self._no_decay: set[str] = set()
        self._trainable_names: set[str] = set()
        self.steps = (
            steps
            if steps is not None
            else OptimizerStep(cfg.train.max_nonfinite_steps, self.objective.metric_names)
        )
        # COUNTS and metric sums of the validation (this rank)
        self._val_acc = torch.zeros(len(COUNTS) + len(self.objective.metric_names), dtype=torch.float64)
        self._reference_head: ChunkedLossHead | None = None
        self._model_sums_loss: bool | None = None  # does the model honour num_items_in_batch?
        self._loss_head: ChunkedLossHead | None = None
        self._numerics_checked = False
        self.last_val_loss: float | None = None
        #: the objective's validation metrics (``val_<name>``) of the last validation
        self.last_val_metrics: dict[str, float] = {}
        self.faults = faults
        if faults.nan_steps:
            log.warning("fault injection: NaN loss on rank 0 at step(s) %s", sorted(faults.nan_steps))

    # ------------------------------------------------------------------ model

    def configure_model(self) -> None:
        """Build the model once (under FSDP2 sharded over Lightning's device mesh)."""
        if self.model is not None:
            return
        from ftpipe.distributed.build import create_model
        from ftpipe.model.stats import parameter_stats

        # The same seed right before building gives the same adapter initialisation whatever the
        # strategy; the global RNG (dropout, data order) is left as seed_everything set it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            model = create_model(self.cfg, device_mesh=self.device_mesh, strategy_kind=self.cfg.dist.strategy)
        stats = parameter_stats(model)  # before FSDP1 flattens anything
        self.total_params, self.trainable_params = stats.total, stats.trainable
        self._no_decay = no_decay_names(model.named_parameters())
        self._trainable_names = {
            "model." + clean_param_name(n) for n, p in model.named_parameters() if p.requires_grad
        }
        model.train()  # from_pretrained returns the model in eval mode; Lightning keeps a module's mode
        if self.cfg.train.loss_chunk_size > 0:
            self._loss_head = ChunkedLossHead(model, self.cfg.train.loss_chunk_size)
        self.model = model
        if self.objective.reference == "copy":
            self._build_reference_copy()

    def _build_reference_copy(self) -> None:
        """A frozen copy of the starting model, built and sharded like the policy, outside the module tree
        (no optimizer state, no checkpoint entries, not wrapped again by the strategy)."""
        from ftpipe.distributed.build import create_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            reference = create_model(
                self.cfg, device_mesh=self.device_mesh, strategy_kind=self.cfg.dist.strategy
            )
        reference.requires_grad_(False)
        reference.eval()
        if self.cfg.dist.strategy in ("single", "ddp"):
            reference.to(self.device)
        if self.cfg.train.loss_chunk_size > 0:
            self._reference_head = ChunkedLossHead(reference, self.cfg.train.loss_chunk_size)
        object.__setattr__(self, "_reference_model", reference)
        log.info("reference: a frozen copy of the starting model (%s)", self.cfg.dist.strategy)

    def on_fit_start(self) -> None:
        """``reference: cached``: the reference log-probabilities of every pair, before the first update."""
        if self.objective.reference == "cached" and self._trainer is not None:
            from ftpipe.train.reference import attach_cached_reference

            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None or getattr(datamodule, "prepared", None) is None:
                raise RuntimeError("reference: cached needs the training data module (ftpipe train)")
            attach_cached_reference(self, datamodule)

    def _require_model(self) -> torch.nn.Module:
        if self.model is None:
            raise RuntimeError("FineTuneModule.model is not built: the Trainer calls configure_model() first")
        return self.model

    # ------------------------------------------------------------------ loss

    def _check_numerics(self) -> None:
        """Once, at the first forward: the chunked loss matches the model's logits, packed samples are
        isolated (see ``ftpipe.train.loss``)."""
        self._numerics_checked = True
        packing = self.cfg.data.packing
        shared = bool(getattr(self.objective, "share_prompt", False))
        if self._loss_head is None and not packing and not shared:
            return
        report = check_model_numerics(
            self._require_model(),
            self._loss_head,
            packing=packing,
            device=self.device,
            per_sequence=self.objective.sequences_per_sample > 1,
            shared_prompt=shared,
        )
        if report.chunked_loss_ok is False:
            log.warning(
                "the chunked loss differs from the cross-entropy of %s's own logits (relative %.3g; the model "
                "post-processes its logits?): using the model's loss over full logits (more memory)",
                type(self.model).__name__,
                report.loss_rel_diff,
            )
            self._loss_head.remove()
            self._loss_head = None
            if self._reference_head is not None:
                self._reference_head.remove()
                self._reference_head = None
        if self.global_rank == 0:
            log.info(
                "loss: %s; packing: %s",
                "chunked" if self._loss_head else "full logits",
                "off"
                if report.packing_rel_diff is None
                else f"samples isolated (relative logit difference {report.packing_rel_diff:.2g}, "
                f"{report.packing_cross_rel_diff:.2g} without isolation)",
            )

    @staticmethod
    def _inputs(batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> dict[str, Any]:
        mask = batch.get("attention_mask")
        if "pair_segments" in batch:  # one row per pair, the prompt once (ftpipe.data.pairs)
            mask = pair_attention_mask(model, batch["pair_segments"])
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": mask,
            "position_ids": batch.get("position_ids"),
            "use_cache": False,
        }

    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row: the summed log-probability of its labelled tokens under the policy (fp32, with
        gradients), chunked over the labelled positions or from the model's logits."""
        model = self._require_model()
        if not self._numerics_checked:
            self._check_numerics()
        return self._logps(model, self._loss_head, batch)

    def _logps(
        self, model: torch.nn.Module, head: ChunkedLossHead | None, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        saved = recompute_saved() if self.cfg.dist.recompute_elementwise else nullcontext()
        if head is not None:
            with saved, head.targets(batch["labels"], per_sequence=True):
                return model(**self._inputs(batch, model)).logits.reshape(-1)
        with saved:
            logits = model(**self._inputs(batch, model)).logits
        return sequence_logps_from_logits(logits, batch["labels"])

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row: the summed label log-probability under the reference (no gradients): the batch's
        cached values, a frozen copy, or the policy with its LoRA adapter disabled."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        kind = self.objective.reference
        model = self._require_model()
        if not self._numerics_checked:
            self._check_numerics()
        if kind == "copy":
            return self._logps(self.__dict__["_reference_model"], self._reference_head, batch)
        if kind == "adapter":
            with model.disable_adapter():
                return self._logps(model, self._loss_head, batch)
        raise RuntimeError(
            f"reference {kind!r}: the batch carries no cached reference log-probabilities (ref_logps)"
        )

    def token_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the token losses of one micro-batch (no KV cache): chunked over the labelled positions,
        or the model's own loss."""
        model = self._require_model()
        if not self._numerics_checked:
            self._check_numerics()
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch.get("attention_mask"),
            "position_ids": batch.get("position_ids"),
            "use_cache": False,
        }
        # cheap elementwise outputs are kept as their inputs and recomputed in the backward pass
        saved = recompute_saved() if self.cfg.dist.recompute_elementwise else nullcontext()
        if self._loss_head is not None:
            with saved, self._loss_head.targets(batch["labels"]):
                return model(**inputs).logits.reshape(())
        with saved:
            out = model(
                **inputs,
                labels=batch["labels"],
                num_items_in_batch=1,  # the model's loss function then returns the sum over tokens
            )
        if self._model_sums_loss is None:  # checked once: a model that ignores it would average
            with torch.no_grad():
                reference = shifted_token_loss_sum(out.logits, batch["labels"])
            self._model_sums_loss = bool(
                out.loss is not None
                and torch.allclose(out.loss.detach().float(), reference, rtol=1e-3, atol=1e-3)
            )
            if not self._model_sums_loss:
                log.warning(
                    "%s does not return a summed loss for num_items_in_batch=1; "
                    "computing the token-sum loss from its logits instead",
                    type(model).__name__,
                )
        if self._model_sums_loss:
            return out.loss
        return shifted_token_loss_sum(out.logits, batch["labels"])

    def _counts(self, batch: dict[str, torch.Tensor], parts: LossParts) -> torch.Tensor:
        """The micro-batch's ``COUNTS`` and metric sums (float64, on device; see ``micro_batch_counts``)."""
        loss_sum = parts.loss_sum
        label_tokens = batch.get("num_label_tokens")
        if label_tokens is None:
            label_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        tokens = batch.get("num_tokens")
        if tokens is None:
            tokens = batch["attention_mask"].sum()
        padded = torch.tensor(batch["input_ids"].numel(), device=loss_sum.device)
        metrics = [parts.metrics[name] for name in self.objective.metric_names]
        return micro_batch_counts(loss_sum, parts.units, tokens, padded, label_tokens, metrics)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        parts = self.objective.loss(self, batch)
        if self.global_rank == 0 and self.faults.poisons(self.trainer.global_step + 1):
            parts.loss_sum = parts.loss_sum * float("nan")
        self.steps.add(self._counts(batch, parts))
        return parts.loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step's end (``OptimizerStep.complete``): gradients of summed losses -> of the unit mean,
        global norm and clipping, the skip of a non-finite step (see the module doc)."""
        trainer = self.trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        stats = self.steps.complete(
            optimizer,
            step=trainer.global_step + 1,
            accumulate=trainer.accumulate_grad_batches,
            world_size=trainer.world_size,
            device=self.device,
            root=trainer.strategy.model,
            max_norm=self.cfg.train.gradient_clip_val,
            check_norm=scaler is None,  # the gradient scaler skips overflowing 16-mixed steps itself
        )
        # the same values on every rank: every rank skips (or raises) at the same step
        if stats.skipped and self.global_rank == 0:
            log.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s): optimizer update skipped "
                "(%d in a row, %d in total; max_nonfinite_steps %d in a row stops training)",
                stats.step,
                stats.loss,
                stats.grad_norm,
                len(self.steps.nonfinite.in_a_row),
                self.steps.nonfinite.total,
                self.steps.nonfinite.max_in_a_row,
            )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Nothing: clipping is part of the step's end (``on_before_optimizer_step``)."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        stats = self.steps.just_completed()
        if stats is None:
            return  # still accumulating
        metrics = {"train_loss": stats.loss, "lr": stats.lr or 0.0}
        if stats.grad_norm is not None:
            metrics["grad_norm"] = stats.grad_norm
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        self.log("nonfinite_steps", float(stats.nonfinite_steps), on_step=True, on_epoch=False, batch_size=1)
        if stats.metrics:
            self.log_dict(stats.metrics, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        self._val_acc = torch.zeros(
            len(COUNTS) + len(self.objective.metric_names), dtype=torch.float64, device=self.device
        )

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        parts = self.objective.loss(self, batch)
        self._val_acc = self._val_acc.to(parts.loss_sum.device) + self._counts(batch, parts)

    def on_validation_epoch_end(self) -> None:
        totals = all_reduce(self._val_acc.to(self.device)).cpu()
        loss_sum, units = float(totals[0]), float(totals[1])
        if units == 0:
            raise DataError(
                f"validation saw no {self.objective.unit}s of the loss (every validation sample has an empty "
                "or cut answer): check val_ratio, limit_val_batches and max_seq_length"
            )
        val_loss = torch.tensor(loss_sum / units, dtype=torch.float32)
        self.last_val_loss = float(val_loss)  # the value the checkpoint and early-stopping callbacks compare
        # The values are already the same on every rank: no further sync.
        self.log("val_loss", val_loss, prog_bar=True, sync_dist=False)
        sums = totals[len(COUNTS) :]
        self.last_val_metrics = {
            f"val_{name}": float(value) / units
            for name, value in zip(self.objective.metric_names, sums, strict=True)
        }
        if "val_rewards/accuracies" in self.last_val_metrics:
            self.last_val_metrics["val_reward_accuracy"] = self.last_val_metrics["val_rewards/accuracies"]
        for name, value in self.last_val_metrics.items():
            self.log(
                name,
                torch.tensor(value, dtype=torch.float32),
                prog_bar=name == "val_reward_accuracy",
                sync_dist=False,
            )

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        model = self._require_model()
        self._register_fsdp1_hook()  # the strategy has wrapped the module by now
        groups = param_groups(model.named_parameters(), self.cfg.train.weight_decay, self._no_decay)
        optimizer = build_optimizer(groups, self.cfg.train, self.device.type)
        scheduler = build_scheduler(optimizer, self.cfg.train)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Without the frozen base weights for LoRA when called as the root module (see module doc)."""
        state = super().state_dict(*args, **kwargs)
        as_root = not args and not kwargs.get("prefix") and kwargs.get("destination") is None
        if self.lora and as_root and self._trainable_names:
            state = self._drop_frozen(state)
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_META_KEY] = {
            "config": self.cfg.to_flat(),
            "objective": self.objective.name,
            "finetuning": self.cfg.model.finetuning,
            "trainable_only": self.lora,
            "state_dict_prefix": "model.",
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "nonfinite": self.steps.nonfinite.state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume the count of non-finite steps (and the current run of them) with the training state."""
        state = checkpoint.get(CHECKPOINT_META_KEY, {}).get("nonfinite")
        if state is not None:
            self.steps.nonfinite.load(state)

    def _drop_frozen(self, state: dict[str, Any]) -> dict[str, Any]:
        return type(state)((k, v) for k, v in state.items() if clean_param_name(k) in self._trainable_names)

    def _drop_frozen_in_place(self, state: dict[str, Any]) -> None:
        for key in [k for k in state if clean_param_name(k) not in self._trainable_names]:
            del state[key]

    def _register_fsdp1_hook(self) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = self.trainer.strategy.model
        if self.lora and isinstance(root, FSDP) and not getattr(root, "ftpipe_lora_filter", False):
            # Runs after FSDP1's own post-state-dict hook on the root (registered earlier), so FSDP has
            # seen every key before the frozen ones go; only the root's whole state (prefix "") is cut.
            def drop_frozen(module: torch.nn.Module, state: dict, prefix: str, *args: Any) -> None:
                if not prefix:
                    self._drop_frozen_in_place(state)

            root.register_state_dict_post_hook(drop_frozen)
            root.ftpipe_lora_filter = True
            # Loading such a checkpoint, FSDP1 warns once per frozen parameter it does not find.
            logging.getLogger("torch.distributed.fsdp._state_dict_utils").addFilter(
                _ExpectedMissingFilter(self._trainable_names)
            )


#: The module's name before objectives existed (SFT is the default objective).
SFTModule = FineTuneModule
