"""Training objectives: a registry of name -> objective class (``ftpipe.objectives.base.Objective``).

A new objective is a module in this package that subclasses ``Objective``, and a line here.
"""

from __future__ import annotations

import importlib

from ftpipe.config.schema import PipelineConfig
from ftpipe.objectives.base import LossParts, Objective, PolicyModel

#: ``objective`` config value -> ``module:class`` (imported when used).
OBJECTIVES: dict[str, str] = {
    "sft": "ftpipe.objectives.sft:SFTObjective",
    "dpo": "ftpipe.objectives.dpo:DPOObjective",
}


def get_objective(cfg: PipelineConfig) -> Objective:
    """The objective of ``cfg`` (``objective`` field)."""
    name = cfg.objective.objective
    if name not in OBJECTIVES:
        raise ValueError(f"objective: {name!r} is not one of {sorted(OBJECTIVES)}")
    module, _, cls = OBJECTIVES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)


__all__ = ["OBJECTIVES", "LossParts", "Objective", "PolicyModel", "get_objective"]
