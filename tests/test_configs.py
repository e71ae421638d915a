"""Per-environment training configurations: every Brax env has one, each is valid at both sizes,
the command line overrides it, and settings.json records the resolved values."""

from __future__ import annotations

import dataclasses
import json

import pytest

from diffpg import cli, configs, envs, estimators
from diffpg.command_line import parse_train_command
from diffpg.configs import CONFIGS, SIZES, config_for
from diffpg.training import TrainSettings, settings_for


def test_every_brax_env_has_a_configuration_with_its_source():
    assert set(envs.BRAX_ENV_NAMES) <= set(CONFIGS)
    assert all(config.source for config in CONFIGS.values())


@pytest.mark.parametrize("env", sorted(CONFIGS))
@pytest.mark.parametrize("sizes", SIZES)
def test_each_configuration_builds_valid_settings(env, sizes):
    for name in {CONFIGS[env].default_estimator, *CONFIGS[env].estimators}:
        settings = settings_for(env, name, sizes=sizes)
        config = config_for(env, name, sizes)
        for key, value in config.trainer.items():
            assert getattr(settings, key) == value
        for key, value in config.estimator.items():
            assert getattr(settings.resolved_estimator_settings, key) == value


def test_the_command_line_overrides_the_configuration():
    settings, *_ = parse_train_command(["--env", "hopper", "--num-envs", "8", "shac",
                                        "--critic-learning-rate", "1e-3"])
    assert settings.num_envs == 8  # given
    assert settings.hidden_sizes == (128, 64, 32)  # SHAC's hopper actor, from the configuration
    assert settings.health_shaping == 2.0  # measured here (BENCHMARKS.md section 2)
    assert settings.resolved_estimator_settings.critic_learning_rate == 1e-3  # given
    assert settings.resolved_estimator_settings.target_critic_keep == 0.2
    assert settings.resolved_estimator_settings.discount == 0.995  # measured (section 2)
    gpu, *_ = parse_train_command(["--env", "hopper", "--sizes", "gpu"])
    assert gpu.num_envs == 2048 and gpu.resolved_estimator_settings.critic_learning_rate == 2e-4
    ppo, *_ = parse_train_command(["--env", "ant", "ppo"])  # Brax's published PPO settings
    assert (ppo.horizon, ppo.resolved_estimator_settings.discount, ppo.minibatches) == (5, 0.97, 8)


@pytest.mark.parametrize("estimator", estimators.names())
def test_an_episode_shorter_than_the_default_horizon_caps_it(estimator):
    """The LQR's episode is 20 steps: every estimator's default horizon (32 for most) becomes
    20, a horizon the user gives is kept, and a longer episode lifts the cap."""
    trained = estimators.make_settings(estimator, **estimators.training_settings(estimator))
    assert settings_for("lqr", estimator).horizon == min(20, trained.horizon)
    given, *_ = parse_train_command(["--env", "lqr", "--horizon", "8"])
    assert given.horizon == 8
    longer, *_ = parse_train_command(["--env", "lqr", "--episode-length", "100", "--horizon",
                                      "64"])
    assert (longer.horizon, longer.episode_length) == (64, 100)
    assert settings_for("lqr", estimator, episode_length=100).horizon == trained.horizon


def test_the_estimator_is_the_subcommand_not_an_options_value():
    """What names the estimator is tyro's reading of the command line: a value that happens to
    be an estimator's name (``--out ppo``) names none, and a flag before the subcommand takes no
    value from it."""
    settings, out, *_ = parse_train_command(["--out", "ppo", "--env", "ant"])
    assert settings.estimator == configs.default_estimator("ant") and str(out) == "ppo"
    ppo, *_ = parse_train_command(["--env", "ant", "--layer-norm", "ppo"])
    assert ppo.estimator == "ppo" and ppo.num_envs == 256  # ppo's ant configuration
    shac, *_ = parse_train_command(["--env", "ant", "--no-layer-norm", "shac", "--window", "8"])
    assert (shac.estimator, shac.layer_norm, shac.resolved_estimator_settings.window) == (
        "shac", False, 8)


def test_settings_json_records_the_resolved_values(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--env", "pendulum", "--updates", "2", "--updates-per-call", "2",
                     "--num-envs", "4", "--eval-envs", "2", "--hidden-sizes", "16",
                     "--out", str(out), "ppo", "--horizon", "4"]) == 0
    values = json.loads((out / "settings.json").read_text())
    assert values["estimator_settings"]["horizon"] == 4  # given
    assert values["estimator_settings"]["entropy_cost"] == 0.01  # PPO's training declaration
    assert values["learning_rate"] == 3e-4 and values["epochs"] == 4  # PPO's trainer declaration
    environment = values.pop("environment")  # what wrote it: versions, commit, device
    assert environment["jax"] and environment["device"] and "commit" in environment
    assert set(values) == {f.name for f in dataclasses.fields(TrainSettings)}


def test_an_estimator_s_settings_class_names_it():
    """Two names on one settings class (or a subclass of another's) would make a settings
    object ambiguous: registration refuses it."""
    settings_class = estimators.registration("shac").settings_class
    with pytest.raises(ValueError, match="its own class"):
        estimators.register("shac_again", settings_class, lambda *a: None)
    assert "shac_again" not in estimators.names()
