"""A user's own estimator, defined here from the public API only, registered with one call,
works everywhere diffpg's own do: the contract, exactness on the LQR, ``diffpg compare``,
``diffpg train`` and ``diffpg --import MODULE``."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_unbiased, independent_estimates, learn
from contract import assert_follows_the_contract
from diffpg.envs.core import SettingError

from diffpg import cli, envs, estimators, returns
from diffpg.acting import unroll
from diffpg.compare import CompareSettings
from diffpg.estimators import Batch, Estimate, Estimator
from diffpg.normalization import normalize
from diffpg.policy import make_gaussian_mlp_policy


@dataclasses.dataclass(frozen=True)
class RunningBaselineSettings:
    """REINFORCE on the whole return with a running-mean baseline (a user's estimator)."""

    horizon: int = 16
    """Steps per estimate."""
    discount: float = 0.99
    """gamma of the objective."""
    baseline_rate: float = 0.1
    """Rate of the exponential moving average of the return used as the baseline."""

    def __post_init__(self):
        if not 0 < self.baseline_rate <= 1:
            raise ValueError(f"baseline_rate={self.baseline_rate} must be in (0, 1]")


def make_running_baseline(env, policy, settings: RunningBaselineSettings) -> Estimator:
    """grad J = E[sum_t grad log pi(u_t|s_t) (R - b)], R the discounted return of the rollout
    (no episode ends within the horizon here), b a running mean of past returns: it does not
    depend on this batch's actions, so the estimate stays unbiased."""

    def init(key, params):
        del key, params
        return {"baseline": jnp.zeros(())}

    def estimate(params, obs_stats, state, env_state, key):
        _, tr = unroll(env, policy, jax.lax.stop_gradient(params), obs_stats, env_state, key,
                       settings.horizon)
        weights = returns.segment_discounts(tr.done, settings.discount)
        total = jnp.sum(weights * tr.reward, axis=0)  # [B]
        obs = normalize(obs_stats, tr.obs)

        def surrogate(p):
            log_prob = jnp.sum(policy.log_prob(p, obs, tr.raw_action), axis=0)  # [B]
            return jnp.mean((total - state["baseline"]) * log_prob)

        return Estimate(jax.grad(surrogate)(params), Batch(tr), env_state,
                        {"objective": jnp.mean(total)})

    def update(params, obs_stats, state, batch, key):
        del params, obs_stats, key
        tr = batch.transitions
        total = jnp.mean(jnp.sum(returns.segment_discounts(tr.done, settings.discount)
                                 * tr.reward, axis=0))
        baseline = state["baseline"] + settings.baseline_rate * (total - state["baseline"])
        return {"baseline": baseline}, {"baseline": baseline}

    return Estimator(init, estimate, update, settings)


@pytest.fixture
def user_estimator():
    estimators.register("running_baseline", RunningBaselineSettings, make_running_baseline)
    yield "running_baseline"
    estimators.unregister("running_baseline")


def test_a_user_estimator_follows_the_contract(user_estimator):
    env = envs.make("pendulum")
    policy = make_gaussian_mlp_policy(env.observation_size, env.action_size, hidden_sizes=(16,))
    starts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(1), 4))
    assert_follows_the_contract(user_estimator, env, policy, policy.init(jax.random.PRNGKey(0)),
                                starts, horizon=6)


def test_a_user_estimator_is_exact_on_the_lqr(lqr, user_estimator):
    estimator = estimators.make(user_estimator, lqr.env, lqr.policy, horizon=lqr.horizon,
                                discount=lqr.discount)
    state = learn(estimator, lqr, estimator.init(jax.random.PRNGKey(0), lqr.params), 20)
    assert float(state["baseline"]) < 0  # it learned the (negative) return
    assert_unbiased(independent_estimates(estimator, lqr, 18000, state=state),
                    lqr.exact_gradient(), resolvable_error=0.2)


def test_a_user_estimator_runs_in_compare_and_train(user_estimator, tmp_path):
    assert user_estimator in [spec.name for spec in CompareSettings().specs]  # the default list
    out = tmp_path / "compare"
    assert cli.main(["compare", "--env", "lqr", "--estimators", user_estimator, "bptt",
                     "--sweep", "none", "--horizon", "4", "--num-estimates", "8",
                     "--num-envs", "4", "--critic-warmup", "5", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert user_estimator in results["results"][0]["estimators"]
    # Reports group estimators by the family each declared; undeclared: "other".
    assert results["families"] == {user_estimator: "other", "bptt": "pathwise"}
    run = tmp_path / "train"
    assert cli.main(["train", "--env", "pendulum", "--updates", "4", "--updates-per-call", "2",
                     "--num-envs", "4", "--eval-envs", "2", "--hidden-sizes", "16",
                     "--out", str(run), user_estimator, "--horizon", "8",
                     "--baseline-rate", "0.5"]) == 0
    settings = json.loads((run / "settings.json").read_text())
    assert settings["estimator"] == user_estimator
    assert settings["estimator_settings"] == {"horizon": 8, "discount": 0.99,
                                              "baseline_rate": 0.5}


def test_a_family_outside_the_known_ones_is_refused():
    with pytest.raises(SettingError, match="family='gradient' is not allowed; allowed values"):
        estimators.register("family_less", RunningBaselineSettings, make_running_baseline,
                            family="gradient")
    assert "family_less" not in estimators.names()


def test_diffpg_import_registers_a_module_s_estimators(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_estimators.py").write_text(
        "from diffpg import estimators\n"
        "from test_user_estimator import RunningBaselineSettings, make_running_baseline\n"
        "estimators.register('imported', RunningBaselineSettings, make_running_baseline)\n")
    monkeypatch.chdir(tmp_path)
    try:
        assert cli.main(["--import", "my_estimators", "train", "--env", "pendulum",
                         "--updates", "2", "--updates-per-call", "2", "--num-envs", "4",
                         "--eval-envs", "2", "--hidden-sizes", "16", "--out",
                         str(tmp_path / "run"), "imported", "--horizon", "4"]) == 0
        assert "imported" in estimators.names()
    finally:
        if "imported" in estimators.names():
            estimators.unregister("imported")
    assert cli.main(["--import", "no_such_module", "train"]) == 2
    assert "no_such_module" in capsys.readouterr().err


def make_shape_bug(env, policy, settings: RunningBaselineSettings) -> Estimator:
    """The running-baseline estimator with a bug: its estimate stacks arrays of two shapes."""
    working = make_running_baseline(env, policy, settings)

    def estimate(params, obs_stats, state, env_state, key):
        jnp.stack([jnp.zeros(2), jnp.zeros(3)])  # ValueError: the arrays' shapes differ
        return working.estimate(params, obs_stats, state, env_state, key)

    return working._replace(estimate=estimate)


def test_a_user_estimator_s_bug_keeps_its_traceback_and_a_bad_setting_stays_one_line(
        tmp_path, capsys):
    """A bug is not a bad setting: the user's ValueError prints its traceback (status 1) and a
    line saying so; the same estimator's own settings check is still a one-line error."""
    estimators.register("shape_bug", RunningBaselineSettings, make_shape_bug)
    try:
        train = ["train", "--env", "pendulum", "--updates", "2", "--updates-per-call", "2",
                 "--num-envs", "4", "--eval-envs", "2", "--hidden-sizes", "16",
                 "--out", str(tmp_path / "run"), "shape_bug", "--horizon", "4"]
        assert cli.main(train + ["--baseline-rate", "2"]) == 2
        error = capsys.readouterr().err
        assert "baseline_rate=2" in error and "Traceback" not in error
        assert len(error.strip().splitlines()) == 1
        assert cli.main(train) == 1
        error = capsys.readouterr().err
        assert "Traceback" in error and "ValueError" in error
        assert error.strip().splitlines()[-1].endswith(
            "the ValueError above is not a bad setting: a defect in diffpg or in a module "
            "given with --import")
    finally:
        estimators.unregister("shape_bug")
