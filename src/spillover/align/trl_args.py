"""Other TRL / ``TrainingArguments`` settings passed through to the method's TRL config.

``AlignConfig.trl_args`` (run config ``align.trl_args``, ``spillover align --trl-arg
key=value``) holds settings spillover has no option for. Each key is checked against the
fields of the method's own config dataclass (``DPOConfig``, ``KTOConfig``, ``CPOConfig``,
``ORPOConfig``), so a typo fails before anything is loaded; each value is coerced to the
field's type. Keys that spillover sets from its own options are refused with that option's
name. :func:`check_trl_keys` (run when an :class:`~spillover.align.AlignConfig` is made)
needs no TRL; :func:`check_trl_args` and :func:`resolve_trl_args` import TRL, only when
``trl_args`` is not empty.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from .methods import trl_classes

if TYPE_CHECKING:
    from .config import AlignConfig

SET_BY_SPILLOVER: Mapping[str, str] = {
    "output_dir": "output_dir",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "learning_rate",
    "beta": "beta",
    "seed": "seed",
    "data_seed": "seed",
    "max_length": "max_length",
    "gradient_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",
    "bf16": "bf16",
    "use_cpu": "device",
    "report_to": "report_to",
    "warmup_steps": "warmup_ratio",
    "warmup_ratio": "warmup_ratio",
    "lr_scheduler_type": "lr_scheduler_type",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "logging_steps": "logging_steps",
    "max_steps": "max_steps",
    "num_train_epochs": "epochs",
    "eval_strategy": "eval_strategy",
    "eval_steps": "eval_steps",
    "save_strategy": "save_strategy",
    "save_steps": "save_steps",
    "save_total_limit": "save_total_limit",
    "loss_type": "method",
    "loss_weights": "rpo_alpha",
    "label_smoothing": "label_smoothing",
    "precompute_ref_log_probs": "precompute_ref",
    "resume_from_checkpoint": "output_dir",
}
"""TRL config keys spillover sets itself -> the :class:`AlignConfig` field that sets them
(``resume_from_checkpoint``: resuming is automatic, from the checkpoints beside
``output_dir``)."""


def _plain_value(value: Any) -> Any:
    """A coerced value as plain JSON data (enums as their value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain_value(v) for k, v in value.items()}
    return value


def check_trl_keys(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` as a plain dict, checked without TRL: a mapping of text keys, none of them
    a key spillover sets from its own options.

    Raises:
        ConfigError: not a mapping, a key that is no text, or a key spillover sets.
    """
    if not isinstance(args, Mapping):
        raise ConfigError(
            f"`trl_args`={args!r}; expected a mapping of TRL config keys to values "
            "(e.g. {optim: adafactor})"
        )
    for key in args:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"`trl_args`: key {key!r}; expected the name of a TRL config field")
        if key in SET_BY_SPILLOVER:
            raise ConfigError(
                f"`trl_args`: key {key!r} is set by spillover from `{SET_BY_SPILLOVER[key]}`; "
                "set that option instead"
            )
    return dict(args)


def resolve_trl_args(cfg: AlignConfig) -> AlignConfig:
    """``cfg`` with its ``trl_args`` checked against the installed TRL and coerced to the
    field types of the method's TRL config (:func:`check_trl_args`); ``cfg`` itself when
    it has none."""
    if not cfg.trl_args:
        return cfg
    return dataclasses.replace(cfg, trl_args=check_trl_args(cfg.trl_args, cfg.method))


def check_trl_args(args: Mapping[str, Any], method: str) -> dict[str, Any]:
    """``args`` checked against the method's TRL config class and coerced to its field types.

    Raises:
        ConfigError: not a mapping, an unknown key (with a near match), a key spillover
            sets from its own option, or a value of the wrong type.
        MissingDependencyError: the installed TRL lacks the method's trainer.
    """
    args = check_trl_keys(args)
    if not args:
        return {}
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    config_cls, _ = trl_classes(method)
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # an unresolvable annotation: fall back to the raw ones
        hints = {name: f.type for name, f in fields.items()}
    out: dict[str, Any] = {}
    for key in sorted(args, key=str):
        value = args[key]
        name = config_cls.__name__
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"`trl_args`: key {key!r} is not a field of TRL's {name}{hint}; expected one of "
                f"its {len(fields)} fields (see the {name} documentation)"
            )
        hint_type = hints.get(key, fields[key].type)
        try:
            adapter = TypeAdapter(hint_type, config=ConfigDict(arbitrary_types_allowed=True))
            coerced = adapter.validate_python(value, strict=False)
        except ValidationError as exc:
            msg = exc.errors()[0].get("msg", "invalid value")
            raise ConfigError(
                f"`trl_args`: {key}={value!r}: {msg}; expected {hint_type} ({name}.{key})"
            ) from None
        except Exception:  # a type pydantic cannot describe: pass the value as given
            coerced = value
        out[str(key)] = _plain_value(coerced)
    return out


def parse_trl_arg(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line: the value read as YAML (``2`` -> 2,
    ``true`` -> True, ``[a, b]`` -> a list), then coerced by :func:`check_trl_args`.

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"`trl_args`: {text!r}; expected key=value (e.g. --trl-arg optim=adafactor)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
