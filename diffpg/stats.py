"""Statistics of a set of independent gradient estimates, against a reference gradient.

Definitions (every report states them): for ``K`` finite estimates ``g_k`` of dimension ``P``,
``mean = (1/K) sum_k g_k``, ``Var_p`` the unbiased per-coordinate variance.

* ``variance_trace = sum_p Var_p`` (trace of the covariance of one estimate);
  ``variance_max = max_p Var_p``;
* ``mean_norm = (1/K) sum_k |g_k|``; ``norm_of_mean = |mean|``;
* ``bias = |mean - reference|`` with ``bias_noise = sqrt(sum_p Var_p / K + se_ref_p^2)``, the
  root-mean-square norm that pure sampling noise (of the mean and of the reference) would give.
  The bias is "resolved" when some coordinate's ``t_p = (mean_p - ref_p) / sqrt(Var_p / K +
  se_ref_p^2)`` exceeds the two-sided Student-t quantile (``K - 1`` degrees of freedom) at a
  family-wise level of ``RESOLUTION_LEVEL`` over the ``P`` coordinates (Bonferroni: it stays valid
  however the coordinates are correlated); otherwise it is "not resolved": the data cannot tell it
  from zero, and it is never reported as zero;
* ``bias_detection_limit = threshold * bias_noise`` (``threshold`` the resolution quantile): a bias
  of larger norm has, whatever its direction, some coordinate ``p`` beyond ``threshold`` times its
  noise, so it is resolved with probability above about 1/2; a "not resolved" bias may be as large
  as this (``relative_bias_detection_limit``: divided by ``|reference|``);
* ``cosine_to_reference = cos(mean, reference)``; ``mean_cosine_to_reference``: the mean over
  estimates of ``cos(g_k, reference)``; ``mean_pairwise_cosine``: mean of ``cos(g_j, g_k)`` over
  pairs ``j != k`` (how consistently single estimates point the same way);
* ``snr = |mean| / sqrt(variance_trace)`` (signal-to-noise ratio of a single estimate);
* ``nonfinite_fraction``: share of estimates with any NaN or inf coordinate (excluded from the
  statistics above).
"""

from __future__ import annotations

import warnings

import numpy as np

from diffpg.envs.core import SettingError

# scipy.stats is imported inside the functions that use it: importing it adds about a second
# of CPU to the start of every command, most of which never compute an interval.

RESOLUTION_LEVEL = 0.001
"""Family-wise false-positive rate of "bias resolved" for an unbiased estimator."""


def gradient_statistics(
    samples: np.ndarray, reference: np.ndarray | None = None,
    reference_standard_error: np.ndarray | None = None,
) -> dict[str, float | bool | None]:
    """Statistics of ``samples [K, P]`` (see the module docstring); ``reference [P]`` optional,
    ``reference_standard_error [P]`` its per-coordinate standard error (0 for an exact one)."""
    samples = np.asarray(samples, np.float64)
    finite = np.all(np.isfinite(samples), axis=1)
    result: dict[str, float | bool | None] = {
        "num_estimates": int(samples.shape[0]),
        "nonfinite_fraction": float(1.0 - finite.mean()),
    }
    good = samples[finite]
    if good.shape[0] < 2:
        return result | dict.fromkeys(
            ["variance_trace", "variance_max", "mean_norm", "norm_of_mean", "snr",
             "mean_pairwise_cosine"])
    num = good.shape[0]
    mean = good.mean(axis=0)
    variance = good.var(axis=0, ddof=1)
    norms = np.linalg.norm(good, axis=1)
    unit = good / np.maximum(norms, 1e-30)[:, None]
    summed = unit.sum(axis=0)
    pairwise = (summed @ summed - np.sum(unit * unit)) / (num * (num - 1))
    result |= {
        "variance_trace": float(variance.sum()),
        "variance_max": float(variance.max()),
        "mean_norm": float(norms.mean()),
        "norm_of_mean": float(np.linalg.norm(mean)),
        "snr": float(np.linalg.norm(mean) / np.sqrt(max(variance.sum(), 1e-300))),
        "mean_pairwise_cosine": float(pairwise),
    }
    if reference is not None:
        reference = np.asarray(reference, np.float64)
        ref_se = (np.zeros_like(reference) if reference_standard_error is None
                  else np.asarray(reference_standard_error, np.float64))
        bias = float(np.linalg.norm(mean - reference))
        coordinate_noise = np.sqrt(variance / num + ref_se**2)
        noise = float(np.linalg.norm(coordinate_noise))
        ref_norm = float(np.linalg.norm(reference))
        t_scores = np.abs(mean - reference) / np.maximum(coordinate_noise, 1e-300)
        threshold = resolution_threshold(num, mean.shape[0])
        result |= {
            "bias": bias,
            "bias_noise": noise,
            "bias_max_t": float(np.max(t_scores)),
            "bias_resolved": bool(np.max(t_scores) > threshold),
            "relative_bias": bias / max(ref_norm, 1e-30),
            "bias_detection_limit": threshold * noise,
            "relative_bias_detection_limit": threshold * noise / max(ref_norm, 1e-30),
            "cosine_to_reference": _cosine(mean, reference),
            "mean_cosine_to_reference": float(np.mean(unit @ reference) / max(ref_norm, 1e-30)),
        }
    return result


def resolution_threshold(num_estimates: int, num_coordinates: int,
                         level: float = RESOLUTION_LEVEL) -> float:
    """The |t| above which one of ``num_coordinates`` coordinates shows a bias (Bonferroni)."""
    from scipy import stats as scipy_stats

    return float(scipy_stats.t.ppf(1.0 - level / (2.0 * num_coordinates), num_estimates - 1))


def reference_from_samples(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and per-coordinate standard error of ``samples [K, P]`` (finite rows only)."""
    samples = np.asarray(samples, np.float64)
    good = samples[np.all(np.isfinite(samples), axis=1)]
    if good.shape[0] < 2:
        raise SettingError(f"the reference estimator gave {good.shape[0]} finite estimates of "
                           f"{samples.shape[0]} (fewer than 2): the simulation overflows at "
                           "these settings; check the env's options and the horizon")
    return good.mean(axis=0), good.std(axis=0, ddof=1) / np.sqrt(good.shape[0])


def mean_confidence_half_width(values, level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of the mean of ``values [N]`` (independent
    runs): ``t_{(1+level)/2, N-1} * std(values, ddof=1) / sqrt(N)``; 0 for a single value."""
    from scipy import stats as scipy_stats

    values = np.asarray(values, np.float64)
    if values.size < 2:
        return 0.0
    quantile = float(scipy_stats.t.ppf((1.0 + level) / 2.0, values.size - 1))
    return quantile * float(values.std(ddof=1)) / float(np.sqrt(values.size))


def bootstrap_interval(samples: np.ndarray, statistic, num_resamples: int = 200,
                       level: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(samples)`` over resampled rows
    (``scipy.stats.bootstrap`` resampling the row indices)."""
    from scipy import stats as scipy_stats

    samples = np.asarray(samples)
    with warnings.catch_warnings():  # degenerate samples (every one non-finite): NaN, said so
        warnings.simplefilter("ignore", scipy_stats.DegenerateDataWarning)  # in the report
        interval = scipy_stats.bootstrap(
            (np.arange(len(samples)),), lambda rows: statistic(samples[rows]), vectorized=False,
            n_resamples=num_resamples, confidence_level=level, method="percentile",
            rng=np.random.default_rng(seed)).confidence_interval
    return float(interval.low), float(interval.high)


def interquartile_mean(values) -> float:
    """The mean of the middle half of ``values [N]`` (25% trimmed from each end,
    ``scipy.stats.trim_mean``): the summary over runs that Agarwal et al. (2021) recommend,
    robust to one run that fails or excels."""
    from scipy import stats as scipy_stats

    return float(scipy_stats.trim_mean(np.asarray(values, np.float64), 0.25))


def interquartile_mean_interval(values, level: float = 0.95, num_resamples: int = 2000,
                                seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``interquartile_mean`` over runs ``values [N]``."""
    from scipy import stats as scipy_stats

    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), float(values.mean())
    interval = scipy_stats.bootstrap(
        (values,), lambda v, axis: scipy_stats.trim_mean(v, 0.25, axis=axis),
        n_resamples=num_resamples, confidence_level=level, method="percentile",
        rng=np.random.default_rng(seed)).confidence_interval
    return float(interval.low), float(interval.high)


def variance_trace(samples: np.ndarray) -> float:
    good = samples[np.all(np.isfinite(samples), axis=1)]
    return float(good.var(axis=0, ddof=1).sum()) if len(good) > 1 else float("nan")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
