"""A user's own environment, written exactly as docs/extending.md shows it, is one file and one
``envs.register`` call: ``make`` builds it, ``diffpg --import`` brings it to ``compare`` and
``train``, its settings are checked by name and by its own checks, and what it does not offer (a
stiffness setting, an exact return) is refused naming the envs that do."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from diffpg.envs.core import Environment, SettingError

from diffpg import cli, envs

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _documented_env_file() -> str:
    """The ``# my_envs.py`` block of docs/extending.md."""
    blocks = re.findall(r"```python\n(# my_envs\.py\n.*?)```", EXTENDING.read_text(), re.S)
    assert len(blocks) == 1, "docs/extending.md should show one my_envs.py"
    return blocks[0]


@pytest.fixture
def glider(tmp_path, monkeypatch):
    """docs/extending.md's my_envs.py in the working directory, imported by the tests' commands;
    its registration undone afterwards."""
    (tmp_path / "my_envs.py").write_text(_documented_env_file())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    if "glider" in envs.names():
        envs.unregister("glider")
    sys.modules.pop("my_envs", None)


def test_the_documented_env_runs_in_compare_and_train(glider, capsys):
    out = glider / "compare"
    assert cli.main(["--import", "my_envs", "compare", "--env", "glider", "--env-options",
                     "drag=0.5", "--estimators", "reinforce", "bptt", "--sweep", "none",
                     "--horizon", "4", "--num-estimates", "8", "--num-envs", "4",
                     "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["env"] == "glider"
    assert set(results["results"][0]["estimators"]) == {"reinforce", "bptt"}
    assert results["reference_kind"] != "exact"  # no closed form: an estimated reference
    run = glider / "train"
    assert cli.main(["--import", "my_envs", "train", "--env", "glider", "--updates", "2",
                     "--updates-per-call", "2", "--num-envs", "4", "--eval-envs", "2",
                     "--hidden-sizes", "16", "--horizon", "8", "--out", str(run)]) == 0
    assert json.loads((run / "settings.json").read_text())["env"] == "glider"
    capsys.readouterr()


def test_the_documented_env_is_built_and_checked_like_a_built_in_one(glider, capsys):
    import my_envs  # noqa: F401 (registers "glider")

    assert "glider" in envs.names() and "glider" in envs.names_without_simulator()
    assert envs.setting_names("glider") == ("drag", "dt")
    assert envs.default_episode_length("glider") == 50
    assert not envs.has_exact_return("glider")
    env = envs.make("glider", drag=0.5)
    state = jax.jit(env.step)(env.reset(jax.random.PRNGKey(0)), np.ones(1, np.float32))
    assert state.obs.shape == (2,) and np.isfinite(float(state.reward))
    with pytest.raises(SettingError, match=r"no setting\(s\) \['mass'\]; allowed settings: "
                                           r"\['drag', 'dt'\]"):
        envs.make("glider", mass=1.0)
    with pytest.raises(SettingError, match="drag=-1"):
        envs.check("glider", drag=-1)
    with pytest.raises(SettingError, match="env='glider' exists already"):
        envs.register("glider", type(env.unwrapped))
    for arguments, message in (
            (["--reference", "exact"], "exact return (lqr), not env='glider'"),
            (["--sweep", "stiffness"], "stiffness setting (contact or curling), not env='glider'"),
            (["--env-options", "drag=-1"], "drag=-1")):
        assert cli.main(["compare", "--env", "glider", *arguments,
                         "--out", str(glider / "never")]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error


def test_register_refuses_what_is_not_an_environment_or_a_name():
    with pytest.raises(SettingError, match="not a subclass of diffpg.envs.Environment"):
        envs.register("not_an_env", dict)
    with pytest.raises(SettingError, match="exists already"):
        envs.register("pendulum", Environment)
    with pytest.raises(SettingError, match="must be a Python identifier"):
        envs.register("playground:Mine", Environment)
    with pytest.raises(SettingError, match="was not registered"):
        envs.unregister("pendulum")
    assert "not_an_env" not in envs.names()
