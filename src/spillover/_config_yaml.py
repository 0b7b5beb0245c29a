"""YAML reading with line numbers and dataclass validation with near-match hints.

Stage configs are frozen dataclasses (their fields documented once, beside the
field). A YAML section is checked key by key against the dataclass fields
(unknown keys are errors with a near-match suggestion) and then validated and
coerced by pydantic's ``TypeAdapter``; every message names the file, the line
and the dotted key path.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


class YamlDoc:
    """A parsed YAML document that remembers where each key was written."""

    def __init__(self, text: str, path: Path | str) -> None:
        self.path = str(path)
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{self.path}:{mark.line + 1}" if mark is not None else self.path
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}: invalid YAML: {problem}") from None
        self._lines: dict[tuple[str, ...], int] = {}
        if node is not None:
            self._index(node, ())
        if self.data is None:
            self.data = {}
        if not isinstance(self.data, dict):
            raise ConfigError(f"{self.path}:1: expected a mapping of config keys at the top level")

    def _index(self, node: yaml.Node, prefix: tuple[str, ...]) -> None:
        self._lines[prefix] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                self._lines[key] = key_node.start_mark.line + 1
                self._index(value_node, key)
                self._lines[key] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, child in enumerate(node.value):
                self._index(child, (*prefix, str(i)))

    def where(self, keys: Sequence[str]) -> str:
        """``file:line`` of the deepest known prefix of ``keys``."""
        k = tuple(str(x) for x in keys)
        while k and k not in self._lines:
            k = k[:-1]
        line = self._lines.get(k, 1)
        return f"{self.path}:{line}"


def locate(doc: YamlDoc | None, keys: Sequence[str]) -> str:
    """``file:line`` of ``keys`` in ``doc``, or ``config`` for a config not read from a file."""
    return doc.where(keys) if doc is not None else "config"


def near_match(key: str, options: Sequence[str]) -> str:
    """`` (did you mean `x`?)`` or an empty string."""
    near = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{near[0]}`?)" if near else ""


def check_keys(
    data: Mapping[str, Any],
    allowed: Sequence[str],
    *,
    doc: YamlDoc | None,
    section: Sequence[str],
) -> None:
    """Refuse keys not in ``allowed``, naming file, line and path."""
    for key in data:
        if key not in allowed:
            path = [*section, str(key)]
            where = locate(doc, path)
            dotted = ".".join(path)
            raise ConfigError(
                f"{where}: unknown key `{dotted}`{near_match(str(key), allowed)}; "
                f"expected one of: {', '.join(allowed)}"
            )


def build_dataclass(
    cls: type[T],
    data: Mapping[str, Any] | None,
    *,
    doc: YamlDoc | None = None,
    section: Sequence[str] = (),
) -> T:
    """Validate ``data`` against dataclass ``cls`` and build it.

    Raises:
        ConfigError: unknown keys, wrong types, or the dataclass's own checks.
    """
    from pydantic import TypeAdapter, ValidationError

    data = dict(data or {})
    if not isinstance(data, dict):
        where = locate(doc, section)
        raise ConfigError(f"{where}: `{'.'.join(section)}` must be a mapping")
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    check_keys(data, names, doc=doc, section=section)
    try:
        return TypeAdapter(cls).validate_python(data, strict=False)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if not str(x).startswith("function-")]
        path = [*section, *loc]
        where = locate(doc, path)
        got = err.get("input")
        got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        raise ConfigError(f"{where}: `{'.'.join(path)}`: {msg}{got_s}") from None
    except (ValueError, TypeError) as exc:  # raised by __post_init__ checks
        where = locate(doc, section)
        raise ConfigError(f"{where}: `{'.'.join(section)}`: {exc}") from None


def load_yaml(path: Path) -> YamlDoc:
    """Read a YAML file into a :class:`YamlDoc`."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    return YamlDoc(path.read_text(encoding="utf-8"), path)
