"""Writing a comparison's folder: results.json, CSV tables, PNG plots and report.md."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from diffpg.comparison_files import SAMPLES_FILE, save_samples  # noqa: E402
from diffpg.devices import environment_description  # noqa: E402
from diffpg.estimators import FAMILIES  # noqa: E402
from diffpg.folders import PARTIAL_PATTERN, atomic_path  # noqa: E402

TABLE_COLUMNS = (
    "horizon", "estimator", "norm_of_mean", "mean_norm", "variance_trace", "variance_max",
    "relative_variance", "bias", "bias_noise", "bias_max_t", "bias_resolved", "relative_bias",
    "bias_detection_limit", "relative_bias_detection_limit",
    "cosine_to_reference", "mean_cosine_to_reference", "mean_pairwise_cosine", "snr", "nonfinite_fraction",
    "compile_seconds", "seconds_per_estimate", "warmup_seconds",
)


def rows(results: dict) -> list[dict]:
    """One row per (sweep point, estimator)."""
    table = []
    for entry in results["results"]:
        for label, stats in entry["estimators"].items():
            table.append({"sweep_value": entry["sweep_value"], "horizon": entry["horizon"],
                          "estimator": label} | {k: stats.get(k) for k in TABLE_COLUMNS[2:]})
    return table


OUTPUT_FILES = ("results.json", "table.csv", SAMPLES_FILE, "report.md", "bias_and_cosine.png",
                "per_step_variance.png", "variance_vs_horizon.png", "variance_vs_stiffness.png",
                "variance_vs_batch.png", PARTIAL_PATTERN)
"""Every file a comparison may write, names or glob patterns (what ``--overwrite`` removes before
a new one runs; the partial files are what a write cut short by SIGKILL leaves)."""

DEEPEST_FILE = ".{}.partial-4194304{}".format(*os.path.splitext(max(
    (name for name in OUTPUT_FILES if "*" not in name), key=len)))
"""The longest name a comparison writes in its folder: its longest file's temporary name
(``diffpg.folders.temporary_name``; process ids have at most 7 digits)."""


def write_results(results: dict, out_dir: Path) -> list[Path]:
    """Write a comparison's data, ``samples.npz`` then ``results.json`` (each under a temporary
    name, renamed into place: ``folders.atomic_path``). Written after each
    sweep point, so that a stopped comparison keeps what it finished. Returns the results as
    written to results.json (without the samples, with the environment's description)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = results.get("samples")
    written = {k: v for k, v in results.items() if k != "samples"} | {
        "environment": environment_description()}
    if samples is not None:
        written["samples_file"] = SAMPLES_FILE
        with atomic_path(out_dir / SAMPLES_FILE) as temporary:
            save_samples(samples, temporary, results.get("settings"))
    with atomic_path(out_dir / "results.json") as temporary:
        temporary.write_text(json.dumps(written, indent=2))
    return written


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """Write every output file of a comparison into ``out_dir`` (``write_results``, the table,
    the plots and report.md); returns their paths. Each file is written under a temporary name
    and renamed into place (``folders.atomic_path``)."""
    samples = results.get("samples")
    results = write_results(results, out_dir)
    written = ([out_dir / SAMPLES_FILE] if samples is not None else []) + [out_dir / "results.json"]

    def write(name: str, writer) -> None:
        with atomic_path(out_dir / name) as temporary:
            writer(temporary)
        written.append(out_dir / name)

    write("table.csv", lambda path: _write_table(results, path))
    plots = []
    if len(results["results"]) > 1:
        plots.append((f"variance_vs_{results['settings']['sweep']}.png", _plot_against_sweep))
    plots.append(("bias_and_cosine.png", _plot_bias_and_cosine))
    if "per_step" in results["results"][-1]:
        plots.append(("per_step_variance.png", _plot_per_step))
    for name, plot in plots:
        write(name, lambda path, plot=plot: plot(results, path))
    write("report.md", lambda path: path.write_text(_markdown(results, [n for n, _ in plots])))
    return written


def _write_table(results: dict, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("sweep_value",) + TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows(results))


def _labels(results):
    return list(results["results"][0]["estimators"])


def _by_family(results) -> dict[str, list[str]]:
    """The estimators' labels grouped by the family each declared (``estimators.FAMILIES``
    order; results written before families were recorded: one group)."""
    families = results.get("families", {})
    grouped: dict[str, list[str]] = {}
    for family in (*FAMILIES, *sorted(set(families.values()) - set(FAMILIES))):
        labels = [label for label in _labels(results) if families.get(label, "other") == family]
        if labels:
            grouped[family] = labels
    return grouped


SWEEP_AXIS = {"horizon": "horizon T (steps)", "stiffness": "wall stiffness (N/m)",
              "batch": "trajectories n per estimate (k = budget / n steps each)"}
MARKERS = "osD^v<>ph*"


def _title(results) -> str:
    settings = results["settings"]
    values = [entry["sweep_value"] for entry in results["results"]]
    swept = (f"{settings['sweep']} {values[0]:g} to {values[-1]:g}" if len(values) > 1
             else f"T = {results['results'][-1]['horizon']}")
    return (f"{settings['env']}, {swept}: {settings['num_estimates']} estimates x "
            f"{settings['num_envs']} start states each; reference: "
            f"{results['results'][-1]['reference']['kind']}")


def _plot_against_sweep(results, path: Path) -> Path:
    """Small multiples: one row per family of estimators, columns variance, relative bias (with
    each estimator's detection limit in its own colour and marker) and the mean's norm beside the
    reference gradient's."""
    values = [entry["sweep_value"] for entry in results["results"]]
    x_label = SWEEP_AXIS[results["settings"]["sweep"]]
    batch = results["settings"]["sweep"] == "batch"
    grouped = _by_family(results)
    figure, axes = plt.subplots(len(grouped), 3, figsize=(15, 3.3 * len(grouped) + 0.8),
                                sharex=True, sharey="col", squeeze=False)
    squared_norms = [entry["reference"]["norm"] ** 2 for entry in results["results"]]
    for row, (family, labels) in zip(axes, grouped.items(), strict=True):
        for index, label in enumerate(labels):
            def series(key, label=label):
                return [entry["estimators"][label].get(key) for entry in results["results"]]

            style = {"marker": MARKERS[index % len(MARKERS)], "color": f"C{index}"}
            variance = series("variance_trace")
            low = [i[0] for i in series("variance_trace_interval")]
            high = [i[1] for i in series("variance_trace_interval")]
            if batch:  # objectives differ with k: normalise
                variance, low, high = ([v / n2 for v, n2 in zip(v_, squared_norms, strict=True)]
                                       for v_ in (variance, low, high))
            row[0].plot(values, variance, label=label, **style)
            row[0].fill_between(values, low, high, color=style["color"], alpha=0.15)
            bias = series("relative_bias")
            resolved = series("bias_resolved")
            row[1].plot(values, bias, color=style["color"], label=label)
            row[1].scatter(values, bias, marker=style["marker"], color=style["color"],
                           facecolors=[style["color"] if r else "none" for r in resolved],
                           zorder=3)
            row[1].plot(values, series("relative_bias_detection_limit"), linestyle=":",
                        marker=style["marker"], markersize=3, color=style["color"])
            row[2].plot(values, series("norm_of_mean"), label=label, **style)
            row[2].plot(values, series("mean_norm"), linestyle=":", color=style["color"],
                        alpha=0.6, label=f"{label}: mean of the norms")
        row[2].plot(values, [entry["reference"]["norm"] for entry in results["results"]],
                    color="black", linestyle="--", label="reference |grad J|")
        row[0].set_ylabel(f"{family}\n" + ("variance / |reference|^2" if batch
                                            else "trace of covariance"))
        row[1].set_ylabel("|mean - reference| / |reference|")
        row[2].set_ylabel("norm")
        row[0].legend(fontsize=8, loc="best")
        row[2].legend(fontsize=8, loc="best", handles=row[2].get_lines()[-1:])
    axes[0][0].set_title("Variance of one estimate (90% bootstrap band)")
    axes[0][1].set_title("Relative bias (hollow: not resolved; dotted: detection limit)")
    axes[0][2].set_title("Norm of the mean estimate (dotted: mean norm of one estimate)")
    for axis in axes.ravel():
        axis.set(xscale="log", yscale="log")
        axis.grid(True, which="major", alpha=0.3)
        axis.set_xticks(values, [f"{v:g}" for v in values])
        axis.xaxis.set_minor_locator(ticker.NullLocator())
        axis.yaxis.set_minor_locator(ticker.NullLocator())
    for axis in axes[-1]:
        axis.set_xlabel(x_label)
    figure.suptitle(_title(results))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_bias_and_cosine(results, path: Path) -> Path:
    """At the sweep's last point, one row per estimator (grouped by family): the relative bias
    on a log axis beside its sampling noise and detection limit, and how far the mean and a
    single estimate point from the reference (``1 - cosine``, log axis: 0 is the same
    direction)."""
    final = results["results"][-1]
    grouped = _by_family(results)
    labels = [label for group in grouped.values() for label in group]
    names = [f"{label} ({family})" for family, group in grouped.items() for label in group]
    stats = [final["estimators"][label] for label in labels]
    figure, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.42 * len(labels)), sharey=True)
    positions = np.arange(len(labels))[::-1]
    reference_norm = max(final["reference"]["norm"], 1e-30)
    tiny = 1e-8

    def positive(values):
        return [max(v or 0.0, tiny) for v in values]

    biases = positive([s.get("relative_bias") for s in stats])
    bars = axes[0].barh(positions, biases, color="tab:blue", height=0.6)
    for bar, s in zip(bars, stats, strict=True):
        if not s.get("bias_resolved"):
            bar.set_hatch("//")
            bar.set_alpha(0.5)
    axes[0].scatter(positive([(s.get("bias_noise") or 0.0) / reference_norm for s in stats]),
                    positions, color="black", marker="|", s=300, zorder=3,
                    label="sampling noise (RMS)")
    axes[0].scatter(positive([s.get("relative_bias_detection_limit") for s in stats]),
                    positions, color="tab:red", marker="|", s=300, zorder=3,
                    label="detection limit")
    axes[0].set(xscale="log", xlabel="|mean - reference| / |reference|",
                title=f"Relative bias at T={final['horizon']} (hatched: not resolved)")
    axes[1].barh(positions, positive([1 - (s.get("cosine_to_reference") or 0.0) for s in stats]),
                 color="tab:green", height=0.6, label="mean estimate")
    axes[1].scatter(positive([1 - (s.get("mean_cosine_to_reference") or 0.0) for s in stats]),
                    positions, color="black", zorder=3, label="one estimate (mean)")
    axes[1].set(xscale="log", xlabel="1 - cosine to the reference (0: same direction)",
                title=f"Direction at T={final['horizon']}")
    axes[0].set_yticks(positions, names)
    for axis in axes:
        axis.grid(True, axis="x", which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle(_title(results))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


PER_STEP_KINDS = {"pathwise": "pathwise (BPTT)",
                  "score_function": "score function (REINFORCE, leave-one-out)"}


def quarter_shares(contribution: list[float]) -> list[float]:
    """The shares of the variance (``sum_t c_t`` = 1) from each quarter of the horizon's steps
    (quarters as equal as the horizon allows)."""
    values = np.asarray(contribution, np.float64)
    total = values.sum()
    return [float(part.sum() / total) for part in np.array_split(values, 4)]


def _per_step_markdown(results: dict) -> list[str]:
    final = results["results"][-1]
    if "per_step" not in final:
        return []
    per_step = final["per_step"]
    lines = ["", f"## Where the variance comes from, by step (T = {final['horizon']})", "",
             "Share of the total variance `tr Var(g)` from each quarter of the horizon's steps "
             "(each step's covariance with the whole estimate, `diffpg.per_step`; negative: the "
             "step cancels others), and `sum_t own_t / total` (above 1: the steps' terms cancel "
             "on the whole; below 1: they add up).", "",
             "| estimator | total variance | steps 1st quarter | 2nd | 3rd | last | own / total |",
             "|---|---|---|---|---|---|---|"]
    for kind, label in PER_STEP_KINDS.items():
        split = per_step[kind]
        shares = quarter_shares(split["contribution"])
        own_ratio = float(np.sum(split["own"]) / max(split["total"], 1e-300))
        lines.append(f"| {label} | {split['total']:.3g} | "
                     + " | ".join(f"{v:.2f}" for v in shares) + f" | {own_ratio:.3g} |")
    spectrum = per_step.get("jacobian_top_singular_value_median")
    if spectrum:
        growth = float(np.sum(np.log(spectrum)))
        lines += ["", f"Closed-loop step Jacobians (deterministic policy, median over start "
                      f"states): largest singular value {min(spectrum):.3g} to {max(spectrum):.3g} "
                      f"per step; the product of the largest bounds a perturbation's growth over "
                      f"the horizon by e^{growth:.3g}."]
    return lines


def _plot_per_step(results: dict, path: Path) -> Path:
    entries = [e for e in results["results"] if "per_step" in e]
    spectrum = entries[-1]["per_step"].get("jacobian_top_singular_value_median")
    figure, axes = plt.subplots(1, 3 if spectrum else 2, figsize=(15 if spectrum else 10, 4.2))
    longest = max(e["horizon"] for e in entries)
    for axis, (kind, label) in zip(axes, PER_STEP_KINDS.items(), strict=False):
        if len(entries) > 1:  # a heat-map: sweep point x step
            shares = np.full((len(entries), longest), np.nan)
            for row, entry in enumerate(entries):
                split = entry["per_step"][kind]
                values = np.asarray(split["contribution"]) / max(split["total"], 1e-300)
                shares[row, :len(values)] = values
            image = axis.imshow(shares, aspect="auto", cmap="viridis", origin="lower",
                                extent=(0.5, longest + 0.5, -0.5, len(entries) - 0.5))
            axis.set_yticks(range(len(entries)), [f"{e['sweep_value']:g}" for e in entries])
            axis.set(xlabel="step t", ylabel=results["settings"]["sweep"],
                     title=f"{label}: share of variance by step")
            figure.colorbar(image, ax=axis)
        else:
            split = entries[-1]["per_step"][kind]
            values = np.asarray(split["contribution"]) / max(split["total"], 1e-300)
            axis.bar(np.arange(1, len(values) + 1), values)
            axis.set(xlabel="step t", ylabel="c_t / tr Var(g)",
                     title=f"{label}: share of variance by step")
    if spectrum:
        axes[-1].plot(np.arange(1, len(spectrum) + 1), spectrum, marker=".")
        axes[-1].axhline(1.0, color="grey", lw=1, ls=":")
        axes[-1].set(yscale="log", xlabel="step t", ylabel="largest singular value",
                     title=f"Closed-loop step Jacobian (T = {entries[-1]['horizon']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def format_cell(value) -> str:
    """A table cell of the comparison's report: 3 significant digits, "-" for none, a
    resolution as "yes" or "not resolved"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "not resolved"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _markdown(results: dict, plots: list[str]) -> str:
    settings = results["settings"]
    final = results["results"][-1]
    lines = [
        f"# Gradient estimator comparison: {settings['env']}",
        "",
        f"{settings['num_estimates']} independent estimates per estimator, each averaging "
        f"{settings['num_envs']} rollouts from the same start states; discount "
        f"{settings['discount']}; seed {settings['seed']}; {results['num_parameters']} policy "
        f"parameters; reference: **{results['reference_kind']}**"
        + (" (closed-form gradient)" if results["reference_kind"] == "exact" else
           f" ({settings['reference_estimates']} estimates, standard error included in the "
           "bias resolution)") + ".",
        "",
        "Columns (one estimate g is one estimator's gradient from the batch of start states; "
        "over the estimates, mean = their average; see `diffpg.stats`):",
        "",
        "- **norm of mean** |mean|: compare it with the reference's norm, given under the table;",
        "- **mean norm**: the average of |g|, larger than |mean| by the noise (so an unbiased but "
        "noisy estimator's mean norm exceeds the reference's norm);",
        "- **variance**: trace of the covariance of one estimate, E|g - mean|^2;",
        "- **relative bias**: |mean - reference| / |reference|; **bias resolved**: yes when a "
        "coordinate's t-score exceeds the Bonferroni threshold at family-wise level 0.001, else "
        "the data cannot tell the bias from zero;",
        "- **detection limit (relative)**: the relative bias above which a bias in any direction "
        "is resolved with probability above about 1/2 (a bias not resolved may be this large);",
        "- **cosine (mean)**: cosine between mean and reference; **pairwise cosine**: the average "
        "cosine between two different estimates (1: every estimate points the same way);",
        "- **SNR**: |mean| / sqrt(variance); **non-finite**: share of estimates with an inf or NaN;",
        "- **compile s**, **s / estimate**: compilation time, and time per estimate after it.",
        "",
        f"## At horizon T = {final['horizon']}" + (
            f", {settings['sweep']} = {final['sweep_value']:g}"
            if settings["sweep"] not in ("none", "horizon") else ""),
        "",
        "| estimator | norm of mean | mean norm | variance | relative bias | bias resolved | "
        "detection limit (relative) | cosine (mean) | pairwise cosine | SNR | non-finite | "
        "compile s | s / estimate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in final["estimators"].items():
        cells = [label] + [format_cell(s.get(k)) for k in (
            "norm_of_mean", "mean_norm", "variance_trace", "relative_bias", "bias_resolved",
            "relative_bias_detection_limit", "cosine_to_reference", "mean_pairwise_cosine",
            "snr", "nonfinite_fraction",
            "compile_seconds", "seconds_per_estimate")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _uninformative_lines(final["estimators"], results["reference_kind"])
    reference = final.get("reference")
    if reference:
        cost = (f", {settings['reference_estimates']} estimates in {reference['seconds']:.3g} s"
                if reference["kind"] != "exact" and "seconds" in reference else "")
        warmup = sum(s.get("warmup_seconds", 0.0) for s in final["estimators"].values())
        lines += ["", f"Reference ({reference['kind']}): norm {format_cell(reference['norm'])}{cost}. "
                      f"Critics warmed up by {settings['critic_warmup']} estimates before "
                      f"measuring, {warmup:.3g} s in all at this point (not in the columns)."]
    lines += _per_step_markdown(results)
    lines += ["", "## Reading", ""] + [f"- {s}" for s in _reading(results)] + [""]
    for plot in plots:
        lines += [f"![{plot}]({plot})", ""]
    environment = results["environment"]
    lines += ["## Run", "", "```", json.dumps(settings), json.dumps(environment), "```", ""]
    return "\n".join(lines)


UNINFORMATIVE_DETECTION_LIMIT = 1.0
"""A relative detection limit above this: a bias as large as the reference gradient itself
could go unresolved, so the estimator's bias column says nothing."""


def _uninformative_lines(estimators: dict, reference_kind: str) -> list[str]:
    """Under the table, the estimators whose bias cannot be told at this sample size, with the
    options that would lower their detection limit."""
    flagged = {label: s["relative_bias_detection_limit"] for label, s in estimators.items()
               if (s.get("relative_bias_detection_limit") or 0) > UNINFORMATIVE_DETECTION_LIMIT}
    if not flagged:
        return []
    options = "--num-estimates" + (" or --reference-estimates" if reference_kind != "exact"
                                   else "")
    return ["", "**Uninformative at this sample size:** " + ", ".join(
        f"{label} (detection limit {limit:.3g})" for label, limit in flagged.items())
        + ": a bias as large as the reference gradient itself would go unresolved, so their "
        f"bias columns distinguish nothing; more estimates ({options}) lower the limit, about "
        "as 1/sqrt(n)."]


def _reading(results: dict) -> list[str]:
    """Short factual sentences drawn from the numbers (no interpretation beyond them)."""
    final = results["results"][-1]["estimators"]
    finite = {k: v for k, v in final.items() if v.get("variance_trace") is not None}
    sentences = []
    if finite:
        lowest = min(finite, key=lambda k: finite[k]["variance_trace"])
        highest = max(finite, key=lambda k: finite[k]["variance_trace"])
        ratio = finite[highest]["variance_trace"] / max(finite[lowest]["variance_trace"], 1e-300)
        sentences.append(f"Lowest variance: {lowest}; highest: {highest} ({ratio:.3g}x).")
    biased = [k for k, v in final.items() if v.get("bias_resolved")]
    unresolved = [k for k, v in final.items() if v.get("bias_resolved") is False]
    if biased:
        sentences.append("Bias resolved (beyond sampling noise, family-wise level 0.001) for: " + ", ".join(
            f"{k} ({final[k]['relative_bias']:.2g} relative)" for k in biased) + ".")
    if unresolved:
        sentences.append("No bias resolved for: " + ", ".join(
            f"{k} (a relative bias above {final[k]['relative_bias_detection_limit']:.2g} would "
            "have been resolved with probability > 1/2)" for k in unresolved)
            + ": consistent with unbiased at this sample size, not evidence of it.")
    if len(results["results"]) > 1:
        first, last = results["results"][0], results["results"][-1]
        sweep = results["settings"]["sweep"]
        for label in final:
            a = first["estimators"][label].get("variance_trace")
            b = last["estimators"][label].get("variance_trace")
            if not (a and b):
                continue
            if sweep == "batch":
                a = first["estimators"][label].get("relative_variance")
                b = last["estimators"][label].get("relative_variance")
                slope = np.log(b / a) / np.log(last["sweep_value"] / first["sweep_value"])
                sentences.append(
                    f"{label}: variance / |reference|^2 x{b / a:.3g} from n = "
                    f"{first['sweep_value']:g} to {last['sweep_value']:g} at a fixed budget "
                    f"(log-log slope {slope:.2f}: -1 if only trajectories count, 0 if every "
                    "step does).")
                continue
            sentence = (f"{label}: variance x{b / a:.3g} from {sweep} {first['sweep_value']:g} "
                        f"to {last['sweep_value']:g}")
            if sweep == "horizon":
                growth = (b / a) ** (1 / max(last["horizon"] - first["horizon"], 1))
                sentence += f" (x{growth:.3g} per step on average)"
            sentences.append(sentence + ".")
    nonfinite = [k for k, v in final.items() if v.get("nonfinite_fraction")]
    if nonfinite:
        sentences.append("Non-finite estimates from: " + ", ".join(nonfinite) + ".")
    return sentences
