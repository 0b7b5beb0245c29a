"""Command-line options generated from the stage config objects.

Each config field becomes one option whose help text is the field's own docstring and
whose default is "not given": the config object's default applies, so defaults are
written once, in the config. ``--some-field`` parses into the field's type (a
comma-separated list for tuple fields; ``--flag/--no-flag`` for booleans).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from ..errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def plain(doc: str) -> str:
    """A docstring as one line of plain text (reST roles and literals unwrapped)."""
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", doc)
    text = text.replace("``", "")
    return " ".join(text.split())


@dataclass(frozen=True)
class Opt:
    """One config field offered on the command line."""

    field: str
    """The config field."""
    flag: str | None = None
    """Option name; default ``--field-name``."""
    help: str | None = None
    """Help text; default: the field's docstring."""


_TYPES: Mapping[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


@dataclass(frozen=True)
class ConfigOptions:
    """The options of one config class on one command."""

    cls: type
    """The config class."""
    fields: tuple[Opt, ...]
    """Its fields offered as options."""
    preset: frozenset[str] = frozenset()
    """Fields whose default comes from a model preset (marked ``[preset]``)."""

    def parameters(self) -> list[inspect.Parameter]:
        """Keyword-only typer parameters, one per field, defaulting to None (not given)."""
        docs = field_docs(self.cls)
        defaults = {f.name: f for f in dataclasses.fields(self.cls)}
        out = []
        for opt in self.fields:
            kind = self._kind(opt.field)
            base = kind.split(" | ")[0]
            flag = opt.flag or "--" + opt.field.replace("_", "-")
            help_text = plain(opt.help or docs.get(opt.field, opt.field))
            if opt.field in self.preset:
                help_text = help_text.rstrip(".") + " [preset]."
            shown = self._default(defaults[opt.field])
            if base == "bool":
                decls = [f"{flag}/--no-{flag[2:]}"]
                annotation: Any = bool | None
            else:
                decls = [flag]
                annotation = (str if base.startswith("tuple") else _TYPES[base]) | None
            if shown is not None and opt.field not in self.preset:
                help_text += f" [default: {shown}]"
            option = typer.Option(*decls, help=help_text, show_default=False)
            out.append(
                inspect.Parameter(
                    opt.field,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[annotation, option],
                )
            )
        return out

    def values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The fields given on the command line, converted to the config's types."""
        out: dict[str, Any] = {}
        for opt in self.fields:
            value = given.get(opt.field)
            if value is None:
                continue
            if self._kind(opt.field).startswith("tuple"):
                value = tuple(p.strip() for p in str(value).split(",") if p.strip())
            out[opt.field] = value
        return out

    def build(self, given: Mapping[str, Any], **fixed: Any) -> Any:
        """The config object from the options given (and ``fixed`` values); its own errors
        name the command-line flags (``--backend='onnx'; expected one of hf, vllm``)."""
        try:
            return self.cls(**self.values(given), **fixed)
        except ConfigError as exc:
            raise ConfigError(self.flags(str(exc))) from None

    def flags(self, message: str) -> str:
        """A config message with its field names replaced by this command's flags."""
        for opt in self.fields:
            flag = opt.flag or "--" + opt.field.replace("_", "-")
            message = message.replace(f"`{opt.field}`:", flag).replace(f"`{opt.field}`", flag)
        return message

    def _kind(self, name: str) -> str:
        kind = str(self.cls.__annotations__[name])
        return kind if not kind.startswith("Literal") else "str"

    @staticmethod
    def _default(f: dataclasses.Field[Any]) -> str | None:
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            return None
        if value is None:
            return None
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ",".join(map(str, value)) or None
        return str(value)


def config_options(
    cls: type,
    fields: Iterable[str | Opt] | None = None,
    *,
    exclude: Sequence[str] = (),
    preset: Iterable[str] = (),
) -> ConfigOptions:
    """Options for ``fields`` of ``cls`` (default: every field but ``exclude``)."""
    names = fields if fields is not None else [f.name for f in dataclasses.fields(cls)]
    opts = tuple(o if isinstance(o, Opt) else Opt(o) for o in names if str(o) not in exclude)
    opts = tuple(o for o in opts if o.field not in exclude)
    return ConfigOptions(cls, opts, frozenset(preset))


def with_options(*groups: ConfigOptions) -> Callable[[F], F]:
    """Add the generated options to a command function taking ``**options``.

    The function's own parameters come first; typer sees the generated ones too and
    passes them in ``**options``.
    """

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own}
        extra = [p for g in groups for p in g.parameters() if p.name not in taken]
        func.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return func

    return decorate
