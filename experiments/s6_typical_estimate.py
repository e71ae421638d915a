"""Finding S6's "typical estimate": how long the median estimate is along the true gradient.

Reads a ``diffpg compare`` run folder's saved samples (``diffpg.comparison_files.load_samples``) and
prints, per sweep point and estimator, the median over estimates of ``g_k . ref / |ref|^2`` (1:
the right length; below 1 the typical estimate falls short, Suh et al.'s empirical bias) with
a percentile bootstrap 90% interval, the mean of the same projection, and the largest
``|g_k| / |ref|`` (how heavy the tail is).

    python experiments/s6_typical_estimate.py runs/s6_curling
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from diffpg.comparison_files import load_samples  # noqa: E402
from diffpg.stats import bootstrap_interval  # noqa: E402


def typical_estimate_rows(run_dir: Path, num_resamples: int = 1000) -> list[dict]:
    rows = []
    for point in load_samples(run_dir):
        reference = point["reference"]
        squared_norm = float(reference @ reference)
        for label, samples in point["estimates"].items():
            projection = (samples @ reference / squared_norm)[:, None]
            low, high = bootstrap_interval(projection, lambda s: float(np.median(s)),
                                           num_resamples=num_resamples)
            rows.append({
                "sweep_value": point["sweep_value"], "estimator": label,
                "median_projection": float(np.median(projection)), "ci90_low": low,
                "ci90_high": high, "mean_projection": float(projection.mean()),
                "largest_norm_ratio": float(np.linalg.norm(samples, axis=1).max()
                                            / np.sqrt(squared_norm))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="s6_typical_estimate", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a diffpg compare run folder")
    arguments = parser.parse_args()
    try:
        rows = typical_estimate_rows(arguments.run)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    print(common.format_table(rows, ["sweep_value", "estimator", "median_projection", "ci90_low",
                                     "ci90_high", "mean_projection", "largest_norm_ratio"]))


if __name__ == "__main__":
    main()
