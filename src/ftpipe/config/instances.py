"""SageMaker training instance types and the AWS names of a job, checked before a job is built.

The SDK's own GPU table lags behind the instances AWS offers (no g6, g6e, p5e, p5en or p6), and has no
CPU types, so ftpipe keeps its own: the families SageMaker training jobs run on, each size with its
GPUs (0 for CPU instances). An instance type that is not ``ml.<family>.<size>`` is a configuration
error; a well-formed one that is not known gets a warning naming the closest known type (AWS adds
types faster than any table); ``gpus_per_node`` must fit the instance's GPUs.

The other names of a job follow AWS's rules: an IAM role ARN (or role name), a region name, S3 URIs
(``s3://bucket[/prefix]`` with a valid bucket name) and the training job name SageMaker makes from
``base_job_name`` (the base, underscores as dashes, plus ``-<14-digit timestamp>``).
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


#: An IAM role ARN (any partition, an optional path): ``arn:aws:iam::123456789012:role/name``.
ROLE_ARN = re.compile(r"^arn:aws(-[a-z]+)*:iam::\d{12}:role/([\w+=,.@-]+/)*[\w+=,.@-]{1,64}$", re.ASCII)
#: An IAM role name (the SDK looks it up in IAM to get its ARN).
ROLE_NAME = re.compile(r"^[\w+=,.@-]{1,64}$", re.ASCII)
#: An AWS region name: ``us-east-1``, ``us-gov-west-1``, ``ap-southeast-7``.
REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$", re.ASCII)
#: SageMaker's rule for a training job name (CreateTrainingJob), at most 63 characters.
JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
JOB_NAME_MAX = 63
#: What the SDK appends to ``base_job_name`` (``-%Y%m%d%H%M%S``); the name is cut to 63 characters after it.
JOB_NAME_SUFFIX = "-20250101000000"
#: An S3 bucket name (general purpose buckets): 3-63 lower-case letters, digits, dots and dashes.
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def role_problem(role: str) -> str | None:
    """None for an IAM role ARN or role name, else what is wrong (a user's ARN, a typo)."""
    if ROLE_ARN.match(role) or (not role.startswith("arn:") and ROLE_NAME.match(role)):
        return None
    return (
        f"{role!r} is not an IAM role ARN (a SageMaker job runs as a role: "
        "arn:aws:iam::<12-digit account>:role/<name>, or the role's name)"
    )


def region_problem(region: str) -> str | None:
    """None for a well-formed AWS region name, else what is wrong."""
    if REGION.match(region):
        return None
    return f"{region!r} is not an AWS region name (like us-east-1 or eu-west-2)"


def job_name(base_job_name: str) -> str:
    """A training job name as the SDK makes it from ``base_job_name`` (with a placeholder timestamp)."""
    return (base_job_name.replace("_", "-") + JOB_NAME_SUFFIX)[:JOB_NAME_MAX]


def job_name_problem(base_job_name: str) -> str | None:
    """None when every job name made from ``base_job_name`` is valid and unique (the timestamp fits),
    else what is wrong."""
    longest = JOB_NAME_MAX - len(JOB_NAME_SUFFIX)
    rule = (
        f"1-{longest} letters, digits and dashes (underscores become dashes), starting with a letter or "
        f"digit: SageMaker names the job <base_job_name>-<14-digit timestamp>, at most {JOB_NAME_MAX} "
        "characters"
    )
    if len(base_job_name) > longest:
        return f"{base_job_name!r} has {len(base_job_name)} characters; allowed: {rule}"
    if not JOB_NAME.match(job_name(base_job_name)):
        name = job_name(base_job_name)
        return f"{base_job_name!r} makes the job name {name!r}, which SageMaker refuses; allowed: {rule}"
    return None


def s3_uri_problem(uri: str) -> str | None:
    """None for ``s3://bucket[/prefix]`` with a valid bucket name, else what is wrong."""
    allowed = "allowed: s3://bucket/prefix"
    if not uri.startswith("s3://"):
        return f"{uri!r} is not an S3 URI ({allowed})"
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        return f"{uri!r} names no bucket ({allowed})"
    if (
        not BUCKET.match(bucket)
        or ".." in bucket
        or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket)
        or bucket.startswith("xn--")
    ):
        return (
            f"{uri!r}: {bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, dots and "
            "dashes, starting and ending with a letter or digit)"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in prefix):
        return f"{uri!r}: the prefix after the bucket holds control characters ({allowed})"
    return None
