"""How a trained policy's evaluation episodes end: the body's posture and speed before the fall.

For each seed of a run folder (``diffpg train`` or ``bench_learning.py``'s runs), one
deterministic episode of the task (the run's evaluation env, no shaping) from a fresh start,
recording every body's height, the torso's pitch, the joints' angles and the torso's forward
velocity. Prints, per seed: the episode's length and return, the reward per step over its first
and last 50 steps, the highest the torso and the lowest body went, and the last steps before
the episode ended, so that a fall can be read: a torso that sinks on a standing leg, or one that
lands below a foot still in the air after a leap. Writes ``results.json`` into ``--out``::

    python experiments/fall_anatomy.py runs/bench_learning_hopper/runs/shac --out runs/anatomy
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from diffpg.acting import unroll  # noqa: E402
from diffpg.runs import load_run  # noqa: E402
from diffpg.training import make_envs  # noqa: E402

LAST_STEPS = 4
"""Steps before an episode's end that the table shows."""


def episode(run_dir: Path, seed_index: int, key: jax.Array, steps: int) -> dict:
    """One deterministic evaluation episode of seed ``seed_index``, recorded step by step."""
    trainer, state = load_run(run_dir, seed_index=seed_index)
    _, eval_env = make_envs(trainer.settings)
    start = jax.tree.map(lambda x: x[None], eval_env.reset(key))

    def record(env_state):
        bodies = env_state.pipeline_state
        return bodies.x.pos[..., 2], bodies.q, bodies.xd.vel[:, 0, 0]

    _, transitions, (heights, angles, speed) = jax.jit(lambda s: unroll(
        eval_env, trainer.policy, state.params, state.obs_stats, s, key, steps,
        deterministic=True, record=record))(start)
    done = np.asarray(transitions.done[:, 0])
    length = int(np.argmax(done)) + 1 if done.any() else steps
    # the step that ends an episode returns the next one's start: its posture is the step before
    return {"length": length, "fell": bool(transitions.termination[length - 1, 0]),
            "reward": np.asarray(transitions.reward[:length, 0]),
            "heights": np.asarray(heights[:length - 1, 0]),
            "angles": np.asarray(angles[:length - 1, 0]), "speed": np.asarray(speed[:length - 1, 0])}


def summary(recorded: dict) -> dict:
    reward, heights = recorded["reward"], recorded["heights"]
    last = [{"step": int(t), "torso_height": float(heights[t, 0]),
             "lowest_body": float(heights[t].min()), "highest_body": float(heights[t].max()),
             "pitch": float(recorded["angles"][t, 2]),
             "joints": [round(float(a), 2) for a in recorded["angles"][t, 3:]],
             "forward_velocity": float(recorded["speed"][t])}
            for t in range(max(0, len(heights) - LAST_STEPS), len(heights))]
    return {"length": recorded["length"], "fell": recorded["fell"],
            "return": float(reward.sum()), "reward_per_step_first_50": float(reward[:50].mean()),
            "reward_per_step_last_50": float(reward[-50:].mean()),
            "highest_torso": float(heights[:, 0].max()), "lowest_body": float(heights.min()),
            "last_steps": last}


def main() -> None:
    parser = common.parser("fall_anatomy", __doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder")
    parser.add_argument("--steps", type=int, default=1000, help="most steps per episode")
    arguments = parser.parse_args()
    out = common.prepare_output(arguments.out, arguments.overwrite)
    results = []
    for index in range(load_run(arguments.run)[0].settings.seeds):
        key = jax.random.PRNGKey(arguments.seed + index)
        found = summary(episode(arguments.run, index, key, arguments.steps))
        results.append(found)
        print(f"seed {index}: {found['length']} steps, return {found['return']:.0f}, "
              f"{'a fall' if found['fell'] else 'no fall'}; reward per step "
              f"{found['reward_per_step_first_50']:.2f} in the first 50 steps, "
              f"{found['reward_per_step_last_50']:.2f} in the last 50; torso up to "
              f"{found['highest_torso']:.2f} m")
        print(common.format_table(found["last_steps"], [
            "step", "torso_height", "lowest_body", "highest_body", "pitch", "joints",
            "forward_velocity"]))
    common.write_json(out / "results.json", {"run": str(arguments.run), "seeds": results})
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
