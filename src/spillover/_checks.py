r"""Validation helpers shared by the stage configs: one message shape for every bad value.

Messages start with the field in backticks and the value received, then say what was
expected (with a near match for a misspelt choice), e.g.
``\`backend\`='vlm'; expected one of hf, vllm (did you mean 'vllm'?)``. The YAML reader
prefixes them with the file, line and section (``study.yaml:2: \`eval.backend\`=...``).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError


def near(value: object, options: Sequence[str], *, quote: str = "'") -> str:
    """`` (did you mean 'x'?)`` for the closest option, or an empty string."""
    found = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.6)
    return f" (did you mean {quote}{found[0]}{quote}?)" if found else ""


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(
            f"`{name}`={value!r}; expected one of {', '.join(allowed)}{near(value, allowed)}"
        )


def check_int(name: str, value: object, *, minimum: int, example: str = "") -> None:
    """Refuse anything but an integer (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        hint = f" ({example})" if example else ""
        raise ConfigError(f"`{name}`={value!r}; expected {what}{hint}")


def check_number(
    name: str, value: object, *, low: float, high: float | None = None, open_low: bool = False
) -> None:
    """Refuse anything but a finite number in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        v: Any = value
        ok = (v > low if open_low else v >= low) and (high is None or v <= high)
    if not ok:
        left = "(" if open_low else "["
        right = f"{high:g}]" if high is not None else "inf)"
        raise ConfigError(f"`{name}`={value!r}; expected a number in {left}{low:g}, {right}")


SEED_MAX = 2**32 - 1
"""Largest seed: numpy's legacy seeding (which transformers' ``set_seed`` calls) takes 32 bits."""


def check_seed(name: str, value: object) -> None:
    """Refuse a seed outside ``0 .. SEED_MAX`` (or not an integer)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX:
        return
    raise ConfigError(f"`{name}`={value!r}; expected an integer in 0..{SEED_MAX}")


DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N", "mps")
"""Device names accepted (``cuda:N`` for GPU N); whether one exists is checked when the run
starts."""
_DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?|mps")


def check_device(device: object) -> None:
    """Refuse a device name torch would not accept (``tpu``, ``gpu``, ``cuda:x``)."""
    if device is None or (isinstance(device, str) and _DEVICE.fullmatch(device)):
        return
    raise ConfigError(
        f"`device`={device!r}; expected one of {', '.join(DEVICES)}, or leave it unset "
        "(CUDA when available)"
    )
