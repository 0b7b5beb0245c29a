"""The preference methods: one table, the one place a method is added.

Each :class:`Method` names its TRL trainer family, its loss, whether it uses a reference
model, and where its TRL classes live. The config checks (:mod:`.config`), the TRL
settings (:mod:`.trainer`) and the pass-through TRL keys (:mod:`.trl_args`) read this
table; adding a method is one entry here plus, where it has its own knobs, a field of
:class:`~spillover.align.AlignConfig`. TRL is imported only by :func:`trl_classes`.

Methods (``method``):

* DPO loss types of ``trl.DPOTrainer``: ``dpo`` (= ``sigmoid``), ``ipo``, ``robust``,
  ``hinge``, ``apo_zero``, ``apo_down``, ``exo_pair``, ``nca_pair``, ``bco_pair``,
  ``sppo_hard``, ``aot``, ``aot_unpaired``, ``discopop``, ``sigmoid_norm``.
* ``kto``: ``trl.KTOTrainer`` on unpaired data (each pair becomes a desirable and an
  undesirable completion).
* ``cpo``, ``simpo`` (CPO with ``loss_type="simpo"``, ``cpo_alpha=0``) and ``orpo``:
  reference-free trainers of ``trl.experimental``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError, MissingDependencyError

Family = Literal["dpo", "kto", "cpo", "orpo"]


@dataclass(frozen=True)
class Method:
    """One preference method."""

    name: str
    """What ``--method`` takes."""
    family: Family
    """The TRL trainer that runs it."""
    loss_type: str | None
    """The trainer's ``loss_type`` (DPO and CPO families), else None."""
    trl_module: str
    """Module of its TRL classes (older TRL releases: see :data:`_FALLBACK_MODULES`)."""
    config_class: str
    """Its TRL config class."""
    trainer_class: str
    """Its TRL trainer class."""
    requirement: str
    """Which TRL provides it (for the install hint)."""
    default_label_smoothing: float | None = None
    """``label_smoothing`` when the config leaves it unset (robust, exo_pair), else None."""
    takes_label_smoothing: bool = False
    """Whether ``label_smoothing`` changes its loss."""

    @property
    def reference_free(self) -> bool:
        """Whether the method uses no reference model (``precompute_ref`` does not apply)."""
        return self.family in ("cpo", "orpo")

    @property
    def is_dpo(self) -> bool:
        """Whether it is a loss of ``trl.DPOTrainer`` (pair packing and RPO apply)."""
        return self.family == "dpo"


def _dpo(name: str, loss: str) -> Method:
    return Method(
        name, "dpo", loss, "trl", "DPOConfig", "DPOTrainer", "trl (trl.DPOTrainer)",
        default_label_smoothing=_SMOOTHING.get(loss),
        takes_label_smoothing=loss in ("sigmoid", "robust", "exo_pair"),
    )  # fmt: skip


_DPO_LOSS_TYPES = (
    "sigmoid", "ipo", "robust", "hinge", "apo_zero", "apo_down", "exo_pair", "nca_pair",
    "bco_pair", "sppo_hard", "aot", "aot_unpaired", "discopop", "sigmoid_norm",
)  # fmt: skip
_SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3}

METHOD_TABLE: Mapping[str, Method] = {
    "dpo": _dpo("dpo", "sigmoid"),
    **{loss: _dpo(loss, loss) for loss in _DPO_LOSS_TYPES},
    "kto": Method("kto", "kto", None, "trl", "KTOConfig", "KTOTrainer", "trl>=0.9 (trl.KTOTrainer)"),
    "cpo": Method(
        "cpo", "cpo", "sigmoid", "trl.experimental.cpo", "CPOConfig", "CPOTrainer",
        "trl>=0.8 (trl.CPOTrainer)", takes_label_smoothing=True,
    ),
    "simpo": Method(
        "simpo", "cpo", "simpo", "trl.experimental.cpo", "CPOConfig", "CPOTrainer",
        "trl>=0.9 (CPO, loss_type=simpo)",
    ),
    "orpo": Method(
        "orpo", "orpo", None, "trl.experimental.orpo", "ORPOConfig", "ORPOTrainer",
        "trl>=0.8 (trl.ORPOTrainer)",
    ),
}  # fmt: skip
"""Every method, by name."""

METHODS: tuple[str, ...] = tuple(METHOD_TABLE)
"""Every accepted ``--method``."""

_FALLBACK_MODULES = {"trl.experimental.cpo": "trl", "trl.experimental.orpo": "trl"}
"""Older TRL releases export CPO/ORPO from the top level."""


def check_method(method: str) -> str:
    """The method's canonical name (case and ``-``/``_`` alike).

    Raises:
        ConfigError: an unknown method, with a near match.
    """
    if method in METHOD_TABLE:
        return method
    norm = method.strip().lower().replace("-", "_")
    if norm in METHOD_TABLE:
        return norm
    near = difflib.get_close_matches(norm, METHODS, n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"unknown `method`={method!r}{hint}; expected one of {', '.join(METHODS)}")


def method_of(name: str) -> Method:
    """The :class:`Method` called ``name`` (see :func:`check_method`)."""
    return METHOD_TABLE[check_method(name)]


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Silence TRL's warnings about its experimental trainers."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")
        yield


def trl_classes(method: str) -> tuple[Any, Any]:
    """The (config class, trainer class) of a method in the installed TRL (unpatched).

    Raises:
        MissingDependencyError: the installed TRL lacks that trainer.
    """
    import trl

    m = method_of(method)
    for mod_name in (m.trl_module, _FALLBACK_MODULES.get(m.trl_module)):
        if mod_name is None:
            continue
        try:
            with quiet_experimental():
                mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        cfg_cls, trainer_cls = (
            getattr(mod, m.config_class, None),
            getattr(mod, m.trainer_class, None),
        )
        if cfg_cls is not None and trainer_cls is not None:
            return cfg_cls, trainer_cls
    raise MissingDependencyError(
        f"method {m.name!r} needs TRL's {m.trainer_class}, which the installed trl "
        f"{trl.__version__} does not provide; it is in {m.requirement}: pip install -U trl"
    )
