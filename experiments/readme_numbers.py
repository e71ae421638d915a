"""Every number the README (and the docs it links) quotes, computed here and written between
markers.

README.md and ``DOCUMENTS`` mark each generated block with ``<!-- generated: NAME -->`` and
``<!-- end: NAME -->``; this script recomputes the blocks and rewrites them in place in the
document that holds each (or, with ``--check``, compares them with a fresh computation and exits
1 where they differ: numbers within ``--rtol``, other text exactly). Sections:

* ``example``: the output of the README's first Python example (it runs the code itself);
* ``compare-table``: the default ``diffpg compare`` run's table at its largest horizon
  (computed with ``--sweep none``: every point's keys depend only on the point, so the table is
  the same as the sweep's last point), under each XLA:CPU rounding of ``ROUNDINGS``: a row
  where they disagree (a learned warm-up amplifies the rounding) gives, in each cell, the range
  of the roundings and of other draws of the estimators' keys (``ESTIMATOR_SEEDS``), within which
  another CPU's run falls (``--check`` compares this process's table with the ranges);
* ``compare-sweep``: what the default run's horizon sweep says (variance growth, biases);
* ``compare-time``: the default run's wall-clock, cold and with its compiled programs kept;
* ``ant-compare-time``: the README's ant comparison's wall-clock, cold and warm (about 6 minutes);
* ``training``: ``diffpg train`` on cart-pole swing-up with every trainable estimator at its
  defaults, against doing nothing and against the fresh policy (minutes on a CPU);
* ``ant``: SHAC on Brax's Ant for 100 updates on a CPU (``diffpg train --env ant shac``);
* ``suite-time``: the test suite's wall-clock and CPU time from a clean clone, with an empty
  compilation cache and with it warm, and the quick tests' (about 40 minutes).

    python experiments/readme_numbers.py                          # every section (~40 min, CPU)
    python experiments/readme_numbers.py --only compare-table compare-sweep
    python experiments/readme_numbers.py --check --only example compare-table   # the test's check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = (README, ROOT / "docs" / "training.md")
"""The documents that hold generated blocks."""
NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?")


def block(text: str, name: str) -> str:
    """The generated block ``name`` of ``text`` (between its markers)."""
    match = re.search(rf"<!-- generated: {name} -->\n(.*?)<!-- end: {name} -->", text, re.S)
    if match is None:
        raise ValueError(f"the document has no block <!-- generated: {name} -->")
    return match.group(1)


def document_of(name: str) -> Path:
    """The document of ``DOCUMENTS`` that holds block ``name``."""
    for document in DOCUMENTS:
        if f"<!-- generated: {name} -->" in document.read_text():
            return document
    raise ValueError(f"no document of {[str(d.relative_to(ROOT)) for d in DOCUMENTS]} has a "
                     f"block <!-- generated: {name} -->")


def replace_block(text: str, name: str, content: str) -> str:
    block(text, name)  # a clear error if it is missing
    return re.sub(rf"(<!-- generated: {name} -->\n).*?(<!-- end: {name} -->)",
                  lambda m: m.group(1) + content + m.group(2), text, flags=re.S)


# ----------------------------------------------------------------------------- sections


def example() -> dict[str, str]:
    """Run the README's first Python code block and quote what it prints."""
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    environment = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, cwd=ROOT, check=True)
    return {"example": f"```\n{done.stdout}```\n"}


def _compare_results(sweep: str, estimator_seed: int = 0) -> dict:
    from diffpg.compare import CompareSettings, run_comparison

    return run_comparison(CompareSettings(sweep=sweep, estimator_seed=estimator_seed))


ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
ROUNDINGS: dict[str, str | None] = {
    "this CPU": None, "one thread": ONE_THREAD,
    **{f"{isa}{threads}": f"--xla_cpu_max_isa={isa}" + (" " + ONE_THREAD if threads else "")
       for isa in ("AVX2", "AVX", "SSE4_2") for threads in ("", ", one thread")},
}
"""XLA:CPU settings the default comparison's table is computed under (``XLA_FLAGS``; ``None``:
XLA's defaults): each sums in another order (vector width, threads), as another CPU does, and a
learned critic's 200-round warm-up amplifies the difference. The README gives, where they
disagree, the 95% prediction interval of another rounding's value (``_cell``)."""
ESTIMATOR_SEEDS = range(1, 9)
"""Other draws of the estimators' own keys (``CompareSettings.estimator_seed``) for the rows where
the roundings disagree: a warm-up that another CPU's rounding sends elsewhere is one more draw of
the learned critic, so its spread over draws bounds where another CPU lands (the roundings of one
CPU alone missed another CPU's PPO variance, 94 against 102 to 183)."""

TABLE_COLUMNS = ("mean_norm", "variance_trace", "relative_bias", "bias_resolved",
                 "relative_bias_detection_limit", "cosine_to_reference", "snr")
TABLE_HEADER = ("| estimator | mean norm | variance | relative bias | bias resolved | detection "
                "limit | cosine (mean) | SNR |\n|---|---|---|---|---|---|---|---|\n")


def in_a_new_process(expression: str, xla_flags: str | None):
    """The JSON value of ``expression`` (Python, with this module imported as ``r`` after
    ``diffpg.setup()``) evaluated in a new process under ``xla_flags`` (``None``: XLA's
    defaults, whatever the caller's ``XLA_FLAGS``)."""
    code = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nimport diffpg\ndiffpg.setup()\n"
            f"import readme_numbers as r\nprint(json.dumps({expression}))\n")
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        environment["XLA_FLAGS"] = xla_flags
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                          capture_output=True, text=True, env=environment, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{expression} failed in a new process:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def final_statistics(estimator_seed: int = 0) -> dict[str, dict]:
    """The default comparison's statistics at its largest horizon (``TABLE_COLUMNS`` per
    estimator)."""
    final = _compare_results("none", estimator_seed)["results"][-1]["estimators"]
    return {label: {c: s.get(c) for c in TABLE_COLUMNS} for label, s in final.items()}


def _cell(values: list) -> str:
    """One cell over the roundings: the value where they agree to 3 digits (within 2%);
    else, for numbers, the 95% prediction interval of one more rounding's value, ``lo to hi``
    (Student t with n - 1 degrees of freedom, ``mean +- t s sqrt(1 + 1/n)``, on the logarithm
    of positive values); for verdicts, those seen, ``a / b``."""
    from scipy import stats

    from diffpg.report import format_cell

    cells = list(dict.fromkeys(format_cell(v) for v in values))
    numeric = np.array([v for v in values if isinstance(v, float)])
    if len(cells) == 1 or (len(numeric) == len(values) and np.allclose(
            numeric, numeric[0], rtol=0.02, atol=0.0)):
        return cells[0]
    if len(numeric) < len(values):
        return " / ".join(cells)
    positive = bool(np.all(numeric > 0))
    sample = np.log(numeric) if positive else numeric
    half_width = (stats.t.ppf(0.975, len(sample) - 1) * sample.std(ddof=1)
                  * np.sqrt(1 + 1 / len(sample)))
    low, high = sample.mean() - half_width, sample.mean() + half_width
    if positive:
        low, high = np.exp(low), np.exp(high)
    return f"{format_cell(float(low))} to {format_cell(float(high))}"


def _table(per_rounding: list[dict[str, dict]], per_draw: list[dict[str, dict]]) -> str:
    """The table at the largest horizon. A row the roundings agree on (to 3 digits) gives its
    values; a row they disagree on, each cell over the roundings and the other draws of the
    estimators' keys (``_cell``)."""
    lines = [TABLE_HEADER.rstrip("\n")]
    for label in per_rounding[0]:
        def over(tables, column, label=label):
            return [stats[label][column] for stats in tables]

        machine_dependent = any(" to " in _cell(over(per_rounding, column)) or " / " in _cell(
            over(per_rounding, column)) for column in TABLE_COLUMNS)
        tables = per_rounding + (per_draw if machine_dependent else [])
        cells = [_cell(over(tables, column)) for column in TABLE_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_table() -> dict[str, str]:
    """The default comparison's table under every rounding of ``ROUNDINGS`` and every draw of
    ``ESTIMATOR_SEEDS`` (one process each): what another CPU computes falls inside its ranges."""
    return {"compare-table": _table(
        [in_a_new_process("r.final_statistics()", flags) for flags in ROUNDINGS.values()],
        [in_a_new_process(f"r.final_statistics({seed})", None) for seed in ESTIMATOR_SEEDS])}


def compare_table_here() -> dict[str, str]:
    """The default comparison's table as this process computes it (what ``--check`` and the
    README's test compare with the README's ranges)."""
    return {"compare-table": _table([final_statistics()], [])}


def compare_sweep() -> dict[str, str]:
    """What the default run's horizon sweep shows."""
    results = _compare_results("horizon")
    first, last = results["results"][0], results["results"][-1]
    growth = []
    for label, stats in last["estimators"].items():
        start = first["estimators"][label].get("variance_trace")
        if start and stats.get("variance_trace"):
            growth.append(f"{label} {stats['variance_trace'] / start:.2g}-fold")
    biased = [f"{label} {stats['relative_bias']:.0%}" for label, stats
              in last["estimators"].items() if stats.get("bias_resolved")]
    unresolved = [f"{label} (detection limit {stats['relative_bias_detection_limit']:.0%})"
                  for label, stats in last["estimators"].items()
                  if stats.get("bias_resolved") is False]
    text = (f"From T = {first['horizon']} to T = {last['horizon']} the variance grows "
            + ", ".join(growth) + ". At T = " + str(last["horizon"]) + " the bias is resolved for "
            + (", ".join(biased) if biased else "none") + " (relative to the exact gradient) and "
            "not resolved for " + ", ".join(unresolved) + ".\n")
    return {"compare-sweep": text}


def _train(estimator: str, **overrides) -> dict:
    """One run at the defaults on cart-pole swing-up: first and last evaluations, the best,
    wall-clock and throughput."""
    import tempfile

    from diffpg.runs import train
    from diffpg.training import settings_for

    rows = []
    started = time.perf_counter()
    settings = settings_for(env="cartpole_swingup", estimator=estimator, **overrides)
    with tempfile.TemporaryDirectory() as folder:
        train(settings, Path(folder), on_log=rows.append)
    seconds = time.perf_counter() - started
    rewards = [row["eval/episode_reward"] for row in rows]
    return {"first": rewards[0], "first_update": rows[0]["update"], "last": rewards[-1],
            "best": max(rewards), "seconds": seconds, "sps": float(np.median(
                [row["training/sps"] for row in rows[1:]] or [rows[0]["training/sps"]])),
            "ci95": rows[-1].get("eval/episode_reward_ci95"), "steps": rows[-1]["env_steps"],
            "updates": settings.updates, "num_envs": settings.num_envs,
            "horizon": settings.horizon}


def _baseline_returns() -> tuple[float, float]:
    """Deterministic eval return of a zero-action policy and of a fresh policy (16 episodes)."""
    import jax

    from diffpg.training import make_trainer, settings_for

    trainer = make_trainer(settings_for(env="cartpole_swingup"))
    state = trainer.init_run()
    fresh = float(trainer.evaluate(state, jax.random.PRNGKey(1))["eval/episode_reward"])
    still = jax.tree.map(jax.numpy.zeros_like, state.params)  # mean action tanh(0) = 0
    still["log_std"] = state.params["log_std"]
    zero = float(trainer.evaluate(state._replace(params=still),
                                  jax.random.PRNGKey(1))["eval/episode_reward"])
    return zero, fresh


def training() -> dict[str, str]:
    zero, fresh = _baseline_returns()
    lines = ["| command | eval return: first evaluation -> last (best) | wall-clock incl. "
             "compile | training env steps/s |", "|---|---|---|---|"]
    runs = [("shac", {}), ("reinforce", {}), ("ppo", {}), ("critic_backprop", {}),
            ("shac", {"seeds": 4})]
    for estimator, overrides in runs:
        result = _train(estimator, **overrides)
        command = "diffpg train --env cartpole_swingup " + " ".join(
            [f"--{k} {v}" for k, v in overrides.items()] + [estimator])
        if result["ci95"] is not None:
            reward = f"mean {result['last']:,.0f} +- {result['ci95']:,.0f} (95% CI)"
        else:
            reward = (f"{result['first']:,.0f} (update {result['first_update']}) -> "
                      f"{result['last']:,.0f} ({result['best']:,.0f})")
        lines.append(f"| `{command}` | {reward} | {result['seconds']:.0f} s | "
                     f"{result['sps']:,.0f} |")
        print(lines[-1], flush=True)
    text = ("\n".join(lines) + "\n\nA policy that does nothing (zero action) scores "
            f"{zero:,.0f}; the fresh policy scores {fresh:,.0f} (deterministic evaluation, 16 "
            "episodes of 240 steps).\n")
    return {"training": text}


def _compare_cold_and_warm(arguments: list[str]) -> tuple[dict, dict]:
    """``diffpg compare ARGUMENTS`` timed in two fresh processes sharing a cache folder: cold
    (the folder empty), then warm (``experiments/bench_compare_compile.py``'s measurement)."""
    import tempfile

    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_compare_compile import whole_command

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        cold = whole_command(cache, Path(out) / "cold", arguments)
        warm = whole_command(cache, Path(out) / "warm", arguments)
    return cold, warm


def compare_time() -> dict[str, str]:
    """The default ``diffpg compare`` timed, cold and warm."""
    cold, warm = _compare_cold_and_warm([])
    return {"compare-time": (
        f"On a 2-core CPU the default comparison took {cold['wall_s']:.0f} s the first time "
        f"({cold['cpu_s']:.0f} s of CPU time, most of it compiling its programs) and "
        f"{warm['wall_s']:.0f} s the second time (its compiled programs kept).\n")}


ANT_COMPARISON = ["--env", "ant", "--horizon", "8", "--sweep", "none", "--num-estimates", "4",
                  "--num-envs", "4", "--reference-estimates", "32"]
"""The README's Brax example of ``diffpg compare``."""


def ant_compare_time() -> dict[str, str]:
    """The README's ant ``diffpg compare`` timed, cold and warm."""
    cold, warm = _compare_cold_and_warm(ANT_COMPARISON)
    return {"ant-compare-time": (
        f"The ant comparison (`diffpg compare {' '.join(ANT_COMPARISON)}`) took "
        f"{cold['wall_s']:.0f} s on a 2-core CPU the first time ({cold['cpu_s']:.0f} s of CPU "
        f"time, most of it compiling Brax's physics and its reverse pass) and "
        f"{warm['wall_s']:.0f} s the second time.\n")}


def suite_time() -> dict[str, str]:
    """The README's test command timed, wall-clock and CPU: ``pytest`` in a clean clone of this
    checkout's commit with an empty compilation cache (this interpreter's packages), again with
    the cache it left, then the quick tests (``-m "not slow"``) with it."""
    import resource
    import tempfile

    def timed_pytest(clone: Path, cache: Path, *options: str) -> tuple[float, float, str]:
        started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *options], cwd=clone, capture_output=True, text=True,
                              env=os.environ | {"DIFFPG_CACHE_DIR": str(cache)})
        if done.returncode:
            raise SystemExit(f"pytest {' '.join(options)} failed in {clone}:\n"
                             f"{done.stdout[-3000:]}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        return (time.perf_counter() - started) / 60, cpu_s / 60, re.search(
            r"(\d+) passed", done.stdout).group(1)

    with tempfile.TemporaryDirectory() as folder:
        clone, cache = Path(folder) / "clone", Path(folder) / "cache"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        cold, cold_cpu, passed = timed_pytest(clone, cache)
        warm, warm_cpu, _ = timed_pytest(clone, cache)
        quick, quick_cpu, quick_passed = timed_pytest(clone, cache, "-m", "not slow")
    return {"suite-time": (
        f"`pytest` runs all {passed} tests on {os.cpu_count()} cores from a clean clone in "
        f"{cold:.0f} minutes with an empty compilation cache ({cold_cpu:.0f} minutes of CPU "
        f"time) and in {warm:.0f} minutes with the cache warm ({warm_cpu:.0f} of CPU); "
        f"`pytest -m \"not slow\"` leaves out the learning, Brax and multi-process tests for a "
        f"quick loop ({quick_passed} tests, {quick:.0f} minutes warm, {quick_cpu:.0f} of CPU).\n")}


def ant() -> dict[str, str]:
    result = _train_ant()
    return {"ant": result}


def _train_ant() -> str:
    import tempfile

    from diffpg.runs import train
    from diffpg.training import settings_for

    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        train(settings_for(env="ant", estimator="shac", updates=100), Path(folder),
              on_log=rows.append)
    seconds = time.perf_counter() - started
    compile_and_first = rows[0]["training/walltime"]
    return (f"`diffpg train --env ant shac --updates 100` runs on a 2-core CPU in {seconds:.0f} s "
            f"({compile_and_first:.0f} s to the first evaluation, compilation included, then "
            f"about {np.median([r['training/sps'] for r in rows[1:]]):,.0f} env steps/s): "
            f"eval return {rows[0]['eval/episode_reward']:,.0f} after {rows[0]['update']} "
            f"updates, {rows[-1]['eval/episode_reward']:,.0f} after {rows[-1]['update']}.\n")


SECTIONS: dict[str, Callable[[], dict[str, str]]] = {
    "example": example, "compare-table": compare_table, "compare-sweep": compare_sweep,
    "compare-time": compare_time, "ant-compare-time": ant_compare_time, "training": training,
    "ant": ant, "suite-time": suite_time,
}


def numbers(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in NUMBER.findall(text)]


def differences(expected: str, found: str, rtol: float) -> list[str]:
    """Where ``found`` (computed) differs from ``expected`` (README): numbers beyond ``rtol``,
    or the words around them."""
    # (the spaces between numbers too: numpy pads a column to its widest number, which one
    # rounding in the last digit changes)
    words = [" ".join(NUMBER.sub("#", text).split()) for text in (expected, found)]
    if words[0] != words[1]:
        return [f"text differs:\nREADME:   {expected!r}\ncomputed: {found!r}"]
    problems = []
    for a, b in zip(numbers(expected), numbers(found), strict=True):
        if not np.isclose(a, b, rtol=rtol, atol=0.0):
            problems.append(f"README has {a:g}, the run gives {b:g}")
    return problems


def _cells(table: str) -> dict[str, list[str]]:
    """A markdown table's rows by their first cell: the other cells."""
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def table_differences(expected: str, found: str, rtol: float) -> list[str]:
    """Where a computed table (``found``, one rounding) falls outside the README's (``expected``):
    a number beyond ``rtol`` of the README's, or outside its ``lo to hi`` range widened by
    ``rtol``; a verdict that is none of its ``a / b``; a row or header that differs."""
    if expected.split("\n", 2)[:2] != found.split("\n", 2)[:2]:
        return ["the table's header differs"]
    rows, computed = _cells(expected), _cells(found)
    if list(rows) != list(computed):
        return [f"rows differ: README {list(rows)}, computed {list(computed)}"]
    problems = []
    for label, cells in rows.items():
        for column, written, value in zip(TABLE_COLUMNS, cells, computed[label], strict=True):
            if " to " in written:
                low, high = (float(part) for part in written.split(" to "))
                inside = low - rtol * abs(low) <= float(value) <= high + rtol * abs(high)
                problem = None if inside else f"outside {written}"
            elif " / " in written:
                problem = None if value in written.split(" / ") else f"not one of {written}"
            else:
                found_differences = differences(written, value, rtol)
                problem = found_differences[0] if found_differences else None
            if problem:
                problems.append(f"{label} {column}: {value} ({problem})")
    return problems


CHECKS: dict[str, tuple[Callable[[], dict[str, str]], Callable[[str, str, float], list[str]]]] = {
    "compare-table": (compare_table_here, table_differences),
}
"""How ``--check`` (and the README's test) checks a section, where not by recomputing it and
comparing numbers: what it computes, and how it compares that with the README's block."""


def check_section(name: str, rtol: float) -> list[str]:
    """The differences between section ``name``'s block and this process's computation."""
    compute, compare = CHECKS.get(name, (SECTIONS[name], differences))
    content = compute()[name]
    return compare(block(document_of(name).read_text(), name), content, rtol)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=None)
    parser.add_argument("--check", action="store_true",
                        help="compare with README.md instead of rewriting it; exit 1 on a "
                             "difference")
    parser.add_argument("--rtol", type=float, default=0.02,
                        help="relative tolerance of numbers for --check (the README prints 3 "
                             "significant digits)")
    arguments = parser.parse_args()
    chosen = arguments.only or list(SECTIONS)
    if arguments.check:
        problems = []
        for section in chosen:
            print(f"checking {section} ...", file=sys.stderr, flush=True)
            problems += [f"{section}: {p}" for p in check_section(section, arguments.rtol)]
        for problem in problems:
            print(problem)
        print("the documents agree with the computation" if not problems
              else f"the documents disagree in {len(problems)} place(s)")
        return 1 if problems else 0
    computed: dict[str, str] = {}
    for name in chosen:
        print(f"computing {name} ...", file=sys.stderr, flush=True)
        computed |= SECTIONS[name]()
    for section, content in computed.items():
        document = document_of(section)
        document.write_text(replace_block(document.read_text(), section, content))
        print(f"rewrote {section} in {document.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
