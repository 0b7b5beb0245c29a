"""Shared pieces of the command-line interface: consoles, the error boundary, progress
(rich bars on a terminal, periodic lines in logs and pipes).

Only CLI modules print. Library code reports through logging and callbacks.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from typer.core import TyperGroup

from ..errors import ConfigError, SpilloverError

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
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder holding one sub-folder per benchmark (crows-pairs/, stereoset/, "
        "winobias/, winogender/), or one benchmark's files. Default: $SPILLOVER_DATA_DIR, "
        "else the cache, else download. BBQ is read from --bbq-dir.",
        envvar="SPILLOVER_DATA_DIR",
        show_default=False,
    ),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Cache root (BBQ in <root>/bbq, each other benchmark in <root>/<name>, models "
        "in <root>/models). "
        "Default: $SPILLOVER_CACHE or ~/.cache/spillover.",
        envvar="SPILLOVER_CACHE",
        show_default=False,
    ),
]
AllowUnverifiedOption = Annotated[
    bool,
    typer.Option(
        "--allow-unverified",
        help="Accept data files whose SHA-256 differs from the pinned release (a warning is "
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
    The GPU's failures are expected too (:func:`accelerator_error`): torch's
    ``OutOfMemoryError`` and vLLM's dead engine, each with the setting to turn.
    Anything else is a bug and keeps its traceback. ``--debug`` (or
    ``$SPILLOVER_DEBUG=1``) re-raises every error with its traceback.

    Under a multi-process launch (``accelerate launch``, torchrun) a failing process ends at
    once (:func:`failed`), so that the launcher tears the others down instead of leaving them
    waiting in a collective.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except SpilloverError as exc:
            if debugging(ctx):
                raise
            raise failed(str(exc)) from None
        except (OSError, UnicodeError, RecursionError, OverflowError, MemoryError) as exc:
            if debugging(ctx):
                raise
            raise failed(environment_error(exc)) from None
        except Exception as exc:
            message = accelerator_error(exc)
            if message is None or debugging(ctx):
                raise
            raise failed(message) from None
        except KeyboardInterrupt:
            if debugging(ctx):
                raise
            err_console.print("[bold red]interrupted[/]; completed stages and shards are kept")
            raise typer.Exit(code=130) from None


def launched_processes(env: Any = None) -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 outside a launch)."""
    env = os.environ if env is None else env
    value = str(env.get("WORLD_SIZE", "")).strip()
    return int(value) if value.isdigit() else 1


def failed(message: str) -> typer.Exit:
    """:func:`fail`; under a multi-process launch, print and end this process now.

    A process that fails alone (a GPU out of memory on one rank) would otherwise leave the
    others blocked in their next NCCL collective until its timeout, and its own exit can
    block in the process group's teardown. ``os._exit`` skips that teardown; the launcher
    (torchrun's agent, which ``accelerate launch`` runs) sees the non-zero exit and stops
    the other processes. Every ``finally`` on the way here has already run.
    """
    exit_ = fail(message)
    if launched_processes() > 1:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(exit_.exit_code)
    return exit_


VLLM_ENGINE_ERRORS: tuple[str, ...] = ("EngineDeadError", "EngineGenerateError")
"""vLLM's exceptions of a failed engine (``vllm/v1/engine/exceptions.py``), matched by name:
vLLM is optional and never imported here."""


def accelerator_error(exc: BaseException) -> str | None:
    """The one-line message for a GPU failure, naming the settings to turn; None otherwise.

    torch's ``OutOfMemoryError`` (a ``RuntimeError``) from training or scoring, and vLLM's
    dead engine (its engine process failed, most often out of GPU memory).
    """
    text = " ".join(str(exc).split())
    first = text if len(text) <= 300 else text[:299] + "…"
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(oom, type) and isinstance(exc, oom):
        return (
            f"the GPU ran out of memory ({first}); training: a smaller --batch-size with a "
            "larger --grad-accum (align.batch_size, align.grad_accum: the same effective "
            "batch), --gradient-checkpointing, or --load-in-4bit; scoring: a smaller "
            "--batch-tokens (eval.batch_tokens); beside a vLLM engine: a smaller "
            "--gpu-memory-utilization (eval.gpu_memory_utilization)"
        )
    names = {c.__name__ for c in type(exc).__mro__}
    if names & set(VLLM_ENGINE_ERRORS):
        return (
            f"vLLM's engine stopped ({type(exc).__name__}: {first or 'no message'}); the "
            "engine's own log above says why; out of GPU memory: a smaller "
            "--max-num-batched-tokens (eval.max_num_batched_tokens) or --max-model-len "
            "(eval.max_model_len), or a smaller --gpu-memory-utilization "
            "(eval.gpu_memory_utilization) when other work shares the GPU"
        )
    return None


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


PROGRESS_ENV = "SPILLOVER_PROGRESS_SECONDS"
"""Seconds between two progress lines off a terminal (0: a line per update)."""
PROGRESS_SECONDS = 30.0
"""The default of :data:`PROGRESS_ENV`."""


def progress_seconds() -> float:
    """The interval between progress lines: ``$SPILLOVER_PROGRESS_SECONDS`` or 30.

    Raises:
        ConfigError: the variable is not a number of seconds >= 0.
    """
    raw = os.environ.get(PROGRESS_ENV, "").strip()
    if not raw:
        return PROGRESS_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"${PROGRESS_ENV}={raw!r}; expected a number of seconds >= 0 (e.g. 30)")
    return value


def clock(seconds: float) -> str:
    """A duration as ``42s``, ``3m05s`` or ``2h07m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class _LineTask:
    label: str
    total: float | None
    started: float
    unit: str
    done: float = 0.0
    note: str = ""
    printed: float = 0.0
    """When the last line was printed (the start at first)."""
    printed_done: float = 0.0
    """What was done then: the rate is the rate since that line."""


class Bars:
    """Progress of named tasks: rich bars on a terminal, plain lines anywhere else.

    Off a terminal (a log file, a pipe, SLURM, CI) a task prints one line when it starts, a
    line with done / total, rate and ETA at most every :func:`progress_seconds` (the rate
    since the previous line; the first line has none, as its window holds the start-up), and
    one line when it finishes, with its time. Rich columns may show ``{task.fields[note]}``.
    """

    def __init__(
        self,
        *columns: str | ProgressColumn,
        console: Console = err_console,
        transient: bool = False,
        unit: str = "items",
    ) -> None:
        self.console = console
        self.unit = unit
        self.live = console.is_terminal
        self.interval = progress_seconds()
        self.rich = Progress(*columns, console=console, transient=transient) if self.live else None
        self._lines: dict[int, _LineTask] = {}

    def __enter__(self) -> Bars:
        if self.rich is not None:
            self.rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.stop()

    def add(
        self, label: str, total: float | None = None, note: str = "", unit: str | None = None
    ) -> int:
        """Start a task (counted in ``unit``, default the display's); returns its id."""
        if self.rich is not None:
            return int(self.rich.add_task(label, total=total, note=note))
        task = len(self._lines)
        now = time.monotonic()
        line = _LineTask(label, total, now, unit or self.unit, printed=now)
        self._lines[task] = line
        size = f" ({self._qty(line, total)})" if total else ""
        self._say(f"{label}: started{size}")
        return task

    def update(
        self, task: int, completed: float, total: float | None = None, note: str | None = None
    ) -> None:
        """Set a task's progress (``total`` None: unchanged, ``note``: e.g. the loss)."""
        if self.rich is not None:
            fields: dict[str, Any] = {} if note is None else {"note": note}
            self.rich.update(TaskID(task), completed=completed, total=total, **fields)
            return
        line = self._lines[task]
        now = time.monotonic()
        line.total = total if total is not None else line.total
        line.note = line.note if note is None else note
        line.done = completed
        if now - line.printed >= self.interval and completed != line.printed_done:
            self._say(self._status(line, now))
            line.printed, line.printed_done = now, completed

    def finish(self, task: int, note: str = "") -> None:
        """End a task: its bar full; off a terminal, a line with its time."""
        if self.rich is not None:
            state = self.rich.tasks[task]
            end = state.total or state.completed or 1
            self.rich.update(TaskID(task), total=end, completed=end, note=note)
            return
        line = self._lines[task]
        took = time.monotonic() - line.started
        amount = f", {self._qty(line, line.done)}" if line.done else ""
        extra = f", {note}" if note else ""
        self._say(f"{line.label}: done in {took:.1f} s{amount}{extra}")

    def _status(self, line: _LineTask, now: float) -> str:
        elapsed = now - line.started
        parts = [self._qty(line, line.done, line.total)]
        if line.total:
            parts.append(f"{100 * line.done / line.total:.0f}%")
        window = now - line.printed
        rate = (line.done - line.printed_done) / window if window > 0 else 0.0
        # The first line's window holds the start-up too (model load, tokenisation, the
        # reference pass of DPO): a rate from it said "ETA 35m" for a 3.5-minute training.
        # Rates start at the first line.
        if rate > 0 and line.printed_done > 0:
            parts.append(f"{self._qty(line, rate)}/s")
            if line.total:
                parts.append(f"ETA {clock(max(0.0, line.total - line.done) / rate)}")
        parts.append(f"elapsed {clock(elapsed)}")
        if line.note:
            parts.append(line.note)
        return f"{line.label}: {', '.join(parts)}"

    @staticmethod
    def _qty(line: _LineTask, n: float, total: float | None = None) -> str:
        """``n`` (of ``total``) in the task's unit: ``120/540 rows``, ``3.2 MB/12.0 MB``."""
        if line.unit == "bytes":
            return decimal(int(n)) + (f"/{decimal(int(total))}" if total else "")
        text = f"{n:,.0f}" if n >= 10 or float(n).is_integer() else f"{n:.2f}"
        return text + (f"/{total:,.0f}" if total else "") + f" {line.unit}"

    def _say(self, text: str) -> None:
        self.console.print(escape(text), highlight=False, soft_wrap=True)


@contextmanager
def download_progress() -> Iterator[Callable[[str, int, int | None], None]]:
    """A download ``progress`` callback: rich bars on a terminal, lines elsewhere."""
    bars = Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
        unit="bytes",
    )
    tasks: dict[str, int] = {}

    def callback(label: str, done: int, total: int | None) -> None:
        if label not in tasks:
            tasks[label] = bars.add(f"download {label}", total=total)
        bars.update(tasks[label], completed=done, total=total)

    with bars:
        yield callback
        for task in tasks.values():
            bars.finish(task)


LIBRARY_BAR_ENV = (
    "TQDM_DISABLE",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",
)
"""Set to 1 off a terminal (unless already set): the tqdm bars of transformers (weight
loading, GGUF conversion), huggingface_hub and datasets write carriage-return frames that
pile up in a log as one unreadable line; spillover's own lines say the same."""


def quiet_library_output() -> None:
    """Off a terminal, turn the libraries' tqdm bars off (read by tqdm when first imported,
    so this runs before any command imports them); everywhere, hide one deprecation warning
    that transformers raises inside PEFT / TRL code, about nothing a user can change."""
    if not err_console.is_terminal:
        for var in LIBRARY_BAR_ENV:
            os.environ.setdefault(var, "1")
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


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
