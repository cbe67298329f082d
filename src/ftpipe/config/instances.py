"""SageMaker training instance types: the known ones with their GPU counts, checked before a job is built.

The SDK's own GPU table lags behind the instances AWS offers (no g6, g6e, p5e, p5en or p6), and has no
CPU types, so ftpipe keeps its own: the families SageMaker training jobs run on, each size with its
GPUs (0 for CPU instances). An instance type that is not ``ml.<family>.<size>`` is a configuration
error; a well-formed one that is not known gets a warning naming the closest known type (AWS adds
types faster than any table); ``gpus_per_node`` must fit the instance's GPUs.
"""

from __future__ import annotations

import difflib
import re

#: ``ml.<family>.<size>``: lower-case letters, digits and dashes (``ml.p6-b200.48xlarge``).
INSTANCE_TYPE = re.compile(r"^ml\.[a-z][a-z0-9-]*\.[a-z0-9-]+$")


def _sizes(family: str, gpus: dict[str, int]) -> dict[str, int]:
    return {f"ml.{family}.{size}": n for size, n in gpus.items()}


_G_SIZES = {
    "xlarge": 1,
    "2xlarge": 1,
    "4xlarge": 1,
    "8xlarge": 1,
    "16xlarge": 1,
    "12xlarge": 4,
    "24xlarge": 4,
    "48xlarge": 8,
}
_CPU_SIZES = (
    "large",
    "xlarge",
    "2xlarge",
    "4xlarge",
    "8xlarge",
    "9xlarge",
    "12xlarge",
    "16xlarge",
    "18xlarge",
    "24xlarge",
)

#: instance type -> GPUs per instance (0: a CPU instance).
GPUS: dict[str, int] = {
    **_sizes("p3", {"2xlarge": 1, "8xlarge": 4, "16xlarge": 8}),
    **_sizes("p3dn", {"24xlarge": 8}),
    **_sizes("p4d", {"24xlarge": 8}),
    **_sizes("p4de", {"24xlarge": 8}),
    **_sizes("p5", {"4xlarge": 1, "48xlarge": 8}),
    **_sizes("p5e", {"48xlarge": 8}),
    **_sizes("p5en", {"48xlarge": 8}),
    **_sizes("p6-b200", {"48xlarge": 8}),
    **_sizes("g4dn", {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1, "12xlarge": 4}),
    **_sizes("g5", _G_SIZES),
    **_sizes("g6", _G_SIZES),
    **_sizes("g6e", _G_SIZES),
    **{f"ml.{family}.{size}": 0 for family in ("m5", "m6i", "c5", "c6i", "r5") for size in _CPU_SIZES},
}


def instance_problem(instance_type: str) -> str | None:
    """None for a well-formed instance type, else what is wrong with it (for configuration errors)."""
    if INSTANCE_TYPE.match(instance_type):
        return None
    return (
        f"{instance_type!r} is not a SageMaker instance type (ml.<family>.<size>, e.g. ml.p4d.24xlarge or "
        "ml.g5.12xlarge)"
    )


def closest_known(instance_type: str) -> str | None:
    """The known instance type most like ``instance_type`` (None when nothing is close)."""
    matches = difflib.get_close_matches(instance_type, list(GPUS), n=1, cutoff=0.5)
    return matches[0] if matches else None


def gpu_count(instance_type: str) -> int | None:
    """GPUs of one instance (0 for CPU instances); None for a type ftpipe does not know."""
    return GPUS.get(instance_type)
