"""The ``spillover`` command line: a thin layer over the stage packages.

Each command parses its options into the stage's config object, calls one library
function and prints where the artifacts went; it computes nothing itself. One error
boundary (:class:`~spillover.cli._common.ErrorBoundary`) turns every expected failure
into one line. Heavy libraries (torch, transformers) are imported only by the commands
that need them, so ``spillover --help`` starts fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .. import __version__
from ._common import ErrorBoundary, console, quiet_library_output, setup_logging
from .align import align_command, prefs_command
from .data import data_app
from .eval import eval_command
from .report import report_command
from .run import run_command
from .stats import compare_command, metrics_command

app = typer.Typer(
    name="spillover",
    cls=ErrorBoundary,
    help="Measure bias spillover: what aligning a language model on one sensitive attribute "
    "does to fairness on all the others (BBQ benchmark).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # help texts are plain text: "[preset]" and "spillover[vllm]" must print as written
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"spillover {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv for debug).")
    ] = 0,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of any error.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    ctx.obj = {"debug": debug}
    setup_logging(verbose)
    quiet_library_output()


app.add_typer(data_app, name="data")
app.command("run")(run_command)
app.command("eval")(eval_command)
app.command("metrics")(metrics_command)
app.command("prefs")(prefs_command)
app.command("align")(align_command)
app.command("compare")(compare_command)
app.command("report")(report_command)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
