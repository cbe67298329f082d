"""Errors of the data stage; every message names the file, row or folder and says what to do."""

from __future__ import annotations

from ftpipe.errors import FtpipeError


class DataError(FtpipeError, ValueError):
    """A problem with the data set or its configuration that the user can fix."""


class BadRowError(DataError):
    """``on_bad_row: fail`` met a bad row; the message names the file, the row and the reason."""


class PrepareTimeoutError(FtpipeError, TimeoutError):
    """A rank other than 0 waited longer than ``prepare_timeout_s`` for the prepared data."""


class BadRow(ValueError):
    """One row cannot be used; ``reason`` is a short key counted in the manifest.

    ``fatal`` is False for rows a converter dropped on purpose (returned None): those are counted
    but never stop ``on_bad_row: fail``.
    """

    def __init__(self, reason: str, detail: str, *, fatal: bool = True):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.fatal = fatal


def bad_row_error(source: str, row: str, reason: str, detail: str) -> BadRowError:
    """The ``on_bad_row: fail`` error for one row of one file."""
    return BadRowError(
        f"{source}: {row}: bad row ({reason}): {detail}. Fix the row, or set on_bad_row: skip "
        "to drop bad rows (they are counted per reason in the manifest)."
    )
