"""The one way tests run the command line: the real ``spillover.cli.app`` under CliRunner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from typer.testing import CliRunner

from spillover.cli import app


def invoke(args: Sequence[str], **kwargs: Any) -> Any:
    """Run ``spillover ARGS`` in-process; returns click's ``Result``."""
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)
