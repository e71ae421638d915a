"""Per-environment training configurations: what ``diffpg train --env NAME`` uses by default.

A configuration gives training-loop settings (``diffpg.training.TrainSettings`` fields) and, per
estimator, that estimator's settings; ``diffpg.training.settings_for`` layers them between the
estimators' own declarations and the user's values. Each value says where it comes from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

DEFAULT_ESTIMATOR = "shac"
"""The estimator a run trains with when neither the user nor the env's configuration names one."""


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Defaults for one environment."""

    trainer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Training-loop settings for every estimator on this env."""
    default_estimator: str = DEFAULT_ESTIMATOR
    """The estimator ``diffpg train --env NAME`` trains with when none is named."""
    estimators: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """Per estimator name: training-loop settings under "trainer" and its own settings under
    "estimator"."""
    source: str = ""
    """Where the values come from (a paper's settings, a measured tuning)."""


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """The configuration of one (environment, estimator) pair."""

    trainer: Mapping[str, Any]
    estimator: Mapping[str, Any]
    source: str


CONFIGS: dict[str, EnvConfig] = {}


def config_for(env: str, estimator: str) -> ResolvedConfig:
    """The defaults for ``estimator`` on ``env`` (empty where there is no configuration)."""
    config = CONFIGS.get(env, EnvConfig())
    specific = config.estimators.get(estimator, {})
    return ResolvedConfig(dict(config.trainer) | dict(specific.get("trainer", {})),
                          dict(specific.get("estimator", {})), config.source)


def default_estimator(env: str) -> str:
    """The estimator ``diffpg train --env env`` uses when none is named."""
    return CONFIGS.get(env, EnvConfig()).default_estimator
