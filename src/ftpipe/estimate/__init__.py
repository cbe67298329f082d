"""Memory estimate before a run: ``ftpipe estimate`` (``memory``), the model's shape from its config without
weights (``shape``), the activation formula (``activations``) and the printed table (``report``)."""

from ftpipe.estimate.memory import MemoryEstimate, estimate

__all__ = ["MemoryEstimate", "estimate"]
