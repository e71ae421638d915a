"""Property: any invalid training setting given to the CLI is a one-line error, never a traceback,
and nothing is written."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
from conftest import HANG_LIMIT_S, compiles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffpg import cli, estimators

NOT_A_NUMBER = st.sampled_from(["abc", "", "1e", "--", "one"])
NON_POSITIVE_INT = st.integers(max_value=0).map(str)
NON_POSITIVE_FLOAT = st.one_of(st.floats(max_value=0.0, allow_nan=False).map(repr),
                               st.just("nan"), st.just("-inf"))
UNIT_INTERVAL_VIOLATION = st.one_of(st.floats(min_value=1.0001, max_value=1e6).map(repr),
                                    st.floats(max_value=-1e-6, min_value=-1e6).map(repr))
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)

def _one(flag: str):
    """``--flag=value`` as one argument."""
    return lambda value: [f"{flag}={value}"]


def _option(flags, values):
    return st.tuples(st.sampled_from(flags), values).map(lambda pair: [f"{pair[0]}={pair[1]}"])


INVALID = st.one_of(
    _option(["--num-envs", "--updates", "--updates-per-call", "--eval-envs", "--seeds",
             "--max-consecutive-nonfinite", "--episode-length", "--epochs", "--minibatches",
             "--horizon"],
            st.one_of(NON_POSITIVE_INT, NOT_A_NUMBER, st.just("1.5"), st.just(str(2**31)))),
    _option(["--learning-rate", "--grad-clip"],
            st.one_of(NON_POSITIVE_FLOAT, NOT_A_NUMBER, st.just("inf"))),
    _option(["--discount"], st.one_of(UNIT_INTERVAL_VIOLATION, st.just("nan"))),
    _option(["--final-learning-rate"], st.sampled_from(["1.0", "-0.1", "nan", "inf"])),
    _option(["--init-log-std"], st.sampled_from(["nan", "inf", "-inf", "x", "100", "-100"])),
    _option(["--learning-rate", "--grad-clip"], st.sampled_from(["1e39", "3.5e38"])),
    _option(["--seed"], st.sampled_from(["x", "1.5", str(2**63), str(-(2**63) - 1)])),
    st.sampled_from([["--betas", "1.5", "0.9"], ["--betas", "0.9"], ["--betas", "0.9", "-1"],
                     ["--betas", "a", "b"], ["--betas", "nan", "0.9"],
                     ["--betas", "0.5", "0.99999999999"]]),
    st.sampled_from([["--hidden-sizes", "0"], ["--hidden-sizes", "-4"],
                     ["--hidden-sizes", "64", "0"], ["--hidden-sizes", "x"]]),
    st.sampled_from([["--env-options", "bogus=1"], ["--env-options", "max_torque=-1"],
                     ["--env-options", "dt"], ["--env-options", "episode_length=3"],
                     ["--env-options", "backend=spring"],
                     ["--env-options", "health_shaping=1.0"]]),
    # numbers float32 turns into inf or 0: the precision every run computes in
    _option(["--env-options"], st.sampled_from(["max_torque=1e39", "dt=1e-46", "dt=-3.5e38",
                                                "max_torque=(1.0,1e39)"])),
    _option(["--learning-rate", "--final-learning-rate", "--grad-clip", "--health-tolerance"],
            st.sampled_from(["1e-46", "1e-39"])),
    _option(["--health-shaping"], st.sampled_from(["1e39", "1e-46", "-1", "nan"])),
    # in [0, 1] but 0 on the device (XLA flushes float32's subnormal numbers)
    _option(["--discount"], st.sampled_from(["1e-40", "1e-45"])),
    st.sampled_from([["shac", "--td-lambda", "1e-40"], ["shac", "--target-critic-keep", "1e-40"]]),
    NAME.filter(lambda n: n not in _known_envs()).map(_one("--env")),
    NAME.filter(lambda n: n not in _known_estimators() and n != "h").map(lambda n: [n]),
    st.one_of(NAME, st.just("spring")).map(_one("--backend")),  # the env is analytic
    st.sampled_from([["shac", "--nonsense", "1"], ["reinforce", "--baseline", "bogus"],
                     ["shac", "--window", "7"], ["shac", "--discount", "2"],
                     ["ppo", "--clip-ratio", "nan"], ["ppo", "--gae-lambda", "1.5"],
                     ["critic_backprop", "--critic-betas", "1", "1"],
                     ["critic_backprop", "--replay-batch-size", str(10**9)],
                     ["critic_backprop", "--replay-capacity", "64", "--replay-batch-size", "65"],
                     ["ppo", "--epochs", "0"], ["bptt", "--epochs", "2"]]),
    st.sampled_from(["0", "-1", "4096", "x"]).map(_one("--devices")),
)


def _known_envs():
    from diffpg import envs

    return envs.names()


def _known_estimators():
    from diffpg import estimators

    return estimators.names()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(invalid=INVALID)
def test_invalid_training_settings_are_clean_errors(invalid, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "never"
    # A setting that slipped through would train 2 updates only (and fail below).
    _assert_refused_cleanly(["train", "--env", "pendulum", "--updates", "2",
                             "--updates-per-call", "2", "--out", str(out), *invalid], out)


def _assert_refused_cleanly(arguments: list[str], out) -> str:
    """The command exits with status 2 and one line of error, having compiled and written
    nothing; returns the line."""
    stderr = io.StringIO()
    with (compiles() as compiled, contextlib.redirect_stderr(stderr),
          contextlib.redirect_stdout(io.StringIO())):
        try:
            status = cli.main(arguments)
        except SystemExit as exit_info:  # argparse rejects what it cannot convert
            status = exit_info.code
    message = stderr.getvalue()
    assert status == 2, (arguments, message)
    assert "Traceback" not in message and "error" in message, message
    assert len(message.strip().splitlines()) == 1, message
    assert compiled == [], f"{arguments}: compiled before the error"
    assert not out.exists()
    return message


INVALID_COMPARE = st.one_of(
    _option(["--num-estimates", "--num-envs", "--horizon", "--reference-estimates",
             "--devices", "--batch-budget"],
            st.one_of(NON_POSITIVE_INT, NOT_A_NUMBER, st.just("1.5"))),
    _option(["--discount"], st.one_of(UNIT_INTERVAL_VIOLATION, st.just("nan"))),
    _option(["--critic-warmup"], st.sampled_from(["-1", "x", "1.5", str(2**31)])),
    _option(["--seed"], st.sampled_from(["x", str(2**63), str(-(2**63) - 1)])),
    _option(["--sweep"], NAME.filter(lambda n: n not in ("horizon", "none", "batch", "stiffness"))),
    NAME.filter(lambda n: n not in _known_envs()).map(_one("--env")),
    NAME.filter(lambda n: n not in _known_estimators()).map(lambda n: ["--estimators", n]),
    st.sampled_from([["--estimators", "bptt:horizon=2"], ["--estimators", "shac:window=3"],
                     ["--estimators", "reinforce:baseline=bogus"], ["--reference", "exact"],
                     ["--estimators", "shac:critic_learning_rate=1e-46"],
                     ["--estimators", "reinforce:discount=1e39"],
                     ["--env-options", "dt=1e-46"], ["--env-options", "max_torque=1e39"],
                     ["--reference", "nope"], ["--hidden-sizes", "0"],
                     ["--env-options", "episode_length=3"], ["--env-options", "bogus=1"],
                     ["--sweep", "stiffness"], ["--sweep", "batch", "--batch-budget", "1"],
                     ["--policy-checkpoint", "/nonexistent/run"], ["--horizon", "5000"],
                     # more than this machine's memory: the states of one estimate, the samples
                     ["--num-envs", str(10**9)], ["--num-estimates", str(2 * 10**9)],
                     ["--reference-estimates", str(2 * 10**9)], ["--reference-estimates", "1"]]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(invalid=INVALID_COMPARE)
def test_invalid_comparison_settings_are_clean_errors(invalid, tmp_path_factory):
    """The same property for ``diffpg compare``: exit status 2, one line, nothing compiled,
    nothing written."""
    from diffpg.compare import CompareSettings

    CompareSettings()  # the command line's defaults (building the LQR compiles a little, once)
    out = tmp_path_factory.mktemp("compare") / "never"
    _assert_refused_cleanly(["compare", "--env", "pendulum", "--estimators", "bptt", "--sweep",
                             "none", "--horizon", "4", "--out", str(out), *invalid], out)


@pytest.mark.parametrize("estimator", [["shac", "--critic-minibatches", "64"],
                                       ["reinforce", "--baseline", "leave_one_out"], ["ivw"]])
def test_a_training_setting_refused_where_the_update_is_traced_is_one_line_and_no_folder(
        estimator, tmp_path):
    """Refused as the update program is traced (after the folder, settings.json, the events,
    the header and the progress bar): 4 lines and a folder that the corrected command then
    refused to write into. Now traced before anything is written or said."""
    out = tmp_path / "never"
    num_envs = "8" if estimator[0] == "shac" else "1"
    _assert_refused_cleanly(["train", "--env", "pendulum", "--horizon", "4", "--updates", "2",
                             "--updates-per-call", "2", "--eval-envs", "2", "--num-envs",
                             num_envs, "--out", str(out), *estimator], out)


def test_hidden_sizes_on_an_env_whose_policy_is_linear_are_refused(tmp_path, capsys):
    """The LQR's comparison policy is linear (its exact gradient needs one): --hidden-sizes was
    recorded in results.json and ignored; it is refused in one line naming it."""
    out = tmp_path / "never"
    line = _assert_refused_cleanly(["compare", "--env", "lqr", "--hidden-sizes", "7", "7",
                                    "--out", str(out)], out)
    assert "hidden_sizes=(7, 7): on env='lqr' the policy is linear" in line, line


@pytest.mark.parametrize("arguments", [
    ["eval"], ["eval", "/nonexistent/run"], ["eval", "."], ["video", "/nonexistent/run"],
    ["eval", "/nonexistent/run", "--episodes", "0"], ["video", "/nonexistent/run", "--every", "0"],
    ["video", "/nonexistent/run", "--every", "99999999999"],
    ["nonsense"], ["--import"], ["train", "--resume", "/nonexistent/run"],
    ["--import", "", "train"], ["--import=.relative", "train"],
    ["train", "--estimator", "ppo"],
])
def test_bad_input_to_every_command_is_one_line(arguments, capsys):
    status = cli.main(arguments)
    error = capsys.readouterr().err
    assert status == 2, (arguments, error)
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error


@pytest.mark.parametrize("invalid", [
    ["--episode-length", str(2**31)], ["--updates", str(2**31)], ["--num-envs", str(2**31)],
    ["shac", "--critic-iterations", str(2**31)]])
def test_integers_beyond_int32_are_refused_before_compiling(invalid, tmp_path):
    """``--episode-length 2147483648`` overflowed JAX's int32 after compiling, having written the
    run folder: every integer setting is checked in the precision the run counts in."""
    out = tmp_path / "never"
    _assert_refused_cleanly(["train", "--env", "pendulum", "--updates", "2",
                             "--updates-per-call", "2", "--out", str(out), *invalid], out)


@pytest.mark.parametrize("invalid", [
    ["--env-options", "max_torque=1e39"], ["--env-options", "dt=1e-46"],
    ["--health-shaping", "1e39"], ["--learning-rate", "1e-46"],
    ["shac", "--critic-learning-rate", "1e-46"]])
def test_numbers_that_float32_turns_into_inf_or_zero_are_refused(invalid, tmp_path):
    """``max_torque=1e39`` trained with every update non-finite and ``dt=1e-46`` a frozen
    pendulum: every number is checked in the precision the run uses."""
    out = tmp_path / "never"
    _assert_refused_cleanly(["train", "--env", "pendulum", "--updates", "2",
                             "--updates-per-call", "2", "--out", str(out), *invalid], out)


def test_an_estimator_option_before_the_estimator_s_name_is_read_as_the_help_says():
    """``--window 8 shac``: options go anywhere around the estimator's name; a name given as
    another option's value (``--out shac``) is left where it is."""
    from diffpg.command_line import parse_train_command

    for argv in (["--env", "pendulum", "--window", "8", "shac", "--horizon", "16"],
                 ["--env", "pendulum", "--window=8", "--out", "shac", "shac", "--horizon", "16"]):
        settings, out, *_ = parse_train_command(argv)
        assert settings.estimator == "shac" and settings.resolved_estimator_settings.window == 8
    assert str(out) == "shac"


def test_diffpg_train_reads_its_command_line_once_with_the_defaults_of_what_it_names(
        monkeypatch):
    """The env, the estimator word, --sizes and --resume are found before the one tyro
    reading (which used to be preceded by a whole reading into unchecked copies of every
    settings class): an option's values are skipped as tyro reads them, wherever the
    estimator's name stands, and the defaults are the configuration of what the line names."""
    import tyro

    from diffpg import command_line
    from diffpg.training import settings_for

    readings = []
    original = tyro.cli
    monkeypatch.setattr(tyro, "cli", lambda *a, **k: readings.append(a) or original(*a, **k))
    cases = [
        (["--env", "hopper", "--hidden-sizes", "8", "8", "ahac", "--updates", "50"],
         "hopper", "ahac", "cpu"),
        (["ahac", "--env=hopper", "--out", "shac"], "hopper", "ahac", "cpu"),
        (["--out", "ahac", "--env", "hopper", "--sizes", "gpu"], "hopper", "shac", "gpu"),
        (["--env-options", "dt=0.02", "--env", "pendulum", "--no-overwrite"], "pendulum",
         "shac", "cpu"),
    ]
    for argv, env, estimator, sizes in cases:
        readings.clear()
        settings, *_ = command_line.parse_train_command(argv)
        assert len(readings) == 1, argv
        configured = settings_for(env, estimator, sizes=sizes)
        assert (settings.env, settings.estimator, settings.num_envs) == (
            env, estimator, configured.num_envs), argv


def test_the_old_estimator_option_gets_a_hint(capsys):
    assert cli.main(["train", "--env", "pendulum", "--estimator", "ppo"]) == 2
    assert "the estimator is now a word of its own" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "hint"), [
    (["train", "--env", "pendulum", "shac", "--windw", "8"], "(did you mean --window?)"),
    (["train", "--env", "pendulum", "--nmu-envs", "8"], "(did you mean --num-envs?)"),
    (["compare", "--num-estimate", "3"], "(did you mean --num-estimates?)"),
    (["train", "--env", "pendulum", "--updates", "20"], "--updates-per-call set to a divisor"),
    (["train", "--env", "pendulum", "shac", "--window", "4", "--env", "lqr"],
     "--env is given twice, before and after the estimator's name 'shac'; give it once"),
    (["train", "--env", "pendulum", "--horizon", "8", "shac", "--horizon=4"],
     "--horizon is given twice, before and after the estimator's name 'shac'; give it once"),
    (["train", "--env", "pendulum", "--horizon", "4", "--env=lqr"],
     "--env is given twice; give it once"),
    (["train", "--env", "pendulum", "--horizon", "4", "--horizon", "8"],
     "--horizon is given twice; give it once"),
    (["train", "--env", "pendulum", "shac", "--window", "4", "--window=8"],
     "--window is given twice; give it once"),
    (["eval", "RUN", "--episodes", "2", "--episodes", "3"], "--episodes is given twice"),
    (["train", "--env", "pendulum", "--num_envs", "8", "--num-envs", "16"],
     "--num_envs and --num-envs are one option given twice; give it once"),
    (["train", "--env", "pendulum", "--layer-norm", "--no-layer-norm"],
     "--layer-norm and --no-layer-norm are one option given twice"),
    (["compare", "--overwrite", "--no-overwrite"], "are one option given twice"),
    # counts whose per-pass keys and losses, or int32 step count, are beyond any device
    (["train", "--env", "pendulum", "shac", "--critic-iterations", "2147483647"],
     "critic_iterations=2147483647 must be an integer in 1..16,777,216"),
    (["train", "--env", "pendulum", "--updates", "2", "--updates-per-call", "2", "ppo",
      "--epochs", "1073741824"], "optimiser steps is above 2,147,483,647"),
    (["compare", "--estimators", "shac", "--critic-warmup", "2000000000"],
     "critic_warmup=2000000000 must be an integer in 0..16,777,216"),
    (["compare", "--estimators", "shac:critic_iterations=2000000000"],
     "critic_iterations=2000000000 must be an integer in 1..16,777,216"),
    (["train", "--env", "pendulum", "--env-options", "max_torque=1", "max_torque=2"],
     "env_options: max_torque is given twice (max_torque=1 and max_torque=2); give it once"),
    (["compare", "--estimators", "shac:window=2", "reinforce", "shac:window=2"],
     "estimators: shac:window=2 is given twice"),
    (["train", "--env", "pendulum", "shack"], "unrecognized arguments: shack (did you mean shac?)"),
    (["train", "--", "--num-envs", "8"], "'--' ends the options"),
    # an empty path reads as '.': the working folder, silently
    (["eval", ""], "run_dir='' is an empty path"),
    (["train", "--env", "pendulum", "--out", ""], "out='' is an empty path"),
    (["compare", "--out="], "out='' is an empty path"),
    (["video", "RUN", "--out", ".gif"], "out='.gif' needs a name before .gif"),
    (["train", "--env", "pendulum", "shac", "--baseline", "none"],
     "(--baseline is a setting of reinforce, ppo, alpha_order, ivw: give it after one of their"),
    (["compare", "--baseline", "none"], "give it in --estimators as NAME:baseline=VALUE)"),
    (["compare", "--estimator", "bptt"], "(did you mean --estimators?)"),
    (["train", "--env", "pendulum", "--env-options", "max_torque=-+inf"], "max_torque"),
    (["train", "--env", "lqr", "--horizon", "40"],
     "horizon=40 is longer than the episode (episode_length=20)"),
    (["--import", "no/such_file.py", "train"], "--import no/such_file.py: needs a module's name, "
     "not a file's path; from the file's folder (or with it on PYTHONPATH): --import such_file"),
])
def test_a_misspelt_option_or_a_near_miss_gets_a_hint(arguments, hint, capsys):
    assert cli.main(arguments) == 2
    error = capsys.readouterr().err
    assert hint in error and len(error.strip().splitlines()) == 1, error


def test_an_option_near_no_other_gets_no_guess(capsys):
    """``--buffer-size`` was answered "did you mean --sizes?" (a guess any option would get)."""
    assert cli.main(["train", "--env", "pendulum", "critic_backprop", "--buffer-size", "5"]) == 2
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: --buffer-size 5")


def test_an_imported_module_that_does_not_parse_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_estimator.py").write_text("x = (\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert cli.main(["--import", "broken_estimator", "train"]) == 2
    error = capsys.readouterr().err
    assert error.strip() == (f"diffpg: error: --import broken_estimator: '(' was never closed "
                             f"({tmp_path / 'broken_estimator.py'}, line 1)"), error


def test_an_imported_module_s_own_error_is_its_traceback_not_a_bad_setting(tmp_path,
                                                                          monkeypatch, capsys):
    """A module that raises ``ValueError`` as it is imported was reported as a bad setting
    (``--import m: boom``, exit 2): the user's code's error is a traceback, exit 1, as every
    exception of user code (docs/guarantees.md)."""
    (tmp_path / "raising_module.py").write_text("raise ValueError('boom')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert cli.main(["--import", "raising_module", "train"]) == 1
    error = capsys.readouterr().err
    assert "Traceback" in error and "ValueError: boom" in error, error


@pytest.mark.parametrize("code", [0, 1, None])
def test_an_imported_module_that_exits_is_one_line_not_a_silent_exit(tmp_path, monkeypatch,
                                                                     capsys, code):
    """A script's ``sys.exit(0)`` at import ended ``diffpg`` with status 0 and no output."""
    (tmp_path / "exiting_module.py").write_text(f"import sys\nsys.exit({code})\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert cli.main(["--import", "exiting_module", "train"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"diffpg: error: --import exiting_module: the module exits when imported "
                     f"(sys.exit({code!r})); import a module that only defines and registers")


def test_no_command_is_the_usage_on_error_output(capsys):
    assert cli.main([]) == 2
    written = capsys.readouterr()
    assert written.out == "" and written.err.startswith("usage: diffpg")
    assert cli.main(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: diffpg")


def test_a_closed_standard_output_is_refused_before_any_work():
    """``diffpg ... >&-``: Python's ``sys.stdout`` is None and every print would vanish."""
    import subprocess

    finished = subprocess.run(["bash", "-c", 'exec "$0" -m diffpg.cli --version >&-',
                               sys.executable], capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert finished.returncode == 2
    assert finished.stderr.strip() == ("diffpg: error: standard output is closed, so the "
                                       "command's results would be lost; send it to a file or "
                                       "a terminal (> FILE)")


@pytest.mark.parametrize("variable, value, reason", [
    ("XLA_FLAGS", "--xla_no_such_flag=1", "Unknown flag in XLA_FLAGS: --xla_no_such_flag=1"),
    ("XLA_FLAGS", "--xla_force_host_platform_device_count=abc",
     "Couldn't interpret value abc for flag xla_force_host_platform_device_count."),
    ("JAX_PLATFORMS", "nonexistent", "Unable to initialize backend 'nonexistent'")])
def test_a_backend_setting_that_xla_refuses_is_one_line_not_an_abort(variable, value, reason,
                                                                    tmp_path):
    """XLA aborts a process whose XLA_FLAGS it does not know, with a C++ fatal log line (and a
    value it cannot read, with its whole flag list); JAX raises mid-command on a JAX_PLATFORMS
    this machine lacks. Each is one line naming the variable and XLA's own reason."""
    import os
    import subprocess

    environment = os.environ | {variable: value, "DIFFPG_CACHE_DIR": str(tmp_path)}
    finished = subprocess.run([sys.executable, "-m", "diffpg.cli", "train", "--env", "pendulum"],
                              capture_output=True, text=True, timeout=HANG_LIMIT_S, env=environment,
                              cwd=tmp_path)
    assert finished.returncode == 2
    (line,) = finished.stderr.strip().splitlines()
    assert line.startswith(f"diffpg train: error: {variable}={value!r} ") and reason in line, line
    assert not (tmp_path / "runs").exists()
    if variable == "XLA_FLAGS":  # a value refused is not remembered as one that passed
        assert not list(tmp_path.glob("xla-flags-ok-*"))


def test_version(capsys):
    import diffpg

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"diffpg {diffpg.__version__}\n"


@pytest.mark.parametrize("command", ["compare", "train", "eval", "video"]
                         + [f"train {name}" for name in estimators.names()])
def test_every_command_s_help_is_plain_text_with_one_default_per_option(command, capsys,
                                                                         monkeypatch):
    """--help shows no reST markup, an option whose None default means something says what
    (not "(default: None)" beside it), and --sweep names every sweep."""
    from diffpg.comparison_settings import SWEEPS

    monkeypatch.setenv("COLUMNS", "250")
    assert cli.main([*command.split(), "--help"]) == 0
    text = capsys.readouterr().out
    assert "``" not in text
    lines = [line for line in text.splitlines() if "(default: None)" in line]
    assert not [line for line in lines if line.count("(default:") > 1], lines
    if command == "compare":
        sweep = text.split("--sweep", 1)[1].split("\n│ --", 1)[0]
        assert all(f"{name}:" in sweep or name == "none" for name in SWEEPS), sweep


@pytest.mark.parametrize("command", ["", "train", "train shac", "compare", "eval", "video"])
def test_every_line_of_the_help_fits_the_terminal(command, capsys, monkeypatch):
    """The usage line, the description and the boxes fit the terminal from 60 to 100 columns,
    80 in a narrower one (COLUMNS=20 gave tyro's 167-column usage line and 128-column
    description; 70 the 78-column list of estimators), 100 in a wider one; the description's
    words are all there, in order."""
    from diffpg import cli as command_line_interface

    widths = {}
    for columns, width in (("20", 80), ("60", 60), ("70", 70), ("80", 80), ("250", 100)):
        monkeypatch.setenv("COLUMNS", columns)
        assert command_line_interface.main([*command.split(), "--help"]) == 0
        text = capsys.readouterr().out
        widths[columns] = max(len(line) for line in text.splitlines())
        assert widths[columns] <= width, (columns, text)
    assert widths["250"] > 80  # (wide terminals get the room)
    if command == "train":
        assert ("into --out. The estimator is a subcommand with its own settings, e.g. `diffpg "
                "train --env hopper shac --window 16`;") in " ".join(text.split())


def test_a_run_folder_whose_name_starts_with_a_dash_is_printed_and_named_as_a_path(
        tmp_path, monkeypatch, capsys):
    """``--out ./-run`` was printed as ``-run``, which eval then read as an option ("run_dir
    needs 1 value(s)"), and ``eval -- -run`` was refused with advice that gave the first error
    again: the folder is printed ``./-run``, and the errors say how to write it."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--env", "pendulum", "--horizon", "4", "--num-envs", "4",
                     "--updates", "2", "--updates-per-call", "2", "--eval-envs", "2",
                     "--hidden-sizes", "8", "--out", "./-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("run folder: ./-run")
    for command in (["eval", "-run"], ["eval", "--", "-run"], ["video", "-run"]):
        assert cli.main(command) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "./-" in error, error
    assert cli.main(["eval", "./-run"]) == 0


def test_a_literal_too_deep_to_parse_is_kept_as_text():
    """An option value Python's parser cannot hold (thousands of nested operators) is text, so
    its setting's own check names it (not a RecursionError)."""
    from diffpg.options import parse_value

    deep = "-" * 3000 + "1"
    assert parse_value(deep) == deep


def test_a_narrow_terminal_s_help_and_a_closed_error_output_still_work(tmp_path):
    """COLUMNS=5 (where tyro's help layout would loop forever) or 0 prints the 80-column help; a
    run started with its error output closed (2>&-) trains and prints its result line."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "diffpg.cli"]
    wide = subprocess.run([*command, "eval", "--help"], capture_output=True, text=True,
                          timeout=300, env=os.environ | {"COLUMNS": "80"})
    for columns in ("5", "0"):  # (COLUMNS=0 printed train's help in 7,948 lines)
        done = subprocess.run([*command, "eval", "--help"], capture_output=True, text=True,
                              timeout=300, env=os.environ | {"COLUMNS": columns})
        assert done.returncode == 0 and done.stdout == wide.stdout
    run = tmp_path / "run"
    closed_error_output = ["sh", "-c", 'exec "$@" 2>&-', "sh"]
    done = subprocess.run([*closed_error_output, *command, "train", "--env", "pendulum",
                           "--horizon", "4", "--num-envs", "4", "--updates", "2",
                           "--updates-per-call", "2", "--eval-envs", "2", "--hidden-sizes", "8",
                           "--out", str(run)], stdout=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stdout
    assert "Traceback" not in done.stdout and "run folder" in done.stdout
    assert (run / "checkpoints").is_dir()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's always-full /dev/full")
def test_a_full_output_device_neither_stops_a_run_nor_hides_that_its_output_was_lost(tmp_path):
    """``2> /dev/full`` (a full disk under the progress output) stopped ``train`` at its first
    progress line, leaving settings.json only: the run trains and prints its result line.
    ``> /dev/full`` was reported as a full disk, with no word of which file: one line names
    standard output, exit 2."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "diffpg.cli"]
    for asked, name in ((["--version"], "diffpg"), (["train", "--help"], "diffpg train")):
        with open("/dev/full", "w") as full:  # (a command's help was lost silently, status 0)
            done = subprocess.run([*command, *asked], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"{name}: error: standard output could not be written "
                                      "(no space left"), done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
    run = tmp_path / "run"
    with open("/dev/full", "w") as full:
        done = subprocess.run([*command, "train", "--env", "pendulum", "--horizon", "4",
                               "--num-envs", "4", "--updates", "2", "--updates-per-call", "2",
                               "--eval-envs", "2", "--hidden-sizes", "8", "--out", str(run)],
                              stdout=subprocess.PIPE, stderr=full, text=True, timeout=600)
    assert done.returncode == 0, done.stdout
    assert "run folder" in done.stdout
    assert (run / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("invalid", [
    ["--estimators", "shac:critic=maybe"], ["--estimators", "reinforce:reward_to_go=no"],
    ["--estimators", "critic_backprop:deterministic=0"]])
def test_a_boolean_setting_given_a_word_is_refused_not_read_as_true(invalid, tmp_path):
    """``shac:critic=maybe`` compared as if ``critic=True`` (any non-empty string is true):
    every setting declared ``bool`` holds a bool; ``true``/``false`` in any case are the bools
    the error asks for."""
    from diffpg.options import parse_value

    assert parse_value("false") is False and parse_value("TRUE") is True
    assert parse_value("False") is False and parse_value("no") == "no"
    out = tmp_path / "never"
    _assert_refused_cleanly(["compare", "--env", "pendulum", "--sweep", "none", "--horizon", "4",
                             "--out", str(out), *invalid], out)


@pytest.mark.parametrize("reference, named", [
    ("bogus", "reference='bogus' is neither auto, exact nor a known estimator"),
    ("reinforce:bogus=1", "reference='reinforce:bogus=1': estimator 'reinforce' has no"),
    ("shac", "reference='shac' learns a critic or a buffer"),
    ("critic_backprop", "reference='critic_backprop' learns a critic or a buffer")])
def test_a_reference_that_is_no_estimator_or_learns_is_refused_naming_reference(
        reference, named, tmp_path):
    """``--reference bogus`` was refused as ``estimator='bogus'``, a setting compare does not
    have; ``--reference shac`` was accepted, and its reference averaged a critic at its initial
    values (the reference is estimated with no warm-up): a biased reference."""
    out = tmp_path / "never"
    assert named in _assert_refused_cleanly(["compare", "--env", "pendulum", "--sweep", "none",
                                             "--horizon", "4", "--out", str(out),
                                             "--reference", reference], out)


@pytest.mark.parametrize("invalid", [
    ["--estimators", "reinforce:gae_lambda=nan"], ["--estimators", "shac:td_lambda=NaN"],
    ["--estimators", "critic_backprop:target_critic_keep=inf"],
    ["--estimators", "sapo:target_entropy=-inf"], ["--estimators", "sapo:target_entropy=abc"],
    ["--reference", "reinforce:gae_lambda=nan"],
    ["--env", "contact", "--sweep", "stiffness", "--stiffnesses"]])
def test_a_spec_s_nan_or_inf_and_an_empty_sweep_are_one_line(invalid, tmp_path):
    """``reinforce:gae_lambda=nan`` reached the interval check as the text "nan" (a TypeError,
    exit 1); ``--stiffnesses`` with no value, an IndexError after building the envs."""
    out = tmp_path / "never"
    _assert_refused_cleanly(["compare", "--env", "pendulum", "--estimators", "bptt", "--sweep",
                             "none", "--horizon", "4", "--out", str(out), *invalid], out)


def test_a_settings_json_boolean_that_is_a_word_is_refused(tmp_path, capsys):
    """A run folder whose settings.json says ``"normalize_observations": "no"`` (or an estimator
    setting ``"critic": "no"``) evaluated as if true: now one line naming the setting."""
    import json

    run = tmp_path / "run"
    assert cli.main(["train", "--env", "pendulum", "--num-envs", "4", "--eval-envs", "2",
                     "--hidden-sizes", "8", "--updates", "2", "--updates-per-call", "2", "--out",
                     str(run), "shac", "--horizon", "4"]) == 0
    original = json.loads((run / "settings.json").read_text())
    for edit, name in [({"normalize_observations": "no"}, "normalize_observations"),
                       ({"estimator_settings": original["estimator_settings"] | {"critic": "no"}},
                        "critic")]:
        (run / "settings.json").write_text(json.dumps(original | edit))
        capsys.readouterr()
        assert cli.main(["eval", str(run), "--episodes", "2"]) == 2
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and f"{name}='no' must be true or false" \
            in error, error


def test_progress_frames_to_a_file_become_a_line_a_minute_and_the_last_one(monkeypatch):
    """Into a file (``2> log``) a progress bar wrote every redrawn frame (``\\r`` + the bar, the
    last one three times): now the first, one a minute, and the last frame as lines, and the
    bar's closing newline adds no blank line; a terminal gets the frames as they are."""
    now = [0.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    output = cli.GuardedOutput(log, stops_on_broken_pipe=False)
    for seconds, text in [(0, "\rtrain:   0%|    | 0/4"), (1, "\rtrain:  25%|#   | 1/4"),
                          (70, "\rtrain:  50%|##  | 2/4"), (71, "\rtrain: 100%|####| 4/4  "),
                          (71, "\rtrain: 100%|####| 4/4"), (71, "\n"),
                          (72, "4 updates\n"), (72, "\n")]:
        now[0] = seconds
        output.write(text)
    assert log.getvalue() == ("train:   0%|    | 0/4\ntrain:  50%|##  | 2/4\n"
                              "train: 100%|####| 4/4\n4 updates\n\n")
    assert not output.mid_line

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    output = cli.GuardedOutput(terminal, stops_on_broken_pipe=False)
    output.write("\rtrain:  25%|#   | 1/4")
    assert terminal.getvalue() == "\rtrain:  25%|#   | 1/4" and output.mid_line


def test_a_guarded_output_keeps_its_first_failure_drops_the_rest_and_knows_its_line():
    """``diffpg.cli.GuardedOutput``: a failed write (a full device) is kept, not raised, and
    later output is dropped; a reader gone away (a broken pipe) still stops a command on
    standard output; ``mid_line`` says whether a progress bar is left mid-line (the line of an
    interruption starts on a fresh line, with no blank line where no bar was drawn)."""
    import errno

    class Failing(io.StringIO):
        def __init__(self, error: OSError) -> None:
            super().__init__()
            self.error = error

        def write(self, text: str) -> int:
            if "fail" in text:
                raise self.error
            return super().write(text)

    full = Failing(OSError(errno.ENOSPC, "No space left on device"))
    output = cli.GuardedOutput(full, stops_on_broken_pipe=True)
    output.write("train:  50%|#####     | 1/2")
    assert output.mid_line and output.failure is None
    output.write("done\n")
    assert not output.mid_line
    assert output.write("fail here\n") == len("fail here\n") and output.failure.errno == \
        errno.ENOSPC
    output.write("dropped\n")
    assert full.getvalue() == "train:  50%|#####     | 1/2done\n"
    line = cli.lost_output_line("train", output)
    assert line.startswith("diffpg train: error: standard output could not be written (no "
                           "space left")
    assert cli.lost_output_line("train", io.StringIO()) is None
    with pytest.raises(BrokenPipeError):
        cli.GuardedOutput(Failing(BrokenPipeError()), stops_on_broken_pipe=True).write("fail")
    error_output = cli.GuardedOutput(Failing(BrokenPipeError()), stops_on_broken_pipe=False)
    error_output.write("fail")
    assert isinstance(error_output.failure, BrokenPipeError)


def test_a_tuple_setting_can_be_written_in_an_estimator_spec():
    """``shac:critic_hidden_sizes=8,8`` split at the comma, and ``=8`` is not a tuple: a tuple
    setting could not be written in a spec at all. Brackets now hold a tuple's commas."""
    from diffpg.comparison_settings import CompareSettings
    from diffpg.options import parse_spec

    assert parse_spec("shac:critic_hidden_sizes=(8,8),window=2") == (
        "shac", {"critic_hidden_sizes": (8, 8), "window": 2})
    assert parse_spec("shac:window=2,,critic_betas=(0.5, 0.9)") == (
        "shac", {"window": 2, "critic_betas": (0.5, 0.9)})
    settings = CompareSettings(env="pendulum", sweep="none", horizon=4,
                               estimators=("shac:critic_hidden_sizes=(8,8)",))
    assert dict(settings.specs[0].overrides) == {"critic_hidden_sizes": (8, 8)}


def test_env_options_that_are_one_text_instead_of_a_list_are_named_as_such():
    """A settings.json holding ``"env_options": "velocity_cost=1"`` was read letter by letter
    (``'v' must be written key=value``)."""
    from diffpg.envs.core import SettingError

    from diffpg.training import settings_for

    with pytest.raises(SettingError, match="must be a list of 'key=value' texts"):
        settings_for(env="pendulum", env_options="velocity_cost=1")
