"""Errors of ``ftpipe sagemaker launch`` (the CLI prints their message and exits with status 2)."""

from __future__ import annotations

from ftpipe.errors import FtpipeError


class SageMakerLaunchError(FtpipeError):
    """The job cannot be built or submitted as configured; the message names the field and what to do."""


class AWSCredentialsError(SageMakerLaunchError):
    """No AWS credentials (or no AWS region) to submit a job with."""
