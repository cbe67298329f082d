"""Fixtures of the configuration tests."""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

from ftpipe.cli.main import build_parser


@pytest.fixture(scope="module")
def cli_parser() -> ArgumentParser:
    """The whole ``ftpipe`` parser, built once per test module: the tests that only parse share it."""
    return build_parser()
