"""Exceptions raised for expected failures.

Every failure a user can cause or fix (bad input, missing data, missing optional
dependency) raises a :class:`SpilloverError` subclass. The CLI shows these as one
line and exits non-zero; any other exception is a bug and keeps its traceback.
Messages follow one shape: where, what was found, what was expected, how to fix.
"""

from __future__ import annotations


class SpilloverError(Exception):
    """Base class of all expected, user-facing errors."""


class ConfigError(SpilloverError):
    """An option or configuration value is invalid."""


class DataError(SpilloverError):
    """A data file is missing, malformed, or fails verification."""


class MissingDependencyError(SpilloverError):
    """An optional package needed for the requested feature is not installed."""


class ModelError(SpilloverError):
    """A model could not be resolved or loaded."""


class JobError(SpilloverError):
    """A job of a distributed run failed: its process or worker died, or the scheduler
    refused it. Rerunning the same command resumes (completed stages are kept)."""
