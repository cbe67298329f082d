"""The error of a configuration that cannot run (every module of the configuration raises it)."""

from __future__ import annotations

from ftpipe.errors import FtpipeError


class ConfigError(FtpipeError, ValueError):
    """One or more configuration problems; each names the field and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")
