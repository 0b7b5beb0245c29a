r"""YAML reading with line numbers, and building stage configs from YAML sections.

Stage configs are frozen dataclasses (their fields documented once, beside the
field). A YAML section must be a mapping; it is checked key by key against the
dataclass fields (unknown keys are errors with a near-match suggestion), coerced by
pydantic's ``TypeAdapter`` and validated by the config itself. Every message names
the file, the line and the dotted key path: a config's own error
(``\`backend\`='vlm'; ...``) is re-addressed to the key's line (``study.yaml:2:
\`eval.backend\`='vlm'; ...``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.constructor import SafeConstructor

from ..errors import ConfigError

T = TypeVar("T")


MAX_NODES = 10_000
"""Most values (scalars, lists, mappings) a config may hold once its aliases are expanded."""
MAX_DEPTH = 32
"""Deepest nesting a config may have (a real one nests three levels)."""
MAX_BYTES = 1 << 20
"""Largest config file read (1 MiB; a real one is a few kilobytes)."""

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlDoc:
    """A parsed YAML document that remembers where each key was written.

    Refused, each with the file and line: documents whose aliases expand past
    :data:`MAX_NODES` values ("billion laughs"), recursive aliases, nesting deeper than
    :data:`MAX_DEPTH`, duplicate keys in a mapping (YAML would keep the last silently)
    and NUL characters.
    """

    def __init__(self, text: str, path: Path | str) -> None:
        self.path = str(path)
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise self._yaml_error(exc) from None
        except RecursionError:
            raise ConfigError(
                f"{self.path}: YAML nested too deeply to read; expected at most {MAX_DEPTH} "
                "levels of lists and mappings"
            ) from None
        self._lines: dict[tuple[str, ...], int] = {}
        if node is not None:
            self._measure(node)  # before anything walks the expanded tree
            self._index(node, ())
        try:
            self.data: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise self._yaml_error(exc) from None
        if self.data is None:
            self.data = {}
        if not isinstance(self.data, dict):
            raise ConfigError(f"{self.path}:1: expected a mapping of config keys at the top level")

    def _yaml_error(self, exc: yaml.YAMLError) -> ConfigError:
        mark = getattr(exc, "problem_mark", None)
        where = f"{self.path}:{mark.line + 1}" if mark is not None else self.path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return ConfigError(f"{where}: invalid YAML: {problem}")

    def _at(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def _measure(self, root: yaml.Node) -> None:
        """Refuse a document too big or too deep once expanded, without expanding it.

        An alias is the anchored node itself, so each distinct node's expanded size and
        height are computed once; the walk is linear in the document's text.
        """
        sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
        active: set[int] = set()

        def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
            key = id(node)
            if key in active:
                raise ConfigError(
                    f"{self._at(node)}: recursive alias (a node that contains itself); "
                    "expected plain values; write the value out"
                )
            if key not in sizes:
                if depth > MAX_DEPTH:
                    raise self._too_deep(node)
                active.add(key)
                size, height = 1, 0
                if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
                    children = (
                        [n for pair in node.value for n in pair]
                        if isinstance(node, yaml.MappingNode)
                        else node.value
                    )
                    for child in children:
                        child_size, child_height = walk(child, depth + 1)
                        size += child_size
                        height = max(height, child_height + 1)
                        if size > MAX_NODES:
                            raise ConfigError(
                                f"{self._at(node)}: the document expands to more than "
                                f"{MAX_NODES:,} values (aliases `*name` repeat their anchor's "
                                f"content); expected a config of at most {MAX_NODES:,} values; "
                                "use fewer aliases"
                            )
                elif "\0" in str(node.value):
                    raise ConfigError(
                        f"{self._at(node)}: NUL character in a value; expected plain text; "
                        "remove it"
                    )
                active.discard(key)
                sizes[key] = (size, height)
            size, height = sizes[key]
            if depth + height > MAX_DEPTH:
                raise self._too_deep(node)
            return size, height

        walk(root, 0)

    def _too_deep(self, node: yaml.Node) -> ConfigError:
        return ConfigError(
            f"{self._at(node)}: nested deeper than {MAX_DEPTH} levels; expected a config of "
            "mappings and short lists"
        )

    def _index(self, node: yaml.Node, prefix: tuple[str, ...]) -> None:
        self._lines[prefix] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                line = key_node.start_mark.line + 1
                if key_node.tag != _MERGE_TAG:
                    value = _key_value(key_node)
                    if value in seen:
                        raise ConfigError(
                            f"{self.path}:{line}: duplicate key `{'.'.join(key)}` (first at "
                            f"line {seen[value]}); expected each key once; remove one of them"
                        )
                    seen[value] = line
                self._lines[key] = line
                self._index(value_node, key)
                self._lines[key] = line
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


def _key_value(node: yaml.Node) -> Any:
    """A mapping key as YAML constructs it (``1`` and ``'1'`` differ, ``true`` and ``True``
    do not); non-scalar keys by their text."""
    if isinstance(node, yaml.ScalarNode):
        try:
            value = SafeConstructor().construct_object(node)
            hash(value)
            return value
        except (yaml.YAMLError, TypeError):
            pass
    return (node.tag, str(node.value))


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


def section(data: Mapping[str, Any], key: str, doc: YamlDoc | None) -> dict[str, Any]:
    """The mapping under top-level ``key`` (empty when absent or null).

    Raises:
        ConfigError: the value is not a mapping (``eval: [1, 2]``, ``align: 5``).
    """
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{locate(doc, [key])}: `{key}` must be a mapping of keys (found "
            f"{type(value).__name__} {value!r}); e.g. `{key}:` then indented `name: value` lines"
        )
    return dict(value)


_FIELD_MESSAGE = re.compile(r"^`(\w+)`")


def relocate(
    exc: ConfigError, fields: Sequence[str], doc: YamlDoc | None, path: Sequence[str]
) -> ConfigError:
    r"""A config's own error, addressed to the file line of the key it names.

    A message that starts with a field name in backticks is placed on that key's line,
    and every field name in it gets the section path (`\`eval.backend\``); any other
    message is placed on the section's line, prefixed with the section.
    """
    msg = str(exc)
    prefix = ".".join(path)
    match = _FIELD_MESSAGE.match(msg)
    if match is None or match.group(1) not in fields:
        return ConfigError(f"{locate(doc, path)}: `{prefix}`: {msg}")
    for name in fields:
        msg = msg.replace(f"`{name}`", f"`{prefix}.{name}`")
    return ConfigError(f"{locate(doc, [*path, match.group(1)])}: {msg}")


def build_dataclass(
    cls: type[T],
    data: Mapping[str, Any] | None,
    *,
    doc: YamlDoc | None = None,
    section: Sequence[str] = (),
    fixed: Mapping[str, Any] | None = None,
    allowed: Sequence[str] | None = None,
) -> T:
    """Validate ``data`` against dataclass ``cls`` and build it.

    Args:
        cls: The config class.
        data: The YAML section (a mapping, already checked by :func:`section`).
        doc: The document, for line numbers.
        section: The key path of the section.
        fixed: Values the caller sets (not allowed in ``data``).
        allowed: The keys ``data`` may hold; default: every field not in ``fixed``.

    Raises:
        ConfigError: unknown keys, wrong types, or the dataclass's own checks.
    """
    from pydantic import TypeAdapter, ValidationError

    values = dict(data or {})
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    fixed = dict(fixed or {})
    keys = list(allowed) if allowed is not None else [n for n in names if n not in fixed]
    check_keys(values, keys, doc=doc, section=section)
    try:
        return TypeAdapter(cls).validate_python({**values, **fixed}, strict=False)
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
    except ConfigError as exc:  # the config's own checks
        raise relocate(exc, names, doc, section) from None


def load_yaml(path: Path) -> YamlDoc:
    """Read a YAML file (UTF-8, at most :data:`MAX_BYTES`) into a :class:`YamlDoc`.

    Raises:
        ConfigError: the file is missing, a folder, unreadable, too large, not UTF-8 text
            or not valid YAML, naming the file.
    """
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a YAML config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the config file ({exc.strerror or exc}); check its permissions"
        ) from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(
            f"{path}: config file larger than {MAX_BYTES // 1024} KiB; expected a YAML study "
            "config (a few kilobytes)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); expected a YAML "
            "file saved as UTF-8"
        ) from None
    return YamlDoc(text, path)
