"""Worker of the model-family table (``test_families.py``), run by torchrun on 2 processes.

For each family of the plan, one after the other in the same two processes: ``ftpipe.train`` with FSDP2
(2 steps, the default LoRA targets unless the plan says otherwise); then rank 0 alone exports the merged
model, reloads it with plain transformers, compares its logits with the adapter model's (the base model
with the checkpoint's LoRA tensors), and estimates the run's memory. What it measured goes to
``<out>/<family>.json``; an exception is recorded there too, and the next family goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

INPUT_IDS = torch.tensor([[1, 504, 3456, 88, 12, 9001, 77, 2], [1, 42, 4242, 17, 600, 31, 5, 900]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits.float()


def _after_training(cfg, trained) -> dict:
    """Rank 0: export, reload, compare, estimate."""
    from transformers import AutoModelForCausalLM

    from ftpipe.estimate.memory import plan
    from ftpipe.export.export import export_model
    from ftpipe.model.adapter import apply_adapter_weights
    from ftpipe.model.checkpoint import read_checkpoint
    from ftpipe.model.lora import apply_lora

    weights = read_checkpoint(trained.last_checkpoint).weights
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    expert_b = {
        k: v for k, v in lora_b.items() if ".experts." in k or k.split(".lora_B")[0].endswith("experts")
    }
    exported = export_model(cfg.replace(checkpoint=trained.last_checkpoint, merge=True))
    merged = AutoModelForCausalLM.from_pretrained(exported.path, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.hf_model_id, dtype=torch.float32)
    base_logits = _logits(base)
    adapter = apply_lora(base, cfg, announce=False)
    apply_adapter_weights(adapter, weights, trained.last_checkpoint)
    adapter_logits, merged_logits = _logits(adapter), _logits(merged)
    estimate = plan(cfg)
    return {
        "steps": trained.global_step,
        "lora_tensors": len(weights),
        "lora_elements": sum(v.numel() for v in weights.values()),
        "lora_b_max": max(float(v.abs().max()) for v in lora_b.values()),
        "expert_lora_b_max": max((float(v.abs().max()) for v in expert_b.values()), default=None),
        "merged_vs_adapter": float((merged_logits - adapter_logits).abs().max()),
        "adapter_vs_base": float((adapter_logits - base_logits).abs().max()),
        "export_architecture": type(merged).__name__,
        "estimate_trainable": estimate.shape.trainable_params,
        "estimate_total": estimate.shape.total_params,
        "estimate_active": estimate.shape.active_params,
        "estimate_experts": estimate.shape.num_experts,
        "estimate_bytes": estimate.total,
        "decoder_layers": estimate.shape.layer_class,
    }


def main(plan_file: str) -> None:
    from ftpipe.config import PipelineConfig
    from ftpipe.train.run import train
    from ftpipe.utils.world import global_rank

    spec = json.loads(Path(plan_file).read_text())
    out = Path(spec["out"])
    for index, family in enumerate(spec["families"]):
        name = family["name"]
        # a store of its own per family: torchrun's agent store keeps the first group's keys, so a second
        # process group on it never forms
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        os.environ["MASTER_PORT"] = str(spec["first_port"] + index)
        start = time.monotonic()
        record: dict = {"name": name}
        cfg = PipelineConfig.from_flat(
            {
                **spec["common"],
                "hf_model_id": family["folder"],
                "results_dir": str(out / name / "results"),
                "export_dir": str(out / name / "export"),
                **family.get("overrides", {}),
            }
        )
        try:
            trained = train(cfg)
            record["train_s"] = time.monotonic() - start
            if trained.rank == 0:
                record.update(_after_training(cfg, trained))
        except Exception as err:  # recorded: the next family still runs
            record["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        record["seconds"] = time.monotonic() - start
        if global_rank() == 0 or "error" in record:
            (out / f"{name}.rank{global_rank()}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
