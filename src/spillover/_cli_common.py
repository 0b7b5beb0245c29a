"""Shared pieces of the command-line interface: consoles, error boundary, progress.

Only CLI modules print. Library code reports through logging and callbacks.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .errors import SpilloverError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

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


def handle_errors(func: F) -> F:
    """Turn :class:`SpilloverError` into a one-line message and exit code 1.

    Any other exception is a bug and keeps its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SpilloverError as exc:
            raise fail(str(exc)) from None

    return wrapper  # type: ignore[return-value]


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
