"""The scanned return computations against plain loop transcriptions of their docstrings.

``diffpg.returns`` (``segment_discounts``, ``reward_to_go``, ``episode_total``, ``episode_cumsum``,
``td_lambda_targets``) and ``diffpg.estimators.shac.window_return`` are written as ``jax.lax.scan``
recursions. Here each one is compared, number for number, with a float64 NumPy reference written
as nested ``for t ... for b ...`` loops straight from the equation in its docstring (where a
docstring defines a sum over an episode, the reference forms that sum directly instead of using
the recursion). ``td_lambda_targets`` is also checked against the forward view of the lambda-return
(weighted n-step returns) and its two edge cases: lambda = 0 (one-step TD) and lambda = 1 (Monte
Carlo, bootstrapped only at the window end or at a truncation).

Inputs are random ``[T, B]`` windows; every window holds, in fixed columns, a termination and a
truncation mid-window, a termination and a truncation at the last step, and a column with no
episode end, and random further episode ends elsewhere. The semantic tests at the end perturb one
input and check exactly which outputs move: causality of the reward-to-go, value 0 after
termination but the critic's value after truncation, and ``final_bootstrap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffpg import returns
from diffpg.estimators.shac import window_return

T, B = 7, 5
SEEDS = [0, 1, 2, 3]
DISCOUNT = 0.9
LAMBDA = 0.8
RTOL = ATOL = 1e-5

# jit-compiled once per shape and static argument, so that the many calls below stay fast
segment_discounts = jax.jit(returns.segment_discounts, static_argnums=1)
reward_to_go = jax.jit(returns.reward_to_go, static_argnums=2)
episode_total = jax.jit(returns.episode_total)
episode_cumsum = jax.jit(returns.episode_cumsum)
td_lambda_targets = jax.jit(returns.td_lambda_targets, static_argnums=(4, 5))
jit_window_return = jax.jit(window_return, static_argnums=6)


def make_window(seed: int) -> dict[str, np.ndarray]:
    """A random window of float32 arrays (0/1 for the flags), ``termination`` a subset of ``done``.

    Columns: 0 terminates at step 2 and at the last step; 1 is truncated at step 3 and runs on past
    the window; 2 has no episode end; 3 terminates at step 1 and is truncated at the last step;
    4 is random (as are the other steps of columns 0, 1 and 3 before their last step).
    """
    rng = np.random.default_rng(seed)
    done = rng.random((T, B)) < 0.3
    termination = done & (rng.random((T, B)) < 0.5)
    done[-1, :4] = False
    termination[-1, :4] = False
    done[:, 2] = termination[:, 2] = False
    done[2, 0] = termination[2, 0] = True
    done[-1, 0] = termination[-1, 0] = True
    done[3, 1], termination[3, 1] = True, False
    done[1, 3] = termination[1, 3] = True
    done[-1, 3], termination[-1, 3] = True, False
    assert np.all(termination <= done)
    f32 = np.float32
    return {
        "reward": rng.normal(size=(T, B)).astype(f32),
        "next_value": rng.normal(size=(T, B)).astype(f32),
        "end_value": rng.normal(size=B).astype(f32),
        "start_weight": (1.0 - rng.random(B)).astype(f32),  # in (0, 1]
        "done": done.astype(f32),
        "termination": termination.astype(f32),
        "truncation": (done & ~termination).astype(f32),
    }


def as64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected):
    np.testing.assert_allclose(as64(actual), as64(expected), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# Loop references, transcribed from the docstrings
# --------------------------------------------------------------------------------------------


def ref_segment_discounts(done, discount, initial=None):
    """``w_0 = initial`` (default 1), ``w_{t+1} = 1`` if ``done_t`` else ``discount * w_t``."""
    done = as64(done)
    initial = np.ones(B) if initial is None else as64(initial)
    w = np.zeros((T, B))
    for t in range(T):
        for b in range(B):
            if t == 0:
                w[t, b] = initial[b]
            elif done[t - 1, b] > 0:
                w[t, b] = 1.0
            else:
                w[t, b] = discount * w[t - 1, b]
    return w


def episode_bounds(done, t, b):
    """First and last step (inclusive) of the episode piece that step ``t`` belongs to."""
    start = t
    while start > 0 and done[start - 1, b] == 0:
        start -= 1
    end = t
    while end < T - 1 and done[end, b] == 0:
        end += 1
    return start, end


def ref_reward_to_go(values, done, discount=1.0):
    """``psi_t = sum_{t' >= t, same episode} discount^(t' - t) values_{t'}``."""
    values, done = as64(values), as64(done)
    psi = np.zeros((T, B))
    for t in range(T):
        for b in range(B):
            _, end = episode_bounds(done, t, b)
            for k in range(t, end + 1):
                psi[t, b] += discount ** (k - t) * values[k, b]
    return psi


def ref_episode_total(values, done):
    """``sum_{t' in episode(t)} values_{t'}`` (the part of the episode inside the window)."""
    values, done = as64(values), as64(done)
    total = np.zeros((T, B))
    for t in range(T):
        for b in range(B):
            start, end = episode_bounds(done, t, b)
            for k in range(start, end + 1):
                total[t, b] += values[k, b]
    return total


def ref_episode_cumsum(values, done):
    """``c_t = sum_{t' <= t, same episode} values_{t'}``."""
    values, done = as64(values), as64(done)
    cumsum = np.zeros((T, B))
    for t in range(T):
        for b in range(B):
            start, _ = episode_bounds(done, t, b)
            for k in range(start, t + 1):
                cumsum[t, b] += values[k, b]
    return cumsum


def ref_td_lambda(reward, next_value, termination, done, discount, lam):
    """``G_t = r_t + gamma (1 - term_t) [(1 - lam c_t) V_t + lam c_t G_{t+1}]``, with ``c_t = 0``
    where ``done_t`` or ``t = T - 1``, else 1 (evaluated backwards in time)."""
    r, v, term, done = as64(reward), as64(next_value), as64(termination), as64(done)
    g = np.zeros((T, B))
    for t in reversed(range(T)):
        for b in range(B):
            c = 0.0 if (done[t, b] > 0 or t == T - 1) else 1.0
            future = g[t + 1, b] if t + 1 < T else 0.0
            blended = (1.0 - lam * c) * v[t, b] + lam * c * future
            g[t, b] = r[t, b] + discount * (1.0 - term[t, b]) * blended
    return g


def ref_lambda_return_forward(reward, next_value, termination, done, discount, lam):
    """Forward view: ``G_t = (1 - lam) sum_{n < N} lam^(n-1) G^(n)_t + lam^(N-1) G^(N)_t``.

    ``N = e - t + 1`` where ``e >= t`` is the first step that ends the episode or the window;
    ``G^(n)_t = sum_{i < n} gamma^i r_{t+i} + gamma^n (1 - term_{t+n-1}) V_{t+n-1}``.
    """
    r, v, term, done = as64(reward), as64(next_value), as64(termination), as64(done)
    g = np.zeros((T, B))
    for t in range(T):
        for b in range(B):
            _, e = episode_bounds(done, t, b)
            steps = e - t + 1
            for n in range(1, steps + 1):
                n_step = sum(discount**i * r[t + i, b] for i in range(n))
                last = t + n - 1
                n_step += discount**n * (1.0 - term[last, b]) * v[last, b]
                weight = lam ** (n - 1) if n == steps else (1.0 - lam) * lam ** (n - 1)
                g[t, b] += weight * n_step
    return g


def ref_window_return(reward, done, truncation, next_value, end_value, start_weight, discount,
                      final_bootstrap):
    """``total = sum_t w_t r_t + sum_t w_t gamma trunc_t V(s'_t) + w_last gamma (1 - done_last)
    V(s_T)``, ``rewards = sum_t w_t r_t``; ``final_bootstrap = 0`` removes both bootstraps of the
    last step. The weights are written in closed form: ``w_t = start_weight gamma^t`` in the
    episode running when the window starts, ``gamma^(t - start)`` in one starting inside it."""
    r, done, trunc = as64(reward), as64(done), as64(truncation)
    v, v_end, w0 = as64(next_value), as64(end_value), as64(start_weight)
    w = np.zeros((T, B))
    total, rewards, next_weight = np.zeros(B), np.zeros(B), np.zeros(B)
    for t in range(T):
        for b in range(B):
            start, _ = episode_bounds(done, t, b)
            w[t, b] = w0[b] * discount**t if start == 0 else discount ** (t - start)
            may_bootstrap = final_bootstrap if t == T - 1 else 1.0
            rewards[b] += w[t, b] * r[t, b]
            total[b] += w[t, b] * r[t, b]
            total[b] += w[t, b] * discount * trunc[t, b] * may_bootstrap * v[t, b]
    for b in range(B):
        total[b] += w[-1, b] * discount * (1.0 - done[-1, b]) * final_bootstrap * v_end[b]
        next_weight[b] = 1.0 if done[-1, b] > 0 else discount * w[-1, b]
    return total, rewards, next_weight


def ref_survival_window_return(x, survival_probability, final_bootstrap):
    """``window_return``'s total with a survival probability ``p [T, B]``, written as the
    expected return of an episode that ends after step ``t`` with probability ``1 - p_t`` (on
    top of the task's ends): rewards weighted by the probability of being alive before their
    step, values by the probability after it; the product over steps restarts at the window's
    start and after each task's end, as the discount does."""
    r, done, trunc = as64(x["reward"]), as64(x["done"]), as64(x["truncation"])
    v, v_end, p = as64(x["next_value"]), as64(x["end_value"]), as64(survival_probability)
    w = ref_segment_discounts(x["done"], DISCOUNT, x["start_weight"])
    total = np.zeros(B)
    for b in range(B):
        alive = 1.0
        for t in range(T):
            may_bootstrap = final_bootstrap if t == T - 1 else 1.0
            total[b] += w[t, b] * alive * r[t, b]
            alive_after = alive * p[t, b]
            total[b] += w[t, b] * alive_after * DISCOUNT * trunc[t, b] * may_bootstrap * v[t, b]
            if t == T - 1:
                total[b] += (w[t, b] * alive_after * DISCOUNT * (1.0 - done[t, b])
                             * final_bootstrap * v_end[b])
            alive = 1.0 if done[t, b] > 0 else alive_after
    return total


def call_window_return(x, final_bootstrap, discount=DISCOUNT, **overrides):
    x = {**x, **overrides}
    return jit_window_return(
        jnp.asarray(x["reward"]), jnp.asarray(x["done"]), jnp.asarray(x["truncation"]),
        jnp.asarray(x["next_value"]), jnp.asarray(x["end_value"]), jnp.asarray(x["start_weight"]),
        discount, jnp.float32(final_bootstrap),
    )


def call_td_lambda(x, lam, discount=DISCOUNT, **overrides):
    x = {**x, **overrides}
    return td_lambda_targets(
        jnp.asarray(x["reward"]), jnp.asarray(x["next_value"]), jnp.asarray(x["termination"]),
        jnp.asarray(x["done"]), discount, lam,
    )


# --------------------------------------------------------------------------------------------
# Scans == loops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_segment_discounts_matches_loop(seed):
    x = make_window(seed)
    done = jnp.asarray(x["done"])
    assert_close(
        segment_discounts(done, DISCOUNT), ref_segment_discounts(x["done"], DISCOUNT)
    )
    assert_close(
        segment_discounts(done, DISCOUNT, jnp.asarray(x["start_weight"])),
        ref_segment_discounts(x["done"], DISCOUNT, x["start_weight"]),
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_episode_sums_match_loops(seed):
    x = make_window(seed)
    values = x["start_weight"] * x["reward"]  # any [T, B] values; here like w * r
    done = jnp.asarray(x["done"])
    assert_close(
        reward_to_go(jnp.asarray(values), done), ref_reward_to_go(values, x["done"])
    )
    assert_close(  # Monte-Carlo returns from each step (the value baseline's targets)
        reward_to_go(jnp.asarray(x["reward"]), done, DISCOUNT),
        ref_reward_to_go(x["reward"], x["done"], DISCOUNT),
    )
    assert_close(
        episode_total(jnp.asarray(values), done), ref_episode_total(values, x["done"])
    )
    assert_close(
        episode_cumsum(jnp.asarray(values), done), ref_episode_cumsum(values, x["done"])
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lam", [0.0, LAMBDA, 1.0])
def test_td_lambda_targets_match_loops(seed, lam):
    x = make_window(seed)
    targets = call_td_lambda(x, lam)
    args = (x["reward"], x["next_value"], x["termination"], x["done"], DISCOUNT, lam)
    assert_close(targets, ref_td_lambda(*args))
    assert_close(targets, ref_lambda_return_forward(*args))


@pytest.mark.parametrize("seed", SEEDS)
def test_td_zero_is_one_step_bootstrap(seed):
    """lambda = 0: ``G_t = r_t + gamma (1 - term_t) V(s'_t)`` at every step."""
    x = make_window(seed)
    expected = np.zeros((T, B))
    for t in range(T):
        for b in range(B):
            expected[t, b] = (
                x["reward"][t, b]
                + DISCOUNT * (1.0 - x["termination"][t, b]) * float(x["next_value"][t, b])
            )
    assert_close(call_td_lambda(x, 0.0), expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_td_one_is_monte_carlo_bootstrapped_at_window_end_or_truncation(seed):
    """lambda = 1: discounted rewards to the end ``e`` of the episode piece, plus
    ``gamma^(e - t + 1) V(s'_e)`` unless the episode terminated at ``e``."""
    x = make_window(seed)
    r, v, term, done = (as64(x[k]) for k in ("reward", "next_value", "termination", "done"))
    expected = np.zeros((T, B))
    for t in range(T):
        for b in range(B):
            _, e = episode_bounds(done, t, b)
            for k in range(t, e + 1):
                expected[t, b] += DISCOUNT ** (k - t) * r[k, b]
            if term[e, b] == 0:
                expected[t, b] += DISCOUNT ** (e - t + 1) * v[e, b]
    assert_close(call_td_lambda(x, 1.0), expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("final_bootstrap", [0.0, 1.0])
def test_window_return_matches_loop(seed, final_bootstrap):
    x = make_window(seed)
    actual = call_window_return(x, final_bootstrap)
    expected = ref_window_return(
        x["reward"], x["done"], x["truncation"], x["next_value"], x["end_value"],
        x["start_weight"], DISCOUNT, final_bootstrap,
    )
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == (B,)
        assert_close(a, e)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("final_bootstrap", [0.0, 1.0])
def test_termination_gradient_is_zero_valued_with_the_critic_gradient_at_terminations(
        seed, final_bootstrap):
    """With ``termination`` given, the totals are unchanged and ``d total_b / d V(s'_t)`` gains
    ``w_t gamma term_t`` on top of the truncation bootstrap's ``w_t gamma trunc_t`` (the last
    step's only if ``final_bootstrap``), with ``w`` the loop's segment discounts."""
    x = make_window(seed)
    arrays = {k: jnp.asarray(v) for k, v in x.items()}

    def totals(next_value, termination):
        return window_return(arrays["reward"], arrays["done"], arrays["truncation"], next_value,
                             arrays["end_value"], arrays["start_weight"], DISCOUNT,
                             jnp.float32(final_bootstrap), termination=termination)[0]

    plain = totals(arrays["next_value"], None)
    with_gradient = totals(arrays["next_value"], arrays["termination"])
    assert_close(with_gradient, plain)

    gradient = jax.grad(lambda v: jnp.sum(totals(v, arrays["termination"])))(
        arrays["next_value"])
    w = ref_segment_discounts(x["done"], DISCOUNT, x["start_weight"])
    may_bootstrap = np.ones((T, 1))
    may_bootstrap[-1] = final_bootstrap
    expected = w * DISCOUNT * (as64(x["truncation"]) * may_bootstrap + as64(x["termination"]))
    assert np.any(x["termination"] > 0)
    assert_close(gradient, expected)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("final_bootstrap", [0.0, 1.0])
def test_survival_weights_the_window_return_as_an_expected_return(seed, final_bootstrap):
    """With ``survival_probability`` the total is the loop's expected return, ``rewards`` (the
    task's) is unchanged, and a probability of 1 everywhere changes nothing."""
    x = make_window(seed)
    arrays = {k: jnp.asarray(v) for k, v in x.items()}
    probability = np.random.default_rng(seed + 100).uniform(0.3, 1.0, (T, B)).astype(np.float32)

    def call(survival_probability):
        return window_return(arrays["reward"], arrays["done"], arrays["truncation"],
                             arrays["next_value"], arrays["end_value"], arrays["start_weight"],
                             DISCOUNT, jnp.float32(final_bootstrap),
                             survival_probability=survival_probability)

    plain = call(None)
    weighted = call(jnp.asarray(probability))
    assert_close(weighted[0], ref_survival_window_return(x, probability, final_bootstrap))
    assert_close(weighted[1], plain[1])
    assert_close(weighted[2], plain[2])
    for a, e in zip(call(jnp.ones((T, B))), plain, strict=True):
        assert_close(a, e)
    assert not np.allclose(as64(weighted[0]), as64(plain[0]))


@pytest.mark.parametrize("seed", SEEDS)
def test_survival_restarts_after_an_episode_and_where_told(seed):
    rng = np.random.default_rng(seed)
    probability = rng.uniform(0.3, 1.0, (T, B)).astype(np.float32)
    done = (rng.random((T, B)) < 0.3).astype(np.float32)
    restart = (rng.random(T) < 0.3).astype(np.float32)
    before, after = jax.jit(returns.survival)(probability, done, restart)
    expected_before, expected_after = np.ones((T, B)), np.ones((T, B))
    for b in range(B):
        alive = 1.0
        for t in range(T):
            if restart[t]:
                alive = 1.0
            expected_before[t, b] = alive
            alive *= float(probability[t, b])
            expected_after[t, b] = alive
            if done[t, b]:
                alive = 1.0
    assert_close(before, expected_before)
    assert_close(after, expected_after)


@pytest.mark.parametrize("seed", SEEDS)
def test_window_return_chains_into_segment_discounts(seed):
    """Two windows threaded by ``next_weight`` weigh rewards as one window twice as long."""
    first, second = make_window(seed), make_window(seed + 100)
    _, rewards_1, next_weight = call_window_return(first, 1.0)
    _, rewards_2, _ = call_window_return(second, 1.0, start_weight=np.asarray(next_weight))
    done = np.concatenate([first["done"], second["done"]])
    reward = np.concatenate([first["reward"], second["reward"]])
    weights = segment_discounts(
        jnp.asarray(done), DISCOUNT, jnp.asarray(first["start_weight"])
    )
    assert_close(rewards_1 + rewards_2, jnp.sum(weights * reward, axis=0))


# --------------------------------------------------------------------------------------------
# Semantics: which inputs each output may depend on
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_reward_to_go_is_causal_and_stays_in_its_episode(seed):
    """Perturbing ``values_s`` moves ``psi_t`` by exactly the perturbation when ``t <= s`` in the
    same episode, and leaves it unchanged otherwise: past rewards (``s < t``) and rewards of a
    later episode never enter."""
    x = make_window(seed)
    values, done = x["reward"], x["done"]
    base = as64(reward_to_go(jnp.asarray(values), jnp.asarray(done)))
    delta = 3.0
    for s in range(T):
        bumped = values.copy()
        bumped[s] += delta
        change = as64(reward_to_go(jnp.asarray(bumped), jnp.asarray(done))) - base
        expected = np.zeros((T, B))
        for t in range(T):
            for b in range(B):
                same_episode = t <= s and not np.any(done[t:s, b] > 0)
                expected[t, b] = delta if same_episode else 0.0
        np.testing.assert_allclose(change, expected, atol=1e-5)
        assert np.all(change[s + 1 :] == 0.0)  # r_{t-1} (or earlier) never enters psi_t...
    # ...and a reward after an episode end never enters the steps up to that end (column 0 ends
    # at step 2, so steps 0..2 ignore step 3)
    bumped = values.copy()
    bumped[3, 0] += delta
    change = as64(reward_to_go(jnp.asarray(bumped), jnp.asarray(done))) - base
    assert np.all(change[:3, 0] == 0.0)
    assert change[3, 0] == pytest.approx(delta)


@pytest.mark.parametrize("lam", [0.0, LAMBDA, 1.0])
def test_td_lambda_value_zero_after_termination_kept_after_truncation(lam):
    x = make_window(0)
    base = np.asarray(call_td_lambda(x, lam), np.float64)

    def with_value_bumped(t, b, delta=5.0):
        next_value = x["next_value"].copy()
        next_value[t, b] += delta
        return np.asarray(call_td_lambda(x, lam, next_value=next_value), np.float64)

    # termination mid-window (column 0, step 2) and at the last step (column 0, step T-1):
    # V(s'_t) is not used, at that step or anywhere else
    for t in (2, T - 1):
        assert x["termination"][t, 0] == 1
        np.testing.assert_array_equal(with_value_bumped(t, 0), base)
    # truncation mid-window (column 1, step 3) and at the last step (column 3): G_t = r_t + gamma V
    for t, b in ((3, 1), (T - 1, 3)):
        assert x["truncation"][t, b] == 1
        change = with_value_bumped(t, b) - base
        assert change[t, b] == pytest.approx(DISCOUNT * 5.0, rel=1e-5)
        assert np.all(change[t + 1 :] == 0.0)
    # the window end without an episode end also bootstraps (column 2)
    change = with_value_bumped(T - 1, 2) - base
    assert change[T - 1, 2] == pytest.approx(DISCOUNT * 5.0, rel=1e-5)


@pytest.mark.parametrize("final_bootstrap", [0.0, 1.0])
def test_window_return_bootstraps_only_where_allowed(final_bootstrap):
    x = make_window(1)
    base = [as64(out) for out in call_window_return(x, final_bootstrap)]
    weights = as64(segment_discounts(
        jnp.asarray(x["done"]), DISCOUNT, jnp.asarray(x["start_weight"])
    ))
    delta = 5.0

    def total_change(**overrides):
        return as64(call_window_return(x, final_bootstrap, **overrides)[0]) - base[0]

    def bump_next_value(t, b):
        next_value = x["next_value"].copy()
        next_value[t, b] += delta
        return total_change(next_value=next_value)

    # termination (column 0: step 2 and the last step): V(s'_t) ignored
    for t in (2, T - 1):
        np.testing.assert_array_equal(bump_next_value(t, 0), 0.0)
    # mid-window truncation (column 1, step 3): used with weight w_t gamma
    expected = np.zeros(B)
    expected[1] = weights[3, 1] * DISCOUNT * delta
    np.testing.assert_allclose(bump_next_value(3, 1), expected, rtol=1e-5, atol=1e-5)
    # truncation at the last step (column 3): used only when final_bootstrap = 1
    expected = np.zeros(B)
    expected[3] = final_bootstrap * weights[-1, 3] * DISCOUNT * delta
    np.testing.assert_allclose(bump_next_value(T - 1, 3), expected, rtol=1e-5, atol=1e-5)
    # end value: used only in columns whose episode runs past the window, and final_bootstrap = 1
    expected = final_bootstrap * (1.0 - as64(x["done"][-1])) * weights[-1] * DISCOUNT * delta
    assert expected[0] == expected[3] == 0.0 and (final_bootstrap == 0.0 or expected[2] != 0.0)
    np.testing.assert_allclose(
        total_change(end_value=x["end_value"] + np.float32(delta)), expected, rtol=1e-5, atol=1e-5
    )
    # the reward-only sum never sees a value
    next_value = x["next_value"] + np.float32(delta)
    _, rewards, _ = call_window_return(
        x, final_bootstrap, next_value=next_value, end_value=x["end_value"] + np.float32(delta)
    )
    np.testing.assert_array_equal(as64(rewards), base[1])
