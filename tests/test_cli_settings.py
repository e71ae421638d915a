"""Property: any invalid training setting given to the CLI is a one-line error, never a traceback,
and nothing is written."""

from __future__ import annotations

import contextlib
import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffpg import cli

NOT_A_NUMBER = st.sampled_from(["abc", "", "1e", "--", "one"])
NON_POSITIVE_INT = st.integers(max_value=0).map(str)
NON_POSITIVE_FLOAT = st.one_of(st.floats(max_value=0.0, allow_nan=False).map(repr),
                               st.just("nan"), st.just("-inf"))
UNIT_INTERVAL_VIOLATION = st.one_of(st.floats(min_value=1.0001, max_value=1e6).map(repr),
                                    st.floats(max_value=-1e-6, min_value=-1e6).map(repr))
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)

INVALID = st.one_of(
    st.tuples(st.sampled_from(["--num-envs", "--horizon", "--updates", "--updates-per-call",
                               "--eval-envs", "--seeds", "--max-consecutive-nonfinite",
                               "--episode-length"]),
              st.one_of(NON_POSITIVE_INT, NOT_A_NUMBER, st.just("1.5"))),
    st.tuples(st.sampled_from(["--learning-rate", "--grad-clip"]),
              st.one_of(NON_POSITIVE_FLOAT, NOT_A_NUMBER)),
    st.tuples(st.just("--discount"), UNIT_INTERVAL_VIOLATION),
    st.tuples(st.just("--final-learning-rate"), st.sampled_from(["1.0", "-0.1", "nan"])),
    st.tuples(st.just("--betas"), st.sampled_from(["1.5,0.9", "0.9", "0.9,-1", "a,b"])),
    st.tuples(st.just("--hidden-sizes"), st.sampled_from(["0", "-4", "64,0", "x"])),
    st.tuples(st.just("--env"), NAME.filter(lambda n: n not in _known_envs())),
    st.tuples(st.just("--estimator"), NAME.filter(lambda n: n not in _known_estimators())),
    st.tuples(st.just("--backend"), st.one_of(NAME, st.just("spring"))),  # env is analytic
    st.tuples(st.just("--estimator-options"), st.sampled_from(
        ["nonsense=1", "baseline=bogus", "window", "discount=2"])),
    st.tuples(st.just("--env-options"), st.sampled_from(["bogus=1", "max_torque=-1", "dt"])),
    st.tuples(st.just("--devices"), st.sampled_from(["0", "-1", "4096", "x"])),
)


def _known_envs():
    import envs

    return envs.names()


def _known_estimators():
    from diffpg import estimators

    return estimators.names()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(invalid=INVALID)
def test_invalid_training_settings_are_clean_errors(invalid, tmp_path_factory):
    flag, value = invalid
    out = tmp_path_factory.mktemp("run") / "never"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            # A setting that slipped through would train 2 updates only (and fail below).
            status = cli.main(["train", "--env", "pendulum", "--updates", "2",
                               "--updates-per-call", "2", "--out", str(out), f"{flag}={value}"])
        except SystemExit as exit_info:  # argparse rejects what it cannot convert
            status = exit_info.code
    message = stderr.getvalue()
    assert status == 2, (flag, value, message)
    assert "Traceback" not in message and "error" in message, message
    assert not out.exists()
