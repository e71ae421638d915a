"""Shared plumbing for the experiment scripts: output folder, JSON, tables, independent estimates.

Each script is one finding, run through diffpg's public API; it prints a table, writes
``results.json``, ``report.md`` and its plots into ``--out`` (default ``runs/<script name>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import diffpg

diffpg.setup()  # the persistent compilation cache, quiet XLA and MuJoCo logs, as the commands

from diffpg.report import environment_description  # noqa: E402
from diffpg.sampling import sample_gradients  # noqa: E402

__all__ = ["environment_description", "format_table", "parser", "prepare_output", "sample_gradients",
           "supply_brax_trainer_api", "write_json"]


def supply_brax_trainer_api() -> None:
    """Let Brax 0.14.2's own trainers (APG, PPO) run on jax >= 0.10.

    They place their training state with ``jax.device_put_replicated``, which jax 0.10 removed.
    Where it is missing, supply its meaning: every leaf stacked once per device on a new leading
    axis, which ``jax.pmap`` over those devices splits one copy to each. Nothing else changes;
    with jax 0.9 (the version diffpg pins) this does nothing.
    """
    import jax
    import jax.numpy as jnp

    if hasattr(jax, "device_put_replicated"):
        return

    def device_put_replicated(tree, devices):
        return jax.tree.map(lambda leaf: jnp.stack([jnp.asarray(leaf)] * len(devices)), tree)

    jax.device_put_replicated = device_put_replicated


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--out``, ``--overwrite`` and ``--seed``."""
    result = argparse.ArgumentParser(prog=name, description=description)
    result.add_argument("--out", type=Path, default=Path("runs") / name,
                        help=f"output folder (default: runs/{name})")
    result.add_argument("--overwrite", action="store_true", help="write into an existing --out")
    result.add_argument("--seed", type=int, default=0)
    return result


def prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        sys.exit(f"error: out={str(out)!r} exists and is not empty; pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(_plain(data | {"environment": environment_description()}), indent=2))


def draw_curves(curves: dict, steps_axis, seconds_axis, marker: str = "o") -> None:
    """Each learner's curve (points with ``env_steps``, ``seconds``, ``reward`` and ``ci95``) as
    return against env steps on ``steps_axis`` and against wall-clock on ``seconds_axis``, with
    the 95% confidence interval of the mean over seeds as a band where there is one."""
    for learner, curve in curves.items():
        reward = np.array([point["reward"] for point in curve])
        band = np.array([point.get("ci95") or 0.0 for point in curve])
        for axis, x in ((steps_axis, "env_steps"), (seconds_axis, "seconds")):
            xs = np.array([point[x] for point in curve], dtype=float)
            line, = axis.plot(xs, reward, marker=marker, label=learner)
            if band.any():
                axis.fill_between(xs, reward - band, reward + band, color=line.get_color(),
                                  alpha=0.15)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` (numbers to 3 significant digits)."""
    def cell(value):
        if isinstance(value, float | np.floating):
            return f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.floating | np.integer):
        return value.item()
    return value
