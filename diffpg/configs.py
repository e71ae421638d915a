"""Per-environment training configurations: what ``diffpg train --env NAME`` uses by default.

A configuration gives training-loop settings (``diffpg.training.TrainSettings`` fields) and, per
estimator, that estimator's settings; ``diffpg.training.settings_for`` layers them between the
estimators' own declarations and the user's values. ``--sizes gpu`` adds each configuration's
GPU sizes. Every value says where it comes from: SHAC's published per-task settings
(``NVlabs/DiffRL``, ``examples/cfg/shac/<task>.yaml``: 32-step windows, Adam betas (0.7, 0.95),
learning rates decaying linearly to 1e-5, global-norm clip 1, TD(lambda = 0.95) critics fitted
16 passes x 4 minibatches; which diffpg's defaults already are), Brax's published PPO settings
(``google/brax``, ``notebooks/training.ipynb``), or, where neither exists, an analogy stated in
the ``source``. GPU sizes are not measured yet: no GPU run has been recorded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from diffpg.envs.core import SettingError

DEFAULT_ENV = "cartpole_swingup"
"""The env ``diffpg train`` runs when none is named: SHAC's cart-pole swing-up."""

DEFAULT_ESTIMATOR = "shac"
"""The estimator a run trains with when neither the user nor the env's configuration names one."""

SIZES = ("cpu", "gpu")
"""The sizes a configuration holds: the default (a 2-core CPU) and a GPU's."""


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
    gpu: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Training-loop settings added with ``--sizes gpu`` (every estimator)."""
    source: str = ""
    """Where the values come from."""


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """The configuration of one (environment, estimator, sizes)."""

    trainer: Mapping[str, Any]
    estimator: Mapping[str, Any]
    source: str


def _shac(num_envs, actor_hidden_sizes, critic_hidden_sizes=(64, 64), critic_learning_rate=2e-3,
          target_critic_keep=0.2):
    """SHAC's per-task values (its actor learning rate, 2e-3, is diffpg's default)."""
    return {"trainer": {"num_envs": num_envs, "hidden_sizes": actor_hidden_sizes},
            "estimator": {"critic_hidden_sizes": critic_hidden_sizes,
                          "critic_learning_rate": critic_learning_rate,
                          "target_critic_keep": target_critic_keep}}


def _with_estimator(config, **settings):
    """``config`` with ``settings`` added to its estimator's."""
    return config | {"estimator": config["estimator"] | settings}


def _ahac(num_envs, actor_hidden_sizes, critic_hidden_sizes=(64, 64), critic_learning_rate=2e-3,
          **settings):
    """SHAC's per-task sizes and rates for AHAC, whose critics have no target network."""
    return _with_estimator(_shac(num_envs, actor_hidden_sizes, critic_hidden_sizes,
                                 critic_learning_rate, target_critic_keep=0.0), **settings)


def _sapo(num_envs, actor_hidden_sizes, critic_hidden_sizes=(64, 64)):
    """SAPO's published choices (etaoxing/mineral, REFERENCES: SiLU with LayerNorm, global-norm
    clip 0.5, critic learning rate 5e-4, twin critics without a target network) on SHAC's
    per-task sizes."""
    config = _ahac(num_envs, actor_hidden_sizes, critic_hidden_sizes, critic_learning_rate=5e-4)
    return config | {"trainer": config["trainer"] | {"activation": "silu", "grad_clip": 0.5}}


def _brax_ppo(unroll_length, minibatches, epochs, discount, entropy_cost, num_envs):
    """Brax's published PPO settings (notebooks/training.ipynb) with the batch of ``num_envs``
    environments (CPU sizes: Brax's own runs use thousands) cut into ``minibatches``."""
    return {"trainer": {"num_envs": num_envs, "minibatches": minibatches, "epochs": epochs},
            "estimator": {"horizon": unroll_length, "discount": discount,
                          "entropy_cost": entropy_cost}}


SHAC_SOURCE = "SHAC's {task}.yaml (NVlabs/DiffRL examples/cfg/shac)"

CONFIGS: dict[str, EnvConfig] = {
    "ant": EnvConfig(
        default_estimator="ahac",
        estimators={"shac": _shac(64, (128, 64, 32)),
                    "sapo": _sapo(64, (128, 64, 32)),
                    "ahac": _ahac(64, (128, 64, 32)),
                    "ppo": _brax_ppo(5, 8, 4, 0.97, 1e-2, num_envs=256)},
        gpu={"num_envs": 2048},
        source=SHAC_SOURCE.format(task="ant") + "; AHAC (the default: ahead of SHAC and of "
               "Brax's PPO at every evaluation, BENCHMARKS.md section 2d): SHAC's sizes and "
               "rates; SAPO: its published SHAC2 settings with SHAC's ant sizes; PPO: Brax's ant "
               "settings"),
    "hopper": EnvConfig(
        trainer={"health_shaping": 2.0},
        estimators={"shac": _with_estimator(_shac(128, (128, 64, 32), critic_learning_rate=2e-4),
                                            horizon=64, discount=0.995),
                    "ahac": _ahac(256, (128, 64, 32), critic_learning_rate=2e-4,
                                  initial_horizon=32)},
        gpu={"num_envs": 2048},
        source=SHAC_SOURCE.format(task="hopper") + "; health_shaping 2: measured here, ahead "
               "of none (BENCHMARKS.md section 2); 128 envs x 64 steps, the gradient through all "
               "64, instead of SHAC's 256 x 32 (the same env steps per update; ahead in the "
               "mean, section 2); discount 0.995 instead of SHAC's 0.99 (ahead in the mean at "
               "every evaluation from 1M env steps, section 2); AHAC: SHAC's sizes and rates, "
               "its critics without a target network, starting at H = 32 (ahead of 8; section "
               "2e)"),
    "halfcheetah": EnvConfig(
        estimators={"shac": _shac(64, (128, 64, 32)), "ahac": _ahac(64, (128, 64, 32)),
                    "ppo": _brax_ppo(20, 8, 8, 0.95, 1e-3, num_envs=256)},
        gpu={"num_envs": 2048},
        source=SHAC_SOURCE.format(task="cheetah") + "; AHAC: SHAC's sizes and rates, its "
               "critics without a target network (on MJX it stays at H = 8, BENCHMARKS.md "
               "section 2g); PPO: Brax's halfcheetah settings"),
    "walker2d": EnvConfig(
        trainer={"health_shaping": 2.0},
        estimators={"shac": _with_estimator(_shac(128, (128, 64, 32), critic_learning_rate=2e-4),
                                            horizon=64, discount=0.995),
                    "ahac": _ahac(256, (128, 64, 32), critic_learning_rate=2e-4,
                                  initial_horizon=32)},
        gpu={"num_envs": 2048},
        source="hopper's (SHAC publishes no walker2d setting; both are planar hoppers that fall): "
               "SHAC, 128 envs x 64 steps, discount 0.995, health shaping 2 (ahead of AHAC at "
               "256 x 32 in the mean at every evaluation from 1.5M env steps, 1,707 against 535 "
               "at 2.5M; BENCHMARKS.md section 2f); AHAC: starting at H = 32"),
    "humanoid": EnvConfig(
        default_estimator="ahac",
        estimators={"shac": _shac(64, (256, 128), (128, 128), 5e-4, 0.995),
                    "ahac": _ahac(64, (256, 128), (128, 128), 5e-4),
                    "ppo": _brax_ppo(10, 8, 8, 0.97, 1e-3, num_envs=256)},
        gpu={"num_envs": 2048},
        source=SHAC_SOURCE.format(task="humanoid") + "; AHAC (the default: ahead of Brax's PPO "
               "from its first evaluations, BENCHMARKS.md section 2i): SHAC's humanoid sizes and "
               "rates, its critics without a target network; PPO: Brax's humanoid settings"),
    "humanoidstandup": EnvConfig(
        estimators={"shac": _shac(64, (256, 128), (128, 128), 5e-4, 0.995)},
        gpu={"num_envs": 2048},
        source="humanoid's (SHAC's humanoid.yaml; none is published for standing up)"),
    "inverted_pendulum": EnvConfig(
        estimators={"ppo": _brax_ppo(5, 8, 4, 0.97, 1e-2, num_envs=512)},
        gpu={"num_envs": 2048},
        source="diffpg's defaults (SHAC publishes none); PPO: Brax's inverted_pendulum settings"),
    "inverted_double_pendulum": EnvConfig(
        gpu={"num_envs": 2048}, source="diffpg's defaults (no published setting)"),
    "swimmer": EnvConfig(gpu={"num_envs": 2048},
                         source="diffpg's defaults (no published setting)"),
    "reacher": EnvConfig(gpu={"num_envs": 2048},
                         source="diffpg's defaults (no published setting)"),
    "pusher": EnvConfig(gpu={"num_envs": 2048},
                        source="diffpg's defaults (no published setting)"),
    "playground:CheetahRun": EnvConfig(
        default_estimator="ahac",
        estimators={"shac": _shac(64, (128, 64, 32)), "ahac": _ahac(64, (128, 64, 32))},
        gpu={"num_envs": 2048},
        source=SHAC_SOURCE.format(task="cheetah") + " (the same planar cheetah model); AHAC "
               "(the default: ahead of SHAC and of Brax's PPO, BENCHMARKS.md section 2c): "
               "SHAC's sizes and rates, its critics without a target network"),
}


def check_sizes(sizes: str) -> None:
    if sizes not in SIZES:
        raise SettingError(f"sizes={sizes!r} is not allowed; allowed values: {list(SIZES)}")


def config_for(env: str, estimator: str, sizes: str = "cpu") -> ResolvedConfig:
    """The defaults for ``estimator`` on ``env`` at ``sizes`` (empty without a configuration)."""
    check_sizes(sizes)
    config = CONFIGS.get(env, EnvConfig())
    specific = config.estimators.get(estimator, {})
    trainer = dict(config.trainer) | dict(specific.get("trainer", {}))
    if sizes == "gpu":
        trainer |= dict(config.gpu)
    return ResolvedConfig(trainer, dict(specific.get("estimator", {})), config.source)


def default_estimator(env: str) -> str:
    """The estimator ``diffpg train --env env`` uses when none is named."""
    return CONFIGS.get(env, EnvConfig()).default_estimator
