"""Learning curves of several bodies in one figure: return against env steps and wall-clock.

Each ``--curve BODY:LABEL=PATH`` is one curve in BODY's panels. PATH is a ``diffpg train`` run
folder (its ``metrics.csv``: the rows with an evaluation, ``training/walltime`` as wall-clock)
or a ``bench_learning.py`` ``results.json`` (the curve of the learner named LABEL there, or
``results.json#LEARNER``'s). A run of several seeds is drawn as its mean over seeds with the
95% confidence interval of that mean (``eval/episode_reward_ci95``); one seed is a line without
a band. Wall-clock is what each
run measured on its own machine, compilation included: curves run on shared cores, or paused and
resumed, are slower in wall-clock than on an idle machine.

    python experiments/plot_bodies.py --out runs/bodies \\
        --curve ant:AHAC=runs/ant_ahac --curve "ant:Brax PPO=runs/bench_ant/results.json#brax_ppo" \\
        --curve humanoid:AHAC=runs/humanoid_ahac

Writes ``bodies.png`` and ``bodies.json`` (every drawn point: env steps, seconds, mean, ci95,
per-seed returns) into ``--out`` and prints each curve's last evaluation.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_curve(spec: str) -> tuple[str, str, Path]:
    """``BODY:LABEL=PATH`` -> ``(body, label, path)``; a malformed spec is a one-line error."""
    head, equals, path = spec.partition("=")
    body, colon, label = head.partition(":")
    if not (equals and colon and body and label and path):
        raise SystemExit(f"error: --curve {spec!r} is not BODY:LABEL=PATH "
                         "(e.g. ant:AHAC=runs/ant_ahac)")
    return body, label, Path(path)


def run_folder_curve(folder: Path) -> list[dict]:
    """The evaluations in ``folder/metrics.csv``: one point per row that has one."""
    with (folder / "metrics.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("eval/episode_reward")]
    curve = []
    for row in rows:
        seeds = sorted((key for key in row if key.startswith("eval/episode_reward/seed_")),
                       key=lambda key: int(key.rsplit("_", 1)[1]))
        curve.append({"env_steps": int(float(row["env_steps"])),
                      "seconds": float(row["training/walltime"]),
                      "reward": float(row["eval/episode_reward"]),
                      "ci95": float(row.get("eval/episode_reward_ci95") or 0.0),
                      "seeds": [float(row[key]) for key in seeds]
                      or [float(row["eval/episode_reward"])]})
    return curve


def results_curve(path: Path, label: str) -> list[dict]:
    """The curve of learner ``label`` in a ``bench_learning.py`` results.json."""
    curves = json.loads(path.read_text())["curves"]
    if label not in curves:
        raise SystemExit(f"error: {path} has no curve {label!r} (it has {', '.join(curves)})")
    return curves[label]


def read_curve(label: str, path: Path) -> list[dict]:
    """The curve of ``--curve BODY:LABEL=PATH`` (``PATH#LEARNER``: that learner's)."""
    path, _, learner = str(path).partition("#")
    path, label = Path(path), learner or label
    if path.is_dir() and (path / "metrics.csv").is_file():
        curve = run_folder_curve(path)
    elif path.is_file() and path.suffix == ".json":
        curve = results_curve(path, label)
    else:
        raise SystemExit(f"error: {path} is neither a run folder with metrics.csv nor a "
                         "results.json")
    if not curve:
        raise SystemExit(f"error: {path} holds no evaluation yet")
    return curve


def plot(bodies: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """One column per body: return against env steps (top) and wall-clock (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(bodies), figsize=(3.4 * len(bodies), 5.6), squeeze=False)
    for column, (body, curves) in enumerate(bodies.items()):
        common.draw_curves(curves, axes[0][column], axes[1][column], marker=".")
        axes[0][column].set_title(body)
        axes[0][column].set_xlabel("env steps")
        axes[1][column].set_xlabel("wall-clock incl. compilation (s)")
        axes[0][column].legend(fontsize=7)
    axes[0][0].set_ylabel("eval episode return")
    axes[1][0].set_ylabel("eval episode return")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = common.parser("plot_bodies", __doc__.splitlines()[0])
    parser.add_argument("--curve", action="append", required=True, metavar="BODY:LABEL=PATH",
                        help="a curve: a run folder or a bench_learning results.json")
    arguments = parser.parse_args()
    bodies: dict[str, dict[str, list[dict]]] = {}
    for spec in arguments.curve:
        body, label, path = parse_curve(spec)
        bodies.setdefault(body, {})[label] = read_curve(label, path)
    out = common.prepare_output(arguments.out, arguments.overwrite)
    plot(bodies, out / "bodies.png")
    common.write_json(out / "bodies.json", {"bodies": bodies})
    rows = [{"body": body, "learner": label, "env steps": curve[-1]["env_steps"],
             "seconds": round(curve[-1]["seconds"]), "return": curve[-1]["reward"],
             "ci95": curve[-1]["ci95"], "seeds": len(curve[-1]["seeds"])}
            for body, curves in bodies.items() for label, curve in curves.items()]
    print(common.format_table(rows, list(rows[0])))
    print(f"wrote {out / 'bodies.png'} and {out / 'bodies.json'}")


if __name__ == "__main__":
    main()
