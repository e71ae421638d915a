"""Comparison statistics on cases with known answers, and the ``diffpg compare`` command."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from diffpg import cli
from diffpg.compare import CompareSettings, run_comparison
from diffpg.stats import gradient_statistics


def _gaussian_samples(mean, scales, num, seed=0):
    rng = np.random.default_rng(seed)
    return mean + rng.normal(size=(num, len(mean))) * scales


def test_statistics_recover_known_mean_and_covariance():
    mean = np.array([3.0, -4.0, 0.0, 1.0])
    scales = np.array([1.0, 2.0, 0.5, 0.1])
    num = 20000
    stats = gradient_statistics(_gaussian_samples(mean, scales, num), reference=mean)
    true_trace = float(np.sum(scales**2))
    # The sample variance of a Gaussian has standard error sigma^2 sqrt(2 / (K - 1)).
    trace_se = float(np.sqrt(np.sum(2 * scales**4 / (num - 1))))
    assert abs(stats["variance_trace"] - true_trace) < 4 * trace_se
    assert abs(stats["variance_max"] - 4.0) < 4 * 4.0 * np.sqrt(2 / (num - 1))
    true_norm = float(np.linalg.norm(mean))
    assert abs(stats["norm_of_mean"] - true_norm) < 4 * np.sqrt(true_trace / num)
    assert stats["bias_resolved"] is False  # unbiased: the bias is within its noise
    assert stats["relative_bias"] < 4 * np.sqrt(true_trace / num) / true_norm
    assert stats["cosine_to_reference"] == pytest.approx(1.0, abs=1e-3)
    assert stats["snr"] == pytest.approx(true_norm / np.sqrt(true_trace), rel=0.02)
    assert stats["nonfinite_fraction"] == 0.0


def test_a_biased_estimator_is_flagged_and_its_bias_measured():
    reference = np.array([1.0, 0.0])
    samples = _gaussian_samples(np.array([1.0, 0.3]), np.array([0.5, 0.5]), 4000)
    stats = gradient_statistics(samples, reference=reference)
    assert stats["bias_resolved"] is True
    assert stats["bias"] == pytest.approx(0.3, abs=4 * 0.5 * np.sqrt(2 / 4000))


def test_reference_error_keeps_a_small_bias_unresolved():
    """A bias below the reference's own standard error is reported as not resolved."""
    samples = _gaussian_samples(np.array([1.0, 0.05]), np.array([0.1, 0.1]), 4000)
    reference = np.array([1.0, 0.0])
    resolved = gradient_statistics(samples, reference, np.zeros(2))
    blurred = gradient_statistics(samples, reference, np.array([0.1, 0.1]))
    assert resolved["bias_resolved"] is True
    assert blurred["bias_resolved"] is False


def test_pairwise_cosine_and_nonfinite_fraction():
    samples = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [np.nan, 0.0]])
    stats = gradient_statistics(samples)
    # finite rows: e1, e2, e1 -> pairs (e1,e2)=0, (e1,e1)=1, (e2,e1)=0 -> mean 1/3
    assert stats["mean_pairwise_cosine"] == pytest.approx(1 / 3)
    assert stats["nonfinite_fraction"] == pytest.approx(0.25)


def test_unbiased_estimators_show_no_resolved_bias_on_the_lqr():
    settings = CompareSettings(estimators=("reinforce", "bptt"), num_estimates=256, num_envs=8,
                               horizon=8, sweep="none")
    results = run_comparison(settings)
    final = results["results"][-1]["estimators"]
    assert results["reference_kind"] == "exact"
    for label in ("reinforce", "bptt"):
        assert final[label]["bias_resolved"] is False, final[label]
        assert final[label]["nonfinite_fraction"] == 0.0
    assert final["bptt"]["variance_trace"] < final["reinforce"]["variance_trace"]


def test_compare_command_writes_a_report(tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(["compare", "--estimators", "reinforce:baseline=none", "bptt",
                       "--num-estimates", "8", "--num-envs", "4", "--horizon", "4",
                       "--critic-warmup", "0", "--out", str(out)])
    assert status == 0
    for name in ("results.json", "table.csv", "report.md", "variance_vs_horizon.png",
                 "bias_and_cosine.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert [r["horizon"] for r in results["results"]] == [1, 2, 4]
    assert set(results["results"][0]["estimators"]) == {"reinforce:baseline=none", "bptt"}
    assert "jax" in results["environment"]
    report = (out / "report.md").read_text()  # every column defined, the reference's norm given
    assert "| estimator | norm of mean | mean norm |" in report and "**pairwise cosine**:" in report
    assert "Reference (exact): norm " in report
    # The same seed gives the same numbers.
    again = tmp_path / "again"
    cli.main(["compare", "--estimators", "reinforce:baseline=none", "bptt",
              "--num-estimates", "8", "--num-envs", "4", "--horizon", "4",
              "--critic-warmup", "0", "--out", str(again)])
    first = json.loads((out / "results.json").read_text())["results"]
    second = json.loads((again / "results.json").read_text())["results"]
    for a, b in zip(first, second, strict=True):
        for label in a["estimators"]:
            assert a["estimators"][label]["variance_trace"] == b["estimators"][label][
                "variance_trace"]


@pytest.mark.parametrize("env", ["lqr", "pendulum"])
def test_saved_samples_reproduce_the_reported_statistics(tmp_path, env):
    """``samples.npz`` holds every estimate and the reference: ``load_samples`` gives them back
    per sweep point, and ``gradient_statistics`` on them recomputes results.json's numbers (exact
    reference on the LQR, an estimated one with its samples on the pendulum)."""
    from diffpg.comparison_files import load_samples

    out = tmp_path / "run"
    assert cli.main(["compare", "--env", env, "--estimators", "reinforce", "bptt",
                     "--num-estimates", "6", "--num-envs", "2", "--horizon", "2",
                     "--reference-estimates", "8", "--critic-warmup", "0",
                     "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["samples_file"] == "samples.npz"
    points = load_samples(out)
    assert [p["horizon"] for p in points] == [r["horizon"] for r in results["results"]]
    for point, entry in zip(points, results["results"], strict=True):
        assert set(point["estimates"]) == {"reinforce", "bptt"}
        assert ("reference_estimates" in point) == (env != "lqr")
        if env != "lqr":
            assert point["reference_estimates"].shape == (8, results["num_parameters"])
        for label, samples in point["estimates"].items():
            assert samples.shape == (6, results["num_parameters"])
            again = gradient_statistics(samples, point["reference"],
                                        point["reference_standard_error"])
            for key in ("variance_trace", "bias", "bias_detection_limit", "bias_max_t"):
                assert again[key] == pytest.approx(entry["estimators"][label][key], rel=1e-6)
    with pytest.raises(FileNotFoundError, match="samples.npz"):
        (out / "samples.npz").unlink()
        load_samples(out)


def test_the_samples_file_bound_holds_and_is_close(tmp_path):
    """The file-size limit is checked against ``samples_file_bytes_at_most`` before any work: it
    must bound the file ``save_samples`` writes (incompressible float32 samples, long names), and
    not refuse a limit far above it (it once added 64 KiB to every comparison)."""
    from diffpg.comparison_files import samples_file_bytes_at_most, save_samples

    rng = np.random.default_rng(0)

    def incompressible(*shape):  # (random bits: deflate cannot shrink them)
        return rng.integers(0, 2**32, shape, dtype=np.uint32).view(np.float32)

    settings = {"estimators": ["shac:critic_hidden_sizes=(64, 64),window=4" * 3] * 4, "seed": 0}
    for num_estimates, num_parameters in [(1, 1), (40, 300), (500, 700)]:
        points = [{"reference": incompressible(num_parameters)}
                  | {f"estimates/estimator_{i}_{'x' * 80}": incompressible(
                      num_estimates, num_parameters) for i in range(3)}
                  for _ in range(2)]
        path = tmp_path / f"samples-{num_estimates}.npz"
        save_samples(points, path, settings)
        bound = samples_file_bytes_at_most(
            sum(np.size(value) for point in points for value in point.values()), 2 * 4, settings)
        size = path.stat().st_size
        assert size <= bound <= 1.05 * size + 16 * 2**10, (num_estimates, size, bound)


def test_compare_per_step_splits_the_variance_and_writes_it(tmp_path):
    """``--per-step``: at every sweep point both kinds' contributions sum to their total, the
    LQR's closed-loop Jacobian is the constant matrix ``A + B K`` (one singular value at every
    step), and the report and plot show them."""
    from diffpg.report import quarter_shares

    out = tmp_path / "run"
    assert cli.main(["compare", "--per-step", "--estimators", "bptt", "--num-estimates", "8",
                     "--num-envs", "4", "--horizon", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    for entry in results["results"]:
        for kind in ("pathwise", "score_function"):
            split = entry["per_step"][kind]
            assert len(split["contribution"]) == len(split["own"]) == entry["horizon"]
            assert sum(split["contribution"]) == pytest.approx(split["total"], rel=1e-9)
        spectrum = entry["per_step"]["jacobian_top_singular_value_median"]
        assert spectrum == pytest.approx([spectrum[0]] * entry["horizon"], rel=1e-5)
    assert quarter_shares([1.0, 1.0, 2.0, -4.0 + 4.0]) == pytest.approx([0.25, 0.25, 0.5, 0.0])
    assert "Where the variance comes from" in (out / "report.md").read_text()
    assert (out / "per_step_variance.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--estimators", "reinforce", "nope"], "estimator='nope'"),
        (["--num-estimates", "1"], "num_estimates"),
        (["--horizon", "500"], "horizon=500"),
        (["--sweep", "stiffness_typo"], "sweep"),
        (["--env", "nowhere"], "env='nowhere'"),
        (["--reference", "exact", "--env", "pendulum"], "exact"),
        (["--estimators", "shac:window=3", "--horizon", "8"], "window"),
        (["--sweep", "stiffness"], "sweep='stiffness' needs an env with a stiffness setting"),
        (["--env", "contact", "--sweep", "stiffness", "--stiffnesses", "10,1e9"], "stiffness"),
        (["--estimators", "bptt:horizon=2"], "sets horizon, which the comparison's --horizon"),
        (["--estimators", "shac:discount=0.5"], "sets discount"),
        (["--reference", "reinforce:horizon=3", "--env", "pendulum"], "sets horizon"),
        (["--env-options", "episode_length=3"], "sets episode_length, which --episode-length"),
        (["--env", "pendulum", "--env-options", "backend=spring"], "sets backend"),
        (["--sweep", "batch", "--batch-budget", "1"], "batch_budget=1 holds no batch"),
        (["--sweep", "batch", "--batch-budget", "0"], "batch_budget"),
        (["--stiffnesses", "10"], "read only by sweep='stiffness', not by sweep='horizon'"),
        (["--batch-budget", "64"], "give --sweep batch, or leave out --batch-budget"),
        (["--env", "contact", "--sweep", "stiffness", "--stiffnesses", "10", "10"],
         "stiffnesses: 10.0 is given twice"),
        (["--env", "pendulum", "--hidden-sizes", "0"], "hidden_sizes"),
        (["--seed", str(2**64)], "seed="),
        # sizes beyond this machine's memory, refused before compiling
        (["--num-envs", str(10**9)], "for one estimate's simulated states"),
        (["--num-estimates", str(2 * 10**9)], "lower num_estimates (at most"),
        (["--env", "pendulum", "--estimators", "bptt", "--hidden-sizes", "100000", "100000",
          "--num-estimates", "2"], "lower hidden_sizes (100000, 100000) (not even 2 of its"),
        (["--env", "pendulum", "--reference-estimates", str(2 * 10**9)], "lower reference_estimates"),
        (["--estimators", "bptt", "shac:critic_hidden_sizes=(2147483648,)"],
         "critic_hidden_sizes=(2147483648,) must be a tuple of positive integers (each at most"),
        (["--env", "pendulum", "--estimators", "shac:critic_hidden_sizes=(200000,200000)"],
         "GiB for its critics and their optimiser"),
    ],
)
def test_compare_bad_input_is_a_one_line_error(tmp_path, capsys, arguments, message):
    out = tmp_path / "never"
    status = cli.main(["compare", "--out", str(out), *arguments])
    error = capsys.readouterr().err
    assert status == 2
    assert message in error and "Traceback" not in error and len(error.splitlines()) == 1
    assert not out.exists()


def test_the_reference_and_the_warm_up_follow_num_estimates():
    """A small comparison is small throughout: 16 reference estimates and 200/64 warm-up
    rounds per measured estimate, unless given (the default 64 keeps 1,024 and 200)."""
    default = CompareSettings().resolved()
    assert (default.reference_estimates, default.critic_warmup) == (1024, 200)
    small = CompareSettings(num_estimates=8).resolved()
    assert (small.reference_estimates, small.critic_warmup) == (128, 25)
    given = CompareSettings(num_estimates=8, reference_estimates=50, critic_warmup=0).resolved()
    assert (given.reference_estimates, given.critic_warmup) == (50, 0)
    # From the command line too (its defaults are not the default instance's resolved sizes).
    from diffpg.command_line import parse_compare_command

    parsed = parse_compare_command(["--num-estimates", "8"])[0].resolved()
    assert (parsed.reference_estimates, parsed.critic_warmup) == (128, 25)


def test_compare_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "results.json").write_text("{}")
    status = cli.main(["compare", "--out", str(out), "--num-estimates", "2"])
    assert status == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "{}"


def test_stiffness_sweep_rebuilds_the_contact_env_at_each_point(tmp_path):
    out = tmp_path / "stiff"
    status = cli.main(["compare", "--env", "contact", "--env-options", "start=0.8",
                       "--sweep", "stiffness", "--stiffnesses", "10", "1000", "--horizon", "4",
                       "--estimators", "bptt", "--num-estimates", "4", "--num-envs", "2",
                       "--reference-estimates", "8", "--out", str(out)])
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["env_settings"] for r in results["results"]] == [{"stiffness": 10},
                                                                {"stiffness": 1000}]
    assert results["reference_kind"] == "reinforce"
    assert (out / "variance_vs_stiffness.png").stat().st_size > 0


def test_batch_sweep_keeps_the_budget_of_env_steps_fixed():
    settings = CompareSettings(sweep="batch", num_envs=4, horizon=8, episode_length=16)
    points = settings.points
    assert [(p.num_envs, p.horizon) for p in points] == [(2, 16), (4, 8), (8, 4), (16, 2), (32, 1)]
    assert all(p.num_envs * p.horizon == 32 for p in points)


def test_batch_sweep_longer_than_the_episode_is_refused(tmp_path, capsys):
    status = cli.main(["compare", "--sweep", "batch", "--batch-budget", "512",
                       "--out", str(tmp_path / "x")])
    assert status == 2
    assert "batch_budget" in capsys.readouterr().err


def test_bias_resolution_keeps_its_false_positive_rate_when_one_coordinate_dominates():
    """Unbiased estimates whose noise sits mostly in one coordinate: the norm-based rule
    "bias > 2 x RMS noise" fires ~5% of the time there; the Bonferroni t rule at level 0.001
    must not (expected 0.2 false positives in 200 trials; 3 or more has probability ~1e-3)."""
    rng = np.random.default_rng(1)
    scales = np.array([10.0, 0.1, 0.1, 0.1])
    false_positives = sum(
        gradient_statistics(rng.normal(size=(64, 4)) * scales, reference=np.zeros(4))[
            "bias_resolved"] for _ in range(200))
    assert false_positives <= 2
    # ... and still detects a bias of 8 standard errors in the quiet coordinates.
    shifted = rng.normal(size=(64, 4)) * scales + np.array([0, 0.1, 0, 0])  # 0.1 = 8 SE
    assert gradient_statistics(shifted, reference=np.zeros(4))["bias_resolved"]


@pytest.mark.parametrize("direction", ["worst", "noisiest_coordinate"])
def test_a_bias_beyond_the_detection_limit_is_resolved_at_least_half_the_time(direction):
    """``bias_detection_limit`` promises: a bias of larger norm, in any direction, is resolved
    with probability above about 1/2. Checked with a bias of 1.1 x the limit in the direction
    hardest to detect (every coordinate at the same multiple of its noise) and with all of it on
    the noisiest coordinate; 100 trials each (at least 50 expected; 35 or fewer would be a
    3-standard-error shortfall). The limit itself matches ``threshold * sqrt(sum_p s_p^2 / K)``
    within 4 standard errors of a sample standard deviation."""
    from diffpg.stats import resolution_threshold

    rng = np.random.default_rng(2)
    num, scales = 64, np.array([10.0, 0.1, 0.1, 0.1])
    threshold = resolution_threshold(num, len(scales))
    coordinate_noise = scales / np.sqrt(num)
    limit = threshold * float(np.linalg.norm(coordinate_noise))
    if direction == "worst":
        bias = 1.1 * threshold * coordinate_noise
    else:
        bias = np.array([1.1 * limit, 0.0, 0.0, 0.0])
    assert np.linalg.norm(bias) == pytest.approx(1.1 * limit)
    resolved, limits = 0, []
    for _ in range(100):
        stats = gradient_statistics(rng.normal(size=(num, 4)) * scales + bias,
                                    reference=np.zeros(4))
        resolved += stats["bias_resolved"]
        limits.append(stats["bias_detection_limit"])
    assert resolved > 35
    relative_se = np.sqrt(1.0 / (2 * (num - 1)))
    assert np.median(limits) == pytest.approx(limit, rel=4 * relative_se)
    # Below the limit in the worst direction (0.5 x), detection is rare: the limit is not loose.
    quiet = sum(gradient_statistics(rng.normal(size=(num, 4)) * scales
                                    + 0.5 * threshold * coordinate_noise,
                                    reference=np.zeros(4))["bias_resolved"] for _ in range(100))
    assert quiet < resolved


def test_out_of_memory_halves_the_chunk_and_returns_the_same_estimates(monkeypatch, lqr):
    """A device that cannot hold all K estimates at once gets them half as many at a time, the
    same keys and so the same samples."""

    from diffpg import estimators, sampling

    estimator = estimators.make("bptt", lqr.env, lqr.policy, horizon=lqr.horizon)
    key = jax.random.PRNGKey(0)
    expected, _ = sampling.sample_gradients(estimator, lqr.params, lqr.start_states, key, 32, 0)
    real = sampling.prepare_program
    tried = []

    def small_device(program, *args, **options):  # args: state, starts, keys, batch size
        finish = real(program, *args, **options)
        tried.append(args[-1])

        def out_of_memory():
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating")

        return out_of_memory if args[-1] > 8 else finish

    monkeypatch.setattr(sampling, "prepare_program", small_device)
    samples, _ = sampling.sample_gradients(estimator, lqr.params, lqr.start_states, key, 32, 0)
    assert tried == [32, 16, 8]
    np.testing.assert_allclose(samples, expected, rtol=1e-5, atol=1e-6)


def test_a_comparison_larger_than_memory_runs_its_estimates_a_few_at_a_time(monkeypatch):
    """With memory for 4 x 2 estimates' simulated states (the allowance is 4 x each one's
    states), a comparison of K = 8 runs them 2 at a time, and gives the samples of all at once."""
    from diffpg import compare, sampling
    from diffpg.devices import state_bytes

    settings = CompareSettings(estimators=("bptt", "reinforce"), sweep="none", horizon=4,
                               num_estimates=8, num_envs=4, critic_warmup=0)
    expected = run_comparison(settings)["samples"][0]
    env, _, _ = compare.make_env_and_policy(settings)
    per_estimate = state_bytes(env) * settings.num_envs * (settings.horizon + 1)
    monkeypatch.setattr(compare, "available_memory_bytes", lambda: 4 * per_estimate * 2 + 1)
    prepare_sampling, chunks = sampling.prepare_sampling, []

    def recorded(*args, chunk_size=None, **kwargs):
        chunks.append(chunk_size)
        return prepare_sampling(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(compare, "prepare_sampling", recorded)
    samples = run_comparison(settings)["samples"][0]
    assert chunks == [2, 2]
    for name in ("estimates/bptt", "estimates/reinforce"):
        np.testing.assert_allclose(samples[name], expected[name], rtol=1e-5, atol=1e-6)


def test_the_variance_interval_covers_the_true_variance_at_its_level():
    """The 90% percentile-bootstrap interval of the variance's trace, over 200 independent
    sets of 64 normal estimates of known covariance, covers the true trace in 90% of them up to
    the percentile bootstrap's known undercoverage at this size (measured: 0.84; 0.8-0.95 is
    allowed, about 6 binomial standard errors wide at 200 sets; a broken interval covers far less
    or always)."""
    from diffpg.stats import bootstrap_interval, variance_trace

    rng = np.random.default_rng(0)
    scales = np.array([1.0, 2.0, 0.5])
    covered = 0
    for trial in range(200):
        samples = rng.normal(size=(64, 3)) * scales
        low, high = bootstrap_interval(samples, variance_trace, seed=trial)
        covered += low <= float(np.sum(scales**2)) <= high
    assert 0.8 * 200 <= covered <= 0.95 * 200


def test_interquartile_mean_trims_a_quarter_from_each_end():
    from diffpg.stats import interquartile_mean, interquartile_mean_interval

    assert interquartile_mean([1.0, 2.0, 3.0, 100.0]) == 2.5  # 1 and 100 trimmed
    assert interquartile_mean([4.0, 5.0, 6.0]) == 5.0  # too few runs to trim: the mean
    low, high = interquartile_mean_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0])
    assert low <= interquartile_mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0]) <= high
    assert high < 60  # the outlier does not carry the interval, as it would the mean's


def test_the_sweep_figure_draws_the_quantities_its_titles_name(tmp_path, monkeypatch):
    """Read the plotted arrays back: the norm panel, titled "Norm of the mean estimate", drew
    the mean of the norms (REINFORCE's 91 beside a reference of 38.5, where its norm of the mean
    is 42.2), and a reader concluded REINFORCE was biased."""
    from diffpg import report

    settings = CompareSettings(estimators=("reinforce", "bptt"), num_estimates=8, num_envs=4,
                               horizon=4, sweep="horizon")
    results = run_comparison(settings)
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    report._plot_against_sweep(results, tmp_path / "figure.png")
    (figure,) = figures
    checked = []
    for row in figure.axes[2::3]:
        assert row.get_title() in ("", "Norm of the mean estimate (dotted: mean norm of one "
                                       "estimate)")
        lines = {line.get_label(): line.get_ydata() for line in row.get_lines()}
        for label in results["results"][0]["estimators"]:
            if label not in lines:
                continue
            expected = [entry["estimators"][label] for entry in results["results"]]
            np.testing.assert_allclose(lines[label], [e["norm_of_mean"] for e in expected])
            np.testing.assert_allclose(lines[f"{label}: mean of the norms"],
                                       [e["mean_norm"] for e in expected])
            checked.append(label)
        np.testing.assert_allclose(lines["reference |grad J|"],
                                   [entry["reference"]["norm"] for entry in results["results"]])
    assert sorted(checked) == ["bptt", "reinforce"]


def test_a_detection_limit_above_one_is_flagged_with_the_options_that_lower_it(tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    assert cli.main(["compare", "--estimators", "reinforce", "bptt", "--num-estimates", "4",
                     "--num-envs", "4", "--horizon", "2", "--sweep", "none",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())["results"][-1]["estimators"]
    flagged = [label for label, s in results.items()
               if s["relative_bias_detection_limit"] > 1]
    assert "reinforce" in flagged  # 4 estimates of REINFORCE resolve nothing on the LQR
    (line,) = [line for line in printed.splitlines() if "Uninformative" in line]
    assert all(f"{label} (detection limit" in line for label in flagged)
    assert "--num-estimates" in line and "--reference-estimates" not in line  # exact reference
    assert line in (out / "report.md").read_text()
    from diffpg.report import _uninformative_lines

    assert _uninformative_lines({"a": {"relative_bias_detection_limit": 0.5}}, "exact") == []
    assert "--reference-estimates" in _uninformative_lines(
        {"a": {"relative_bias_detection_limit": 5.0}}, "reinforce")[-1]


def test_a_setting_refused_where_an_estimator_is_traced_names_the_spec_and_the_point(
        tmp_path, capsys):
    """SHAC's critic minibatches are checked against its samples per update when its program is
    traced (the sizes are known there): the line names the spec and the sweep point."""
    assert cli.main(["compare", "--env", "lqr", "--estimators", "bptt", "shac", "--sweep",
                     "none", "--horizon", "1", "--num-envs", "2", "--num-estimates", "2",
                     "--critic-warmup", "1", "--out", str(tmp_path / "run")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: estimators: shac at T=1: critic_minibatches=4 is more than the 2" in line, line


def test_a_refusal_where_a_program_is_traced_is_raised_without_waiting_for_the_others():
    """The first setting an estimator's trace refuses is raised as soon as it is, not after the
    estimators ahead of it in the table have run (here: one that never finishes)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from diffpg.envs.core import SettingError

    from diffpg.compare import _result_or_first_refusal

    release = threading.Event()

    def refuse():
        raise SettingError("critic_minibatches=4 is more than the 2 samples")

    with ThreadPoolExecutor(max_workers=2) as pool:
        slow, refused = pool.submit(release.wait, 60), pool.submit(refuse)
        watched = {slow: "bptt at T=1", refused: "shac at T=1"}
        with pytest.raises(SettingError, match="^estimators: shac at T=1: critic_minibatches=4"):
            _result_or_first_refusal(slow, watched)
        assert not slow.done()
        release.set()
        assert _result_or_first_refusal(slow, {slow: "bptt at T=1"}) is True


def test_a_setting_refused_where_a_program_is_traced_comes_before_any_estimator_runs(
        monkeypatch):
    """Every estimator's programs are traced before any compiles: a leave-one-out baseline of
    one rollout (refused as REINFORCE's program is traced) is raised while the estimators that
    learn, queued ahead of it and each holding a worker, have not started compiling."""
    import threading

    from diffpg.envs.core import SettingError

    from diffpg import compare

    release, real, held_in_vain = threading.Event(), compare.prepare_sampling, []

    def held(*args, **kwargs):
        run = real(*args, **kwargs)

        def run_once_released():
            if not release.wait(60):
                held_in_vain.append("no refusal while the estimators ahead held both workers")
            return run()

        return run_once_released

    monkeypatch.setattr(compare, "prepare_sampling", held)
    settings = CompareSettings(env="lqr", estimators=("shac", "critic_backprop", "reinforce"),
                               sweep="none", horizon=8, num_envs=1, num_estimates=2,
                               critic_warmup=1)
    try:
        with pytest.raises(SettingError, match="^estimators: reinforce at T=8: baseline="
                                               "'leave_one_out' needs at least 2 rollouts"):
            run_comparison(settings)
        assert not release.is_set() and not held_in_vain
    finally:
        release.set()


def test_ivw_of_one_start_state_names_the_two_halves_it_needs(tmp_path, capsys):
    """IVW with one start state blamed a leave-one-out baseline the user never set, whose
    advice (rollouts_per_state >= 2) then met the real requirement: two start states."""
    for spec in ("ivw", "ivw:rollouts_per_state=2"):
        assert cli.main(["compare", "--env", "lqr", "--horizon", "2", "--num-envs", "1",
                         "--num-estimates", "2", "--sweep", "none", "--estimators", spec,
                         "--out", str(tmp_path / "never")]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "cross-fitted between two halves of the start states: a batch of 1 start " in error
        assert "(num_envs >= 2)" in error and "leave_one_out" not in error, error


def test_a_diverged_critic_s_statistics_print_no_library_warning(tmp_path, capsys):
    """Every estimate non-finite (a critic learning rate of 1e30): the report says so, and
    scipy's bootstrap warned on the console that its interval could not be computed."""
    assert cli.main(["compare", "--env", "lqr", "--horizon", "2", "--num-envs", "4",
                     "--num-estimates", "4", "--sweep", "none", "--estimators",
                     "shac:critic_learning_rate=1e30", "--out", str(tmp_path / "run")]) == 0
    assert "Warning" not in capsys.readouterr().err


def test_the_estimators_that_learn_are_queued_first(monkeypatch):
    """They take longest: each point queues them before the rest; the futures come back in the
    table's order."""
    from diffpg import compare

    queued = []
    real_queue = compare._queue_estimators

    def queue(pool, settings, at, watched, order):
        queued.append([spec.label for spec in order])
        return real_queue(pool, settings, at, watched, order)

    monkeypatch.setattr(compare, "_queue_estimators", queue)
    settings = CompareSettings(env="lqr", estimators=("bptt", "reinforce", "shac", "ppo"),
                               horizon=2, num_envs=4, num_estimates=2, critic_warmup=1)
    results = run_comparison(settings)
    assert queued == [["shac", "ppo", "bptt", "reinforce"]] * 2
    assert list(results["results"][0]["estimators"]) == ["bptt", "reinforce", "shac", "ppo"]


def test_a_batch_mean_baseline_of_one_rollout_is_refused():
    """With one rollout the batch mean is the rollout's own return: every estimate was 0, and
    the comparison called its 100% bias resolved. Like leave-one-out's, refused."""
    from diffpg.envs.core import SettingError

    from diffpg.estimators.reinforce import ScoreFunctionSettings, _pool_size

    with pytest.raises(SettingError, match="baseline='batch_mean' of 1 rollout"):
        _pool_size(ScoreFunctionSettings(baseline="batch_mean"), 1)
    assert _pool_size(ScoreFunctionSettings(baseline="batch_mean"), 2) == 2
