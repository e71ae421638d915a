"""The estimator registry: a name, a settings class, a constructor, and what the estimator declares
about itself, so that comparison and training never need to know an estimator by name.

An estimator declares, in its own file, when it registers:

* ``comparison(horizon) -> settings``: the settings that make it estimate the gradient of the
  comparison's finite-horizon objective ``J_T = E[sum_{t<T} gamma^t r_t]`` at horizon ``T``
  (e.g. SHAC ends its last window there; a critic sees the steps left). Applied under the
  user's own settings.
* ``training``: its settings for training, where they differ from its defaults (which are
  chosen for gradient comparisons on fixed states).
* ``trainer``: settings of the training loop it needs by default (``diffpg.training``'s
  ``TrainSettings`` fields, e.g. PPO's learning rate and epochs).
* ``reference=True``: unbiased for the comparison objective on any environment, with nothing
  to learn first: the reference gradient of comparisons where no exact one exists.
* ``family``: one of ``FAMILIES``, the kind of gradient it takes (reports group by it).

Whether it has learned parts to warm up before a comparison is not declared: ``update`` says it
(an estimator whose state holds no array learns nothing).
"""

from __future__ import annotations

import dataclasses
import keyword
from collections.abc import Callable, Mapping
from typing import Any

from diffpg.envs.core import SettingError
from diffpg.estimators.base import Estimator


@dataclasses.dataclass(frozen=True)
class Registration:
    """What register recorded for one estimator name."""

    name: str
    settings_class: type
    constructor: Callable[..., Estimator]
    """(env, policy, settings) -> Estimator."""
    comparison: Callable[[int], dict[str, Any]]
    training: Mapping[str, Any]
    trainer: Mapping[str, Any]
    reference: bool
    description: str
    family: str = "other"


_REGISTRY: dict[str, Registration] = {}

FAMILIES = ("score function", "pathwise", "critic", "mixture", "other")
"""The kinds of gradient estimators declare, in the order reports show them: the score
function (REINFORCE and kin), the pathwise gradient through the dynamics (BPTT, SHAC and kin),
the gradient through a learned critic, mixtures of these, and anything else."""


def _no_change(horizon: int) -> dict[str, Any]:
    del horizon
    return {}


def register(
    name: str,
    settings_class: type,
    constructor: Callable[..., Estimator],
    *,
    comparison: Callable[[int], dict[str, Any]] | None = None,
    training: Mapping[str, Any] | None = None,
    trainer: Mapping[str, Any] | None = None,
    reference: bool = False,
    family: str = "other",
    replace: bool = False,
) -> Registration:
    """Make estimator ``name`` available to ``make``, ``diffpg compare`` and ``diffpg train``.

    ``settings_class``: a frozen dataclass with at least ``horizon`` and ``discount`` fields
    (its docstring describes the estimator; the string under each field documents it);
    ``constructor(env, policy, settings) -> Estimator``. ``comparison``, ``training``,
    ``trainer``, ``reference`` and ``family`` are the declarations in the module docstring.
    ``replace=True`` allows registering a name again (otherwise an error).
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise SettingError(f"estimator name={name!r} must be a Python identifier")
    if name in _REGISTRY and not replace:
        raise SettingError(f"estimator name={name!r} is already registered; pass replace=True to "
                           "register it again")
    if not dataclasses.is_dataclass(settings_class) or not isinstance(settings_class, type):
        raise SettingError(f"settings_class={settings_class!r} must be a dataclass type")
    for other in _REGISTRY.values():
        if other.name != name and (issubclass(settings_class, other.settings_class)
                                   or issubclass(other.settings_class, settings_class)):
            raise SettingError(
                f"settings_class {settings_class.__name__} is (or derives from) the class of "
                f"estimator {other.name!r}, {other.settings_class.__name__}: give each estimator "
                "its own class (derive both from a common base), so that a settings object "
                "names its estimator")
    fields = {f.name for f in dataclasses.fields(settings_class)}
    missing = {"horizon", "discount"} - fields
    if missing:
        raise SettingError(f"settings_class {settings_class.__name__} lacks the field(s) "
                           f"{sorted(missing)} every estimator has")
    if family not in FAMILIES:
        raise SettingError(f"family={family!r} is not allowed; allowed values: {list(FAMILIES)}")
    if not callable(constructor):
        raise SettingError(f"constructor={constructor!r} must be callable")
    training = dict(training or {})
    unknown = sorted(set(training) - fields)
    if unknown:
        raise SettingError(f"training settings {unknown} are not fields of "
                           f"{settings_class.__name__}; allowed: {sorted(fields)}")
    # The docstring's first paragraph, whole (a split at ". " would cut "Xu et al. 2022").
    description = " ".join((settings_class.__doc__ or "").strip().split("\n\n")[0].split())
    description = description.rstrip(".")
    registration = Registration(name, settings_class, constructor, comparison or _no_change,
                                training, dict(trainer or {}), bool(reference), description,
                                family)
    _REGISTRY[name] = registration
    return registration


def unregister(name: str) -> None:
    """Remove estimator ``name`` (e.g. one a test registered)."""
    registration(name)
    del _REGISTRY[name]


def names() -> list[str]:
    """The registered estimator names, in registration order."""
    return list(_REGISTRY)


def registration(name: str) -> Registration:
    if name not in _REGISTRY:
        raise SettingError(f"estimator={name!r} is not known; allowed values: {names()}")
    return _REGISTRY[name]


def reference_estimator() -> str:
    """The first registered estimator declared a ``reference``."""
    for name, entry in _REGISTRY.items():
        if entry.reference:
            return name
    raise SettingError("no registered estimator is declared a reference (register(..., "
                       "reference=True)); give --reference an estimator spec")
