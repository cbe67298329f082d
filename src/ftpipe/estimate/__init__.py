"""Memory estimate before a run: ``ftpipe estimate`` (``estimate``), the computation (``memory``), the model's shape from its config without
weights (``shape``), the activation formula (``activations``) and the printed table (``report``)."""

from ftpipe.estimate.estimate import estimate
from ftpipe.estimate.memory import MemoryEstimate

__all__ = ["MemoryEstimate", "estimate"]
