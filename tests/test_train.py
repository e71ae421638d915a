"""The training loop: learning on a small task, exact resume, evaluation of a saved run."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiles
from diffpg.envs.core import SettingError
from PIL import Image

from diffpg import cli
from diffpg.checkpoints import checkpoint_updates, restore_checkpoint
from diffpg.runs import TrainingStopped, evaluate_run, train
from diffpg.training import TrainSettings, make_optimizer, make_trainer, select_seed, settings_for
from diffpg.video import episode_states, save_gif


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def zero_action(params):
    """The policy that does nothing: every mean parameter 0, so the mean action is tanh(0) = 0."""
    return params | {"mean": jax.tree.map(jnp.zeros_like, params["mean"])}


class Learned(NamedTuple):
    zero: float  # deterministic eval return of the do-nothing policy
    fresh: float  # of the policy before training
    trained: float
    pass_mark: float
    metrics: dict


def _learn(settings: TrainSettings, best_possible: float, fraction: float,
           gif=None) -> Learned:
    """Train, then check learning against doing nothing.

    The pass mark lies ``fraction`` of the way from the better of the do-nothing and the fresh
    policy's return (measured here, on the same evaluation episodes) to ``best_possible``, the
    return's upper bound: a policy that does nothing, or nothing new, cannot reach it. Asserts
    that the trained policy passes and the do-nothing one fails the same check, and that no
    update was skipped; with ``gif`` (a path) also draws the trained policy.
    """
    trainer = make_trainer(settings)
    state = trainer.init(jax.random.PRNGKey(settings.seed))

    def evaluate(params):
        return float(trainer.evaluate(state._replace(params=params),
                                      jax.random.PRNGKey(1))["eval/episode_reward"])

    zero, fresh = evaluate(zero_action(state.params)), evaluate(state.params)
    for _ in range(settings.updates // settings.updates_per_call):
        state, metrics = trainer.run_updates(state)
    trained = float(trainer.evaluate(state, jax.random.PRNGKey(1))["eval/episode_reward"])
    floor = max(zero, fresh)
    pass_mark = floor + fraction * (best_possible - floor)
    print(f"{settings.env} {settings.estimator}: do nothing {zero:.0f}, fresh {fresh:.0f} -> "
          f"trained {trained:.0f} (pass mark {pass_mark:.0f})")
    assert int(metrics["training/nonfinite_updates"]) == 0
    assert not zero > pass_mark  # the check, applied to doing nothing, fails
    assert trained > pass_mark
    if gif is not None:
        positions, rewards = episode_states(trainer.env, trainer.policy, state.params,
                                            state.obs_stats,
                                            jax.random.PRNGKey(1), trainer.env.episode_length)
        save_gif(trainer.env, positions, rewards, gif, every=10)
        frames = Image.open(gif).n_frames
        assert frames == len(range(0, len(positions), 10)) and len(positions) > 1
        # The video's episode is one of the evaluation's starts: its return is in range.
        assert float(np.sum(rewards)) > floor
    return Learned(zero, fresh, trained, pass_mark, metrics)


CARTPOLE_BEST = 0.0
"""Cart-pole swing-up's reward is a cost, at most 0 per step."""


@pytest.mark.slow
def test_shac_learns_cartpole_swing_up(tmp_path):
    """From a fresh policy (about -5,600) and doing nothing (about -2,350, the pole hanging),
    SHAC swings the pole up: a third of the way from doing nothing to a perfect 0 in 150
    updates of 32 envs on a CPU."""
    _learn(settings_for(updates=150, updates_per_call=50, num_envs=32, eval_envs=8),
           CARTPOLE_BEST, fraction=1 / 3, gif=tmp_path / "policy.gif")


@pytest.mark.slow
@pytest.mark.parametrize(("estimator", "updates"), [("reinforce", 300), ("ppo", 300),
                                                    ("critic_backprop", 150)])
def test_other_estimators_learn_cartpole(estimator, updates):
    """REINFORCE (value baseline), PPO and critic backprop (replay buffer) beat doing nothing on
    cart-pole by a quarter of the way to a perfect 0."""
    learned = _learn(settings_for(estimator=estimator, updates=updates, updates_per_call=50,
                                  num_envs=32, eval_envs=8), CARTPOLE_BEST, fraction=0.25)
    if estimator == "critic_backprop":  # the replayed critic's TD error settles
        assert float(learned.metrics["training/critic_loss"]) < 100.0


@pytest.mark.slow
def test_shac_learns_pendulum_swing_up():
    """Hanging still returns -400 (angle cost 2 for 200 steps). With the default velocity cost
    (0.1) small swings cost more than they gain (0.49 A^2 against 0.25 A^2 per step for amplitude
    A), so hanging is a local optimum no gradient leaves; with velocity_cost=0.01 SHAC pumps the
    pendulum up, 15% of the way from hanging to a perfect 0, in 100 updates."""
    _learn(settings_for(env="pendulum", env_options=("velocity_cost=0.01",), updates=100,
                        updates_per_call=50, num_envs=32, eval_envs=8), 0.0, fraction=0.15)


@pytest.mark.slow
def test_shac_learns_brax_inverted_pendulum(tmp_path):
    """Brax physics (spring backend): the fresh and the do-nothing policy keep the pole up for a
    few dozen of 100 steps (reward 1 per step alive); after 20 SHAC updates of 16 envs it holds
    it for most of the episode, 80% of the way to the full 100. The video draws Brax bodies."""
    _learn(settings_for(env="inverted_pendulum", episode_length=100, num_envs=16, horizon=16,
                        updates=20, updates_per_call=20, eval_envs=8),
           100.0, fraction=0.8, gif=tmp_path / "policy.gif")


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    settings = settings_for(env="pendulum", updates=4, updates_per_call=2, num_envs=4,
                             horizon=8, eval_envs=2, hidden_sizes=(16,))
    whole = train(settings, tmp_path / "whole")
    train(settings, tmp_path / "split", stop_at_update=2)  # interrupted after the first call
    resumed = train(settings, tmp_path / "split", resume=True)
    for a, b in zip(_params(whole), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    with (tmp_path / "split" / "metrics.csv").open() as handle:
        assert [int(r["update"]) for r in csv.DictReader(handle)] == [2, 4]


def test_eval_of_a_saved_run_returns_the_logged_reward(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(["train", "--env", "pendulum", "--updates", "2", "--updates-per-call", "2",
                       "--num-envs", "4", "--horizon", "8", "--eval-envs", "2",
                       "--hidden-sizes", "16", "--out", str(out)])
    assert status == 0
    with (out / "metrics.csv").open() as handle:
        logged = float(list(csv.DictReader(handle))[-1]["eval/episode_reward"])
    assert evaluate_run(out)["eval/episode_reward"] == pytest.approx(logged, rel=1e-6)
    scalars = _tensorboard_scalars(out / "tensorboard")
    assert scalars["eval/episode_reward"] == [(64, pytest.approx(logged, rel=1e-6))]  # 2 x 4 x 8 steps
    assert {"training/sps", "training/walltime", "training/grad_norm"} <= set(scalars)
    assert cli.main(["eval", str(out)]) == 0
    assert "eval/episode_reward" in capsys.readouterr().out
    assert cli.main(["video", str(out), "--every", "50"]) == 0
    # 200 states drawn: after the last step the wrapper already holds the next episode.
    assert Image.open(out / "policy.gif").n_frames == 4


def test_eval_chooses_its_episodes_seed_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--env", "pendulum", "--updates", "4", "--updates-per-call", "2",
                     "--num-envs", "4", "--horizon", "8", "--eval-envs", "2",
                     "--hidden-sizes", "16", "--out", str(out)]) == 0
    with (out / "metrics.csv").open() as handle:
        logged = {int(r["update"]): float(r["eval/episode_reward"]) for r in csv.DictReader(handle)}
    # The checkpoint of update 2 with the run's own key: that update's logged evaluation.
    first = evaluate_run(out, checkpoint=2)
    assert first["update"] == 2
    assert first["eval/episode_reward"] == pytest.approx(logged[2], rel=1e-6)
    # Other starts: another number, the same one twice.
    other = evaluate_run(out, episodes=3, seed=7)
    assert other == evaluate_run(out, episodes=3, seed=7)
    assert other["update"] == 4 and other["eval/episode_reward"] != pytest.approx(logged[4])
    capsys.readouterr()
    for arguments, message in [(["--checkpoint", "3"], "checkpoint=3 is not one of the run's "
                                                      "checkpoints; allowed: [2, 4]"),
                               (["--episodes", "0"], "episodes=0"),
                               # beyond the memory: named as this command's option
                               (["--episodes", str(10**9)], "episodes=1000000000 (x seeds=1, "
                                                           "episode_length=200) needs at least"),
                               # states 3 GB, steps 208 GB: the steps count too
                               (["--episodes", str(2 * 10**7)], "GiB for the evaluation's states "
                                                              "and steps alone"),
                               (["--seed", str(2**64)], "seed=")]:
        assert cli.main(["eval", str(out), *arguments]) == 2, arguments
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error


@pytest.mark.parametrize(("arguments", "message"), [
    (["--env", "nowhere"], "env='nowhere'"),
    (["--num-envs", "0"], "num_envs"),
    (["--env", "pendulum", "--horizon", "500"], "horizon=500"),
    (["--final-learning-rate", "1.0"], "final_learning_rate"),
])
def test_train_bad_settings_are_one_line_errors(tmp_path, capsys, arguments, message):
    out = tmp_path / "never"
    with compiles() as compiled:
        assert cli.main(["train", "--out", str(out), *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1, error
    assert compiled == [] and not out.exists()


def test_resume_of_a_folder_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path)]) == 2
    assert "settings.json" in capsys.readouterr().err



def test_a_non_finite_gradient_never_reaches_the_parameters():
    settings = settings_for(env="pendulum", updates=25)
    optimizer = make_optimizer(settings)
    params = {"w": jax.numpy.ones(3)}
    opt_state = optimizer.init(params)
    bad = {"w": jax.numpy.array([1.0, float("nan"), 0.0])}
    updates, opt_state = optimizer.update(bad, opt_state, params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_array_equal(new["w"], params["w"])
    good = {"w": jax.numpy.array([1.0, 2.0, 0.0])}
    updates, _ = optimizer.update(good, opt_state, params)
    assert np.all(np.isfinite(updates["w"])) and np.any(updates["w"] != 0)


def test_a_finite_gradient_that_would_overflow_the_parameters_is_skipped_and_counted():
    """A learning rate float32 holds, whose Adam steps (each about the learning rate in size)
    overflow the parameters at the third: that step and the next are skipped and counted, and
    the parameters stay finite."""
    from diffpg.options import FLOAT32_MAX
    from diffpg.training import keep_finite_parameters

    rate = FLOAT32_MAX / 2.5
    settings = settings_for(env="pendulum", updates=25, learning_rate=rate,
                            final_learning_rate=rate)
    optimizer = make_optimizer(settings)
    params = {"w": jnp.ones(3)}
    opt_state = optimizer.init(params)
    changed = []
    for _ in range(4):
        grad = {"w": jnp.array([1.0, -2.0, 0.5])}
        updates, new_opt_state = optimizer.update(grad, opt_state, params)
        before = params
        params, opt_state = keep_finite_parameters(params, opt_state,
                                                   optax_apply(params, updates), new_opt_state)
        assert np.all(np.isfinite(params["w"]))
        changed.append(bool(np.any(params["w"] != before["w"])))
    assert changed == [True, True, False, False]
    assert int(opt_state.total_notfinite) == 2 and not bool(opt_state.last_finite)
    np.testing.assert_allclose(np.abs(params["w"]), 2 * rate, rtol=1e-3)


def optax_apply(params, updates):
    return jax.tree.map(lambda p, u: p + u, params, updates)


def test_a_corrupt_checkpoint_is_a_clear_error_and_changes_nothing(tmp_path, capsys):
    settings = settings_for(env="pendulum", updates=2, updates_per_call=2, num_envs=4,
                             horizon=8, eval_envs=2, hidden_sizes=(16,))
    out = tmp_path / "run"
    train(settings, out)
    for path in (out / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"garbage")
    before = sorted((p.name, p.read_bytes()) for p in (out / "checkpoints").rglob("*")
                    if p.is_file())
    metrics_before = (out / "metrics.csv").read_text()
    assert cli.main(["train", "--resume", str(out)]) == 2
    assert "cannot be restored" in capsys.readouterr().err
    after = sorted((p.name, p.read_bytes()) for p in (out / "checkpoints").rglob("*")
                   if p.is_file())
    assert before == after and (out / "metrics.csv").read_text() == metrics_before
    assert (out / "learning_curve.png").stat().st_size > 0


def test_compare_runs_on_a_trained_policy(tmp_path, capsys):
    settings = settings_for(env="pendulum", updates=2, updates_per_call=2, num_envs=4,
                             horizon=8, eval_envs=2, hidden_sizes=(16,))
    run = tmp_path / "run"
    trained = train(settings, run)
    out = tmp_path / "compare"
    status = cli.main(["compare", "--env", "pendulum", "--policy-checkpoint", str(run),
                       "--estimators", "bptt", "--sweep", "none", "--horizon", "4",
                       "--num-estimates", "4", "--num-envs", "2", "--reference-estimates", "8",
                       "--out", str(out)])
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert results["num_parameters"] == sum(x.size for x in _params(trained))
    # The checkpoint it read is recorded: a resume after the run trained further reads the
    # same policy (or, once that checkpoint is gone, refuses), never a mix of two.
    assert results["settings"]["policy_update"] == 2
    assert cli.main(["compare", "--env", "lqr", "--policy-checkpoint", str(run),
                     "--out", str(tmp_path / "never")]) == 2
    assert "trained on env='pendulum'" in capsys.readouterr().err


def test_compare_rebuilds_the_trained_policy_with_its_own_network(tmp_path):
    """A run trained with a non-default activation and without layer norm: the comparison's
    policy, with the parameters and statistics it loads, gives the trained policy's actions."""
    from diffpg.compare import CompareSettings, make_env_and_policy
    from diffpg.runs import load_trained_policy

    settings = settings_for(env="pendulum", updates=2, updates_per_call=2, num_envs=4,
                             horizon=8, eval_envs=2, hidden_sizes=(8, 8), activation="relu",
                             layer_norm=False)
    run = tmp_path / "run"
    trained = train(settings, run)
    trainer = make_trainer(settings)
    compare = CompareSettings(env="pendulum", policy_checkpoint=str(run), sweep="none",
                              horizon=4, hidden_sizes=(32, 32))
    _, policy, _ = make_env_and_policy(compare)
    params, obs_stats, update = load_trained_policy(run)
    assert update == 2
    observations = jax.random.normal(jax.random.PRNGKey(3), (5, trainer.env.observation_size))
    for a, b in zip(policy.distribution(params, observations),
                    trainer.policy.distribution(trained.params, observations), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(obs_stats.mean), np.asarray(trained.obs_stats.mean))
    # Other hidden sizes asked for beside the checkpoint: one line naming the setting.
    with pytest.raises(SettingError, match=r"hidden_sizes=\(16,\) is not the network of"):
        CompareSettings(env="pendulum", policy_checkpoint=str(run), hidden_sizes=(16,))
    CompareSettings(env="pendulum", policy_checkpoint=str(run), hidden_sizes=(8, 8))  # its own
    # Which seed's policy: one of the run's seeds, and only with a run; errors name the setting.
    for arguments, message in [
        ({"policy_checkpoint": str(run), "policy_seed_index": 1},
         r"policy_seed_index=1 is not a seed of .* allowed: 0\.\.0"),
        ({"policy_seed_index": 1}, "policy_seed_index=1 is read only with policy_checkpoint"),
        ({"policy_checkpoint": ""}, "policy_checkpoint='' names no folder"),
        ({"policy_checkpoint": str(run), "policy_update": 4},
         r"policy_update=4 is not a checkpoint of .* \(allowed: \[2\]; a comparison resumed"),
        ({"policy_update": 2}, "policy_update=2 is read only with policy_checkpoint"),
        ({"policy_checkpoint": str(tmp_path / "nope")}, "policy_checkpoint=.* is not a folder"),
    ]:
        with pytest.raises(SettingError, match=message):
            CompareSettings(env="pendulum", **arguments)


@pytest.mark.slow
def test_a_killed_run_resumes_bit_exactly_from_its_last_checkpoint(tmp_path):
    """SIGKILL a training process at an arbitrary point after its first checkpoint; ``--resume``
    continues from the last complete checkpoint, ends with the parameters of an uninterrupted
    run, and the metrics rows join (one per call, no gap, no repeat)."""
    arguments = ["--env", "pendulum", "--updates", "20", "--updates-per-call", "2",
                 "--num-envs", "4", "--horizon", "8", "--eval-envs", "2", "--hidden-sizes", "16"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "diffpg.cli", "train", *arguments,
                                "--out", str(killed)], env=os.environ | {"PYTHONPATH": os.getcwd()},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(checkpoint_updates(killed)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = checkpoint_updates(killed)[-1]
    assert 2 <= interrupted_at < 20, "the process must be killed mid-run"

    assert cli.main(["train", "--resume", str(killed)]) == 0
    whole = tmp_path / "whole"
    assert cli.main(["train", *arguments, "--out", str(whole)]) == 0
    settings = settings_for(env="pendulum", updates=20, updates_per_call=2, num_envs=4,
                             horizon=8, eval_envs=2, hidden_sizes=(16,))
    template = make_trainer(settings).init(jax.random.PRNGKey(0))
    for a, b in zip(_params(restore_checkpoint(killed, template)[0]),
                    _params(restore_checkpoint(whole, template)[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    with (killed / "metrics.csv").open() as handle:
        assert [int(r["update"]) for r in csv.DictReader(handle)] == list(range(2, 21, 2))




def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TFRecord event files in ``folder``."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_every_64_bit_seed_draws_its_own_keys():
    """JAX keeps a seed's low 32 bits: seeds 2**32 apart trained, evaluated and compared as one
    run, and seed + arange(seeds) overflowed int32 above 2**31 (a traceback). A seed below
    2**32 keeps its key; a run's seeds from 3e9 on start."""
    from diffpg.options import seed_key

    np.testing.assert_array_equal(seed_key(5), jax.random.PRNGKey(5))
    np.testing.assert_array_equal(seed_key(2**32 - 1), jax.random.PRNGKey(2**32 - 1))
    seeds = [0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, -1, -(2**63)]
    assert len({tuple(np.asarray(seed_key(seed)).tolist()) for seed in seeds}) == len(seeds)
    settings = settings_for(env="pendulum", seed=3_000_000_000, seeds=2, num_envs=4, horizon=4,
                            hidden_sizes=(4,))
    params = make_trainer(settings).init_run().params
    first, second = (jax.tree.map(lambda leaf, i=i: leaf[i], params) for i in range(2))
    assert not np.array_equal(*(jax.flatten_util.ravel_pytree(p)[0] for p in (first, second)))


def test_seeds_train_as_independent_vmapped_runs(tmp_path):
    """``seeds=2`` trains seeds 3 and 4 at once: the second matches its single-seed run (to float
    tolerance: batching may reorder sums), and the log holds their mean, 95% CI and values."""
    common = dict(env="pendulum", updates=4, updates_per_call=2, num_envs=4, horizon=8,
                  eval_envs=2, hidden_sizes=(16,))
    both = train(settings_for(seed=3, seeds=2, **common), tmp_path / "both")
    alone = train(settings_for(seed=4, **common), tmp_path / "seed4")
    for a, b in zip(_params(select_seed(both, 1)), _params(alone), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    with (tmp_path / "both" / "metrics.csv").open() as handle:
        row = list(csv.DictReader(handle))[-1]
    values = [float(row[f"eval/episode_reward/seed_{i}"]) for i in range(2)]
    assert float(row["eval/episode_reward"]) == pytest.approx(np.mean(values))
    half_width = 12.706 * np.std(values, ddof=1) / np.sqrt(2)  # t(0.975, 1 dof) = 12.706
    assert float(row["eval/episode_reward_ci95"]) == pytest.approx(half_width, rel=1e-3)
    assert evaluate_run(tmp_path / "both")["eval/episode_reward"] == pytest.approx(
        float(row["eval/episode_reward"]), rel=1e-6)
    # diffpg video draws the seed asked for (--seed-index), and refuses one the run lacks.
    gifs = [tmp_path / f"seed{index}.gif" for index in (0, 1)]
    for index, gif in enumerate(gifs):
        assert cli.main(["video", str(tmp_path / "both"), "--out", str(gif), "--every", "50",
                         "--seed-index", str(index)]) == 0
    assert gifs[0].read_bytes() != gifs[1].read_bytes()
    assert cli.main(["video", str(tmp_path / "both"), "--seed-index", "2"]) == 2


@pytest.mark.parametrize("command", ["compare", "train", "eval", "video"])
def test_help_lists_every_setting(command, capsys):
    assert cli.main([command, "--help"]) == 0
    text = capsys.readouterr().out
    if command == "train":
        assert "--seeds" in text and "95% confidence" in text and "(default: 1)" in text


class _InjectNaN:
    """Pendulum that blows up where ``sin(1e4 theta) > threshold`` (a deterministic,
    pseudo-random subset of states): as a physics blow-up does, it first reaches a finite but
    absurd observation (1e9), and its next step returns a NaN observation and reward."""

    def __init__(self, threshold: float):
        from diffpg import envs

        self.env = envs.make("pendulum")
        self.threshold = threshold

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, key):
        return self.env.reset(key)

    def step(self, state, action):
        jnp = jax.numpy
        next_state = self.env.step(state, action)
        theta = next_state.pipeline_state[0]
        absurd = jnp.where(jnp.sin(1e4 * theta) > self.threshold, 1e9, 0.0)
        nan = jnp.where(jnp.any(jnp.abs(state.obs) > 1e8), jnp.nan, 0.0)
        info = next_state.info | {"terminal_obs": next_state.info["terminal_obs"] + absurd + nan}
        return next_state.replace(obs=next_state.obs + absurd + nan,
                                  reward=next_state.reward + nan, info=info)


@pytest.mark.parametrize("estimator", ["shac", "critic_backprop"])
def test_nan_from_the_physics_is_skipped_and_training_continues(estimator):
    """About 0.45% of steps blow up (13% of updates see one): those updates are skipped and
    counted, the blown-up environments restart, and the parameters stay finite and keep
    learning; the replay buffer's stored blow-ups do not stop its critic from fitting."""
    settings = settings_for(env="pendulum", estimator=estimator, updates=30, updates_per_call=10,
                             num_envs=4, horizon=8, eval_envs=2, hidden_sizes=(16,))
    env = _InjectNaN(threshold=0.9999)
    trainer = make_trainer(settings, env)
    start = trainer.init_run()
    state, metrics = trainer.run_updates(start)
    skipped, resets = 0.0, 0.0
    for _ in range(2):
        state, metrics = trainer.run_updates(state)
        skipped = float(metrics["training/nonfinite_updates"])
        resets += float(metrics["training/nonfinite_env_resets"]) * settings.updates_per_call
    params = _params(state)
    assert all(np.all(np.isfinite(p)) for p in params)
    assert 0 < skipped < 20, skipped  # some updates skipped, most applied
    assert resets > 0
    assert any(np.any(a != b) for a, b in zip(params, _params(start), strict=True))
    stats = state.obs_stats  # the states before each NaN (1e9) are left out with it
    assert np.all(np.abs(stats.mean) < 10) and np.all(np.isfinite(stats.sum_sq_dev))
    # Blown-up episodes end there. One evaluation's 2 episodes meet no blow-up about one time
    # in six (which depends on rounding, through sin(1e4 theta)): four evaluations, not one.
    evaluations = [trainer.evaluate(state, jax.random.PRNGKey(key)) for key in range(3, 7)]
    assert max(float(evaluation["eval/blown_up_share"]) for evaluation in evaluations) > 0
    assert all(np.isfinite(float(evaluation["eval/episode_reward"]))
               for evaluation in evaluations)
    assert np.isfinite(float(metrics["training/critic_loss"]))


def test_a_run_whose_updates_are_all_non_finite_stops_with_a_usable_checkpoint(tmp_path, capsys):
    settings = settings_for(env="pendulum", updates=20, updates_per_call=2, num_envs=4,
                             horizon=8, eval_envs=2, hidden_sizes=(16,),
                             max_consecutive_nonfinite=3)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="max_consecutive_nonfinite=3"):
        train(settings, out, env=_InjectNaN(threshold=-2.0))  # every step blows up
    assert checkpoint_updates(out)[-1] == 4  # stopped after the call that passed 3 in a row
    trainer = make_trainer(settings)
    restored, _, _ = restore_checkpoint(out, trainer.init_run())
    for a, b in zip(_params(restored), _params(trainer.init_run()), strict=True):
        np.testing.assert_array_equal(a, b)  # no non-finite update ever applied


def test_an_evaluation_reports_how_long_its_episodes_lasted():
    """``eval/episode_length``: the time limit when nothing ends an episode, the steps before
    a blow-up when one does (a fall ends it the same way)."""
    settings = settings_for(env="pendulum", updates=2, updates_per_call=2, num_envs=4,
                             horizon=8, eval_envs=2, hidden_sizes=(16,))
    for env, expected in ((None, None), (_InjectNaN(threshold=-2.0), 1.0)):
        trainer = make_trainer(settings, env)
        evaluation = trainer.evaluate(trainer.init_run(), jax.random.PRNGKey(0))
        limit = trainer.env.episode_length
        assert float(evaluation["eval/episode_length"]) == (limit if expected is None
                                                            else expected)


def test_a_run_too_short_to_reach_the_limit_still_stops_when_no_update_was_finite(tmp_path):
    """Two updates, both non-finite, under a limit of 100 in a row: the run does not finish as
    if it had trained (exit 0); it stops, naming the settings to check."""
    settings = settings_for(env="pendulum", updates=2, updates_per_call=2, num_envs=4,
                             horizon=8, eval_envs=2, hidden_sizes=(16,))
    with pytest.raises(TrainingStopped, match="every one of the run's 2 optimiser steps.*"
                                              "env_options"):
        train(settings, tmp_path / "run", env=_InjectNaN(threshold=-2.0))
    # One finite update among them is a run that trained: it finishes.
    settings = dataclasses.replace(settings, updates=6)  # 13% of updates meet a blow-up
    train(settings, tmp_path / "some", env=_InjectNaN(threshold=0.9999))


def test_a_run_whose_final_policy_blows_up_every_evaluation_stops_and_says_so(tmp_path):
    """A learning rate of 1e20: every update finite, the parameters near float32's largest, the
    simulation non-finite in every evaluation episode, whose reward then counts 0 (the LQR's
    best): the run finished with exit 0 and looked perfect. It stops, naming what to lower."""
    settings = settings_for(env="lqr", updates=2, updates_per_call=2, num_envs=8, horizon=4,
                            eval_envs=2, learning_rate=1e20)
    with pytest.raises(TrainingStopped, match=r"eval/blown_up_share=1.*lower learning_rate"):
        train(settings, tmp_path / "run")
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        assert float(list(csv.DictReader(handle))[-1]["eval/blown_up_share"]) == 1.0
    train(dataclasses.replace(settings, learning_rate=1e-3), tmp_path / "sane")


def test_a_save_cut_short_leaves_the_previous_checkpoint_in_use(tmp_path, capsys):
    """A crash mid-save leaves orbax's temporary folder, which is not a checkpoint; a step
    folder whose files are truncated does not restore: resuming sets it aside (nothing is
    deleted), continues from the last complete checkpoint and ends where an uninterrupted run
    does."""
    settings = settings_for(env="pendulum", updates=6, updates_per_call=2, num_envs=4,
                            horizon=8, eval_envs=2, hidden_sizes=(16,))
    whole = train(settings, tmp_path / "whole")
    out = tmp_path / "cut"
    train(settings, out, stop_at_update=4)
    folder = out / "checkpoints"
    complete = folder / "4"
    for partial_name in ("6.orbax-checkpoint-tmp", "6"):
        partial = folder / partial_name
        for path in complete.rglob("*"):  # the files of a save, truncated
            target = partial / path.relative_to(complete)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        if partial_name.endswith("tmp"):
            assert checkpoint_updates(out) == [2, 4]
    resumed = train(settings, out, resume=True)
    assert "checkpoint 6" in capsys.readouterr().err and (folder / "6.unreadable").is_dir()
    for a, b in zip(_params(whole), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert checkpoint_updates(out) == [4, 6]


@pytest.mark.parametrize("estimator", ["shac", "reinforce", "critic_backprop"])
def test_the_training_call_compiles_once(estimator):
    """The state a call returns has the types of the state it took (a weak-typed initial
    parameter once made the second call compile the whole loop again)."""
    settings = settings_for(env="pendulum", estimator=estimator, updates=4, updates_per_call=2,
                             num_envs=4, horizon=8, eval_envs=2, hidden_sizes=(16,))
    trainer = make_trainer(settings)
    state, _ = trainer.run_updates(trainer.init_run())
    trainer.run_updates(state)
    assert trainer.run_updates._cache_size() == 1


def _options_without_a_description(text: str) -> list[str]:
    """The options of a tyro help text whose entry says nothing beyond its default."""
    import re

    entries, current = [], None
    for line in text.splitlines():
        inner = line.strip().strip("│").strip()  # with or without the box of a terminal
        match = re.match(r"(--?[a-zA-Z][\w.-]*)(.*)", inner)
        if match:
            current = [match.group(1), match.group(2)]
            entries.append(current)
        elif current is not None and inner.strip() and not inner.strip().startswith(("─", "╭")):
            current[1] += "  " + inner.strip()
    missing = []
    for name, rest in entries:
        if name in ("-h", "--help"):
            continue
        described = re.sub(r"^\s*\S*\s{2,}|^\s*\S+$", "", rest)  # the metavar (e.g. INT)
        described = re.sub(r"\(default: [^)]*\)", "", described).strip()
        if not described:
            missing.append(name)
    return missing


def _builtin_estimators():
    from diffpg import estimators

    return estimators.names()


@pytest.mark.parametrize("command", [[], ["train"], ["compare"]]
                         + [["train", name] for name in _builtin_estimators()])
def test_help_names_every_estimator_and_env_and_describes_every_option(command, capsys):
    from diffpg import envs, estimators

    assert cli.main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.replace("│", " ").split())
    if len(command) < 2:  # an estimator's own help lists its settings only
        # (a command's, Playground's tasks as playground:TASK: listing them imports Playground)
        for name in [*estimators.names(), *(envs.names_in_brief() if command else envs.names())]:
            assert name in flat, name
    assert _options_without_a_description(text) == []
