"""The base of errors a user can act on: the CLI prints their message, without a traceback."""

from __future__ import annotations


class FtpipeError(Exception):
    """A problem the user can fix; the message names the field, file, row or rank and what to do."""
