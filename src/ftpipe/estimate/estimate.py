"""``ftpipe estimate``: the expected per-GPU memory of a training run, printed before the run, and with
``plan_gpu`` the run planned on 1 .. ``num_nodes`` nodes of that GPU (``ftpipe.estimate.scale``)."""

from __future__ import annotations

from ftpipe.config.schema import PipelineConfig
from ftpipe.estimate.memory import GIB, MemoryEstimate, plan
from ftpipe.estimate.report import print_estimate
from ftpipe.utils.logging import get_logger

log = get_logger(__name__)


def estimate(cfg: PipelineConfig) -> MemoryEstimate:
    """Estimate the per-GPU memory of training ``cfg`` (``ftpipe.estimate.memory.plan``) and print it as a
    table on stdout.

    Reads only the model's configuration (a local folder holding config.json works offline); no weights
    are loaded.
    """
    result = plan(cfg)
    print_estimate(result)
    if cfg.dist.plan_gpu:
        from ftpipe.estimate.scale import format_plan, scale_plan

        print("\n".join(["", *format_plan(scale_plan(cfg))]), flush=True)
    log.info(
        "estimate: %.2f GiB per %s%s",
        result.total / GIB,
        "GPU" if result.target.device == "cuda" else "process",
        "" if result.fits is None else (" (fits)" if result.fits else " (does not fit)"),
    )
    return result
