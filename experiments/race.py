"""A race against Brax's PPO: return against wall-clock and env steps, at several env counts.

Each learner (diffpg's configured estimator for the env, and Brax's PPO with Brax's settings for
it) runs its usual schedule (``--steps`` env steps) at each env count, stopped at the first
evaluation past ``--seconds`` of wall-clock (compilation included, as a user waits for it). One
table gives, per learner and env count, the return reached by a quarter, half and all of the
budget, with the env steps and seconds it took; ``race.png`` draws every curve against
wall-clock and env steps.

    python experiments/race.py                         # CPU: ant, 64 and 256 envs, 20 min each
    python experiments/race.py --gpu                   # GPU: ant, 64, 256 and 2,048 envs, 3 min each
    python experiments/race.py --env inverted_pendulum --num-envs 4 --seconds 1 --steps 2048
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_learning  # noqa: E402
import common  # noqa: E402

from diffpg.configs import default_estimator  # noqa: E402

BUDGET_SHARES = (0.25, 0.5, 1.0)
"""The points of the wall-clock budget at which the table reads each curve."""


def race_one(learner: str, env_name: str, num_envs: int, seconds: float, steps: int,
             evals: int, out: Path) -> list[dict]:
    """One learner at one env count: its curve, stopped at the first evaluation past
    ``seconds``."""
    backend = bench_learning.configured_backend(env_name)
    horizon = bench_learning.learner_horizon(learner, env_name, 32)
    deadline = time.perf_counter() + seconds
    if learner == "brax_ppo":
        return bench_learning.run_brax_seed("brax_ppo", env_name, backend, num_envs, horizon,
                                            steps, evals, seed=0, deadline=deadline)
    return bench_learning.run_diffpg(learner, env_name, backend, num_envs, horizon, steps, evals,
                                     1, out / f"{num_envs}_envs", deadline=deadline)


def reached_by(curve: list[dict], seconds: float) -> dict | None:
    """The last evaluation of ``curve`` done within ``seconds`` (None: none was)."""
    done = [point for point in curve if point["seconds"] <= seconds]
    return done[-1] if done else None


def tabulate(curves: dict, seconds: float) -> list[dict]:
    """One row per (learner, env count): the return by each share of the budget."""
    rows = []
    for (learner, num_envs), curve in curves.items():
        row = {"learner": learner, "num_envs": num_envs,
               "best": max(point["reward"] for point in curve)}
        for share in BUDGET_SHARES:
            point = reached_by(curve, share * seconds)
            # "-": no evaluation finished within that share (compilation took it)
            row[f"return by {share:g} budget"] = point["reward"] if point else "-"
            row[f"env steps by {share:g}"] = point["env_steps"] if point else "-"
        rows.append(row)
    return rows


def plot(curves: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for (learner, num_envs), curve in curves.items():
        label = f"{learner}, {num_envs} envs"
        rewards = [point["reward"] for point in curve]
        line, = axes[0].plot([point["seconds"] for point in curve], rewards, marker="o",
                             markersize=3, label=label)
        axes[1].plot([point["env_steps"] for point in curve], rewards, marker="o", markersize=3,
                     color=line.get_color())
    axes[0].set(xlabel="wall-clock incl. compilation (s)", ylabel="eval episode return")
    axes[1].set(xlabel="env steps", xscale="log")
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    common.supply_brax_trainer_api()
    parser = common.parser("race", __doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true",
                        help="GPU sizes: 64, 256 and 2,048 envs, 3 minutes each")
    parser.add_argument("--env", default="ant")
    parser.add_argument("--learners", nargs="+", default=None,
                        help="diffpg estimator specs and/or brax_ppo (default: the env's "
                             "configured estimator and brax_ppo)")
    parser.add_argument("--num-envs", type=int, nargs="+", default=None)
    parser.add_argument("--seconds", type=float, default=None,
                        help="wall-clock budget of each learner at each env count")
    parser.add_argument("--steps", type=int, default=4_000_000,
                        help="the schedule's env steps (learning rates decay over them)")
    parser.add_argument("--evals", type=int, default=40, help="evaluations over the schedule")
    arguments = parser.parse_args()
    learners = arguments.learners or [default_estimator(arguments.env), "brax_ppo"]
    env_counts = arguments.num_envs or ([64, 256, 2048] if arguments.gpu else [64, 256])
    seconds = arguments.seconds or (180.0 if arguments.gpu else 1200.0)
    out = common.prepare_output(arguments.out, arguments.overwrite)

    curves = {}
    for num_envs in env_counts:
        for learner in learners:
            curves[learner, num_envs] = race_one(learner, arguments.env, num_envs, seconds,
                                                 arguments.steps, arguments.evals, out)
    rows = tabulate(curves, seconds)
    title = (f"{arguments.env}: {seconds:g} s of wall-clock per learner and env count, "
             f"schedules of {arguments.steps:,} env steps, one seed")
    columns = ["learner", "num_envs", "best"] + [
        column for share in BUDGET_SHARES
        for column in (f"return by {share:g} budget", f"env steps by {share:g}")]
    table = common.format_table(rows, columns)
    print(title)
    print(table)
    common.write_json(out / "results.json", {
        "env": arguments.env, "seconds": seconds, "steps": arguments.steps, "rows": rows,
        "curves": {f"{learner} {num_envs}": curve
                   for (learner, num_envs), curve in curves.items()}})
    plot(curves, out / "race.png", title)
    (out / "report.md").write_text(f"# Race\n\n{title}\n\n{table}\n\n![](race.png)\n")


if __name__ == "__main__":
    main()
