"""Shared pieces of the command-line interface: consoles, the error boundary, progress.

Only CLI modules print. Library code reports through logging and callbacks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from typer.core import TyperGroup

from ..errors import SpilloverError

console = Console()
err_console = Console(stderr=True)


def print_table(table: Any) -> None:
    """Print a table on :data:`console`; off a terminal (a log, a pipe) at its natural width,
    so names are not cut to ``…`` at rich's default 80 columns."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    width = console.width  # rich caps print(width=...) at the console's own width
    console.width = max(width, natural)
    try:
        console.print(table)
    finally:
        console.width = width


DEBUG_ENV = "SPILLOVER_DEBUG"
"""Set to 1 to see the traceback of every error (as ``--debug`` does)."""

BBQDirOption = Annotated[
    Path | None,
    typer.Option(
        "--bbq-dir",
        help="Folder holding BBQ (flat or upstream layout). Default: $SPILLOVER_BBQ_DIR, "
        "else the cache, else download.",
        envvar="SPILLOVER_BBQ_DIR",
        show_default=False,
    ),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Cache root (BBQ in <root>/bbq, models in <root>/models). "
        "Default: $SPILLOVER_CACHE or ~/.cache/spillover.",
        envvar="SPILLOVER_CACHE",
        show_default=False,
    ),
]
AllowUnverifiedOption = Annotated[
    bool,
    typer.Option(
        "--allow-unverified",
        help="Accept BBQ files whose SHA-256 differs from the pinned release (a warning is "
        "recorded in every output).",
    ),
]


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise."""
    one_line = " ".join(message.split())
    # messages carry paths, dataset text and shell hints ("spillover[vllm]"): never markup
    err_console.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


class ErrorBoundary(TyperGroup):
    """The command group that turns every expected failure into one line and exit code 1.

    A :class:`~spillover.errors.SpilloverError` raised anywhere below the group is
    printed as ``error: <message>``. So are the failures the environment or the input
    can cause in any code, including code not written yet, through
    :func:`environment_error`: OS errors (a path that cannot be read or written),
    undecodable text, input nested too deeply, numbers out of range, memory exhausted.
    Anything else is a bug and keeps its traceback. ``--debug`` (or
    ``$SPILLOVER_DEBUG=1``) re-raises every error with its traceback.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except SpilloverError as exc:
            if debugging(ctx):
                raise
            raise fail(str(exc)) from None
        except (OSError, UnicodeError, RecursionError, OverflowError, MemoryError) as exc:
            if debugging(ctx):
                raise
            raise fail(environment_error(exc)) from None
        except KeyboardInterrupt:
            if debugging(ctx):
                raise
            err_console.print("[bold red]interrupted[/]; completed stages and shards are kept")
            raise typer.Exit(code=130) from None


def environment_error(exc: BaseException) -> str:
    """The one-line message for an OS, decoding, recursion, overflow or memory error."""
    if isinstance(exc, OSError):
        names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, IsADirectoryError):
            hint = "expected a file, not a folder"
        elif isinstance(exc, NotADirectoryError):
            hint = "a part of the path is a file, not a folder"
        elif isinstance(exc, PermissionError):
            hint = "check the permissions, or choose another path"
        elif isinstance(exc, FileNotFoundError):
            hint = "check the path (its folder must exist)"
        else:
            hint = "check the path, the disk and the permissions"
        where = " -> ".join(names) if names else "a file or folder"
        return f"{where}: {reason}; {hint}"
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"a file is not valid {exc.encoding} text (byte {exc.object[exc.start : exc.start + 1]!r} "
            f"at offset {exc.start}: {exc.reason}); save it as UTF-8"
        )
    if isinstance(exc, UnicodeError):
        return f"text could not be encoded or decoded ({exc}); use UTF-8 files and paths"
    if isinstance(exc, RecursionError):
        return "an input is nested too deeply to read (JSON or YAML depth); flatten it"
    if isinstance(exc, OverflowError):
        return f"a number is out of range ({exc}); use a smaller value"
    return (
        "ran out of memory; use a smaller selection, batch or bootstrap size, or a machine "
        "with more memory"
    )


def debugging(ctx: Any = None) -> bool:
    """Whether tracebacks were asked for (``--debug`` or ``$SPILLOVER_DEBUG``)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


def warn(message: str) -> None:
    """Print a warning line on stderr."""
    err_console.print(
        f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True
    )


@contextmanager
def download_progress() -> Iterator[Callable[[str, int, int | None], None]]:
    """A rich progress display usable as a download ``progress`` callback."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def callback(label: str, done: int, total: int | None) -> None:
        if label not in tasks:
            tasks[label] = progress.add_task(label, total=total)
        progress.update(tasks[label], completed=done, total=total)

    with progress:
        yield callback


def setup_logging(verbose: int) -> None:
    """Route library logging through rich at a level chosen by ``-v``."""
    from rich.logging import RichHandler

    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    if verbose <= 0:
        # transformers and friends are chatty at INFO; keep their warnings
        for name in ("transformers", "datasets", "accelerate", "peft", "trl"):
            logging.getLogger(name).setLevel(logging.ERROR)


def path_text(value: Path | None) -> str | None:
    """A path option as the string a config field holds."""
    return str(value) if value is not None else None
