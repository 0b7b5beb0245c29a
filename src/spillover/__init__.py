"""spillover: what aligning a language model on one sensitive attribute does to the others.

The package is a pipeline of stages (``data`` -> ``prefs`` -> ``align`` ->
``evaluate`` -> ``stats`` -> ``report``), each a module with a plain Python API.
Importing ``spillover`` is cheap: stage modules that need torch are imported
only when used.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .data import BBQData, BBQItem, fetch_bbq, load_bbq, select_items
from .errors import ConfigError, DataError, MissingDependencyError, ModelError, SpilloverError

try:
    __version__ = version("spillover")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "BBQData",
    "BBQItem",
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "ModelError",
    "SpilloverError",
    "__version__",
    "fetch_bbq",
    "load_bbq",
    "select_items",
]
