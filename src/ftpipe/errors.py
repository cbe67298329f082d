"""The base of errors a user can act on: the CLI prints their message, without a traceback."""

from __future__ import annotations


class FtpipeError(Exception):
    """A problem the user can fix; the message names the field, file, row or rank and what to do.

    ``exit_code`` is the command's exit status when this error ends it.
    """

    exit_code: int = 2


class StoppedResumable(FtpipeError):
    """Training was stopped by a signal after saving a checkpoint; running again resumes it."""

    exit_code = 3
