"""Compiled programs kept across processes (``diffpg.program_cache``): a kept program computes what
a fresh compile does, a damaged file is compiled again, and the key follows what shapes a program."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HANG_LIMIT_S, small_disk

from diffpg import program_cache
from diffpg.compare import CompareSettings, run_comparison
from diffpg.compilation_cache import unusable_cache_folder


@pytest.fixture
def programs(tmp_path, monkeypatch):
    """Empty caches (JAX's persistent one in a fresh folder, its programs folder, the in-memory
    ones), and a count of the programs traced and compiled."""
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    original = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    jax_cache.reset_cache()
    jax.clear_caches()
    folder = tmp_path / "jax" / "programs"
    assert program_cache.programs_dir() == folder
    compiled = []
    compile_for_real = program_cache._compile_lowered

    def counting(lowered, options):
        compiled.append(lowered)
        return compile_for_real(lowered, options)

    monkeypatch.setattr(program_cache, "_compile_lowered", counting)
    yield folder, compiled
    jax.config.update("jax_compilation_cache_dir", original)
    jax_cache.reset_cache()


def _program(scale):
    return jax.jit(lambda x, key: scale * x + jax.random.normal(key, x.shape))


def test_a_kept_program_is_loaded_not_compiled_and_computes_the_same(programs):
    folder, compiled = programs
    x, key = jnp.arange(4.0), jax.random.PRNGKey(3)
    first = program_cache.compile_program(_program(2.0), x, key, description={"scale": 2.0})
    assert len(compiled) == 1 and len(list(folder.glob("*.bin"))) == 1
    # The same description loads the kept program: nothing traced or compiled.
    again = program_cache.compile_program(_program(2.0), x, key, description={"scale": 2.0})
    assert len(compiled) == 1
    np.testing.assert_array_equal(np.asarray(again(x, key)), np.asarray(first(x, key)))
    # Another description, or other input shapes, is another program.
    program_cache.compile_program(_program(3.0), x, key, description={"scale": 3.0})
    program_cache.compile_program(_program(2.0), jnp.arange(5.0), key, description={"scale": 2.0})
    assert len(compiled) == 3 and len(list(folder.glob("*.bin"))) == 3
    # No description: compiled every time, never kept.
    program_cache.compile_program(_program(2.0), x, key)
    assert len(compiled) == 4 and len(list(folder.glob("*.bin"))) == 3


def test_a_damaged_program_file_is_compiled_again_and_removed(programs):
    folder, compiled = programs
    x, key = jnp.arange(4.0), jax.random.PRNGKey(0)
    expected = np.asarray(program_cache.compile_program(_program(2.0), x, key,
                                                  description={"n": 1})(x, key))
    (path,) = folder.glob("*.bin")
    kept = path.read_bytes()
    for damage in (b"", b"not a program", kept[: len(kept) // 2]):
        path.write_bytes(damage)
        loaded = program_cache.compile_program(_program(2.0), x, key, description={"n": 1})
        np.testing.assert_array_equal(np.asarray(loaded(x, key)), expected)
        # Compiled again (JAX's persistent cache answers: not kept, see below), file removed.
        assert not path.exists()
    assert len(compiled) == 4


def test_swapped_program_files_or_a_fifo_among_them_are_compiled_again(programs):
    """Each file records the key it was kept under: two files swapped (or renamed) hold other
    programs and are compiled again, not run; a FIFO in their place is not waited on."""
    folder, compiled = programs
    x, key = jnp.arange(4.0), jax.random.PRNGKey(0)
    expected = {}
    for scale in (2.0, 3.0):
        expected[scale] = np.asarray(program_cache.compile_program(
            _program(scale), x, key, description={"scale": scale})(x, key))
    first, second = sorted(folder.glob("*.bin"))
    first_bytes, second_bytes = first.read_bytes(), second.read_bytes()
    first.write_bytes(second_bytes)
    second.write_bytes(first_bytes)
    for scale in (2.0, 3.0):
        loaded = program_cache.compile_program(_program(scale), x, key,
                                               description={"scale": scale})
        np.testing.assert_array_equal(np.asarray(loaded(x, key)), expected[scale])
    assert len(compiled) == 4
    for path in folder.glob("*.bin"):
        path.unlink(missing_ok=True)
        os.mkfifo(path)
    loaded = program_cache.compile_program(_program(2.0), x, key, description={"scale": 2.0})
    np.testing.assert_array_equal(np.asarray(loaded(x, key)), expected[2.0])


def test_the_key_follows_the_description_the_flags_and_the_closed_over_values(monkeypatch):
    key = program_cache.program_key({"a": 1})
    assert program_cache.program_key({"a": 1}) == key
    assert program_cache.program_key({"a": 2}) != key
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert program_cache.program_key({"a": 1}) != key
    params = {"w": np.zeros(3, np.float32)}
    assert (program_cache.array_fingerprint(params)
            != program_cache.array_fingerprint({"w": np.ones(3, np.float32)}))
    assert (program_cache.array_fingerprint(params)
            != program_cache.array_fingerprint({"w": np.zeros(3, np.float64)}))
    assert program_cache.module_fingerprint("no_such_module") is None
    # The compiled module is named after the key, so that JAX's persistent cache, which keys on
    # the module, has not seen a program to keep (it is compiled here, and serializes whole).
    assert (program_cache.module_name("estimates", {"a": 1})
            == "estimates_" + program_cache.program_key({"a": 1})[:16])
    assert program_cache.module_name("estimates", None) == "estimates"
    # A source file changed after the process started: its code may not be the file's.
    monkeypatch.setattr(program_cache, "_IMPORTED_AT", 0.0)
    assert program_cache.program_key({"a": 1}) is None
    assert program_cache.module_name("estimates", {"a": 1}) == "estimates"


def test_the_least_recently_used_programs_go_first_past_the_size_limit(tmp_path):
    for age, name in enumerate(("old", "middle", "new")):
        path = tmp_path / f"{name}.bin"
        path.write_bytes(b"x" * 100)
        os.utime(path, (1000 + age, 1000 + age))
    program_cache._remove_least_recently_used(tmp_path, max_bytes=200)
    assert sorted(p.stem for p in tmp_path.glob("*.bin")) == ["middle", "new"]


def test_a_comparison_run_again_loads_every_program_and_gives_the_same_samples(programs):
    """What ``diffpg compare`` does in a second process: the kept programs (the warm-up of the
    critic, the estimates) load, nothing of the estimators compiles, the samples are the same;
    without keeping programs the same comparison gives the same samples too."""
    folder, compiled = programs
    settings = CompareSettings(estimators=("reinforce", "shac"), horizon=2, num_envs=4,
                               num_estimates=4, sweep="none", critic_warmup=2)

    def estimators_programs():  # the reference, the LQR's exact gradient, is not kept
        return [lowered for lowered in compiled if any(
            name in lowered.as_text().split("\n", 1)[0] for name in ("warm_up", "flat_estimates"))]

    first = run_comparison(settings, keep_programs=True)
    kept = len(list(folder.glob("*.bin")))
    # reinforce's estimates; shac's warm-up, estimates
    assert kept == 3 and len(estimators_programs()) == 3
    second = run_comparison(settings, keep_programs=True)
    assert len(estimators_programs()) == 3  # all loaded
    plain = run_comparison(settings)
    assert len(list(folder.glob("*.bin"))) == kept
    for name in ("estimates/reinforce", "estimates/shac"):
        np.testing.assert_array_equal(second["samples"][0][name], first["samples"][0][name])
        np.testing.assert_array_equal(plain["samples"][0][name], first["samples"][0][name])


def test_the_compare_command_keeps_its_programs_in_the_cache_folder(tmp_path):
    """``diffpg compare`` keeps its programs under the compilation cache folder, and a second
    process loads them (same results)."""
    command = [sys.executable, "-m", "diffpg.cli", "compare", "--estimators", "reinforce",
               "--horizon", "2", "--num-envs", "4", "--num-estimates", "4", "--sweep", "none"]
    env = dict(os.environ, DIFFPG_CACHE_DIR=str(tmp_path / "cache"))
    outputs = []
    for run in ("a", "b"):
        done = subprocess.run(command + ["--out", str(tmp_path / run)], capture_output=True,
                              text=True, env=env, timeout=HANG_LIMIT_S)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(np.load(tmp_path / run / "samples.npz")["point0/estimates/reinforce"])
    assert len(list((tmp_path / "cache" / "programs").glob("*.bin"))) == 1
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_program_loaded_from_jax_cache_is_not_kept(programs):
    """JAX's persistent cache answers a compile that this process did not do: XLA:CPU serializes
    such an executable without some of its kernels, so it is not kept (it failed when loaded:
    "Function ... not found"); the comparison runs the same from either cache."""
    folder, compiled = programs
    settings = CompareSettings(estimators=("bptt",), horizon=2, num_envs=2, num_estimates=2,
                               sweep="none", critic_warmup=0)
    first = run_comparison(settings, keep_programs=True)
    for _ in range(2):  # JAX's cache now holds the program; ours is emptied
        for path in folder.glob("*.bin"):
            path.unlink()
        jax.clear_caches()
        again = run_comparison(settings, keep_programs=True)
        assert list(folder.glob("*.bin")) == []
        np.testing.assert_array_equal(again["samples"][0]["estimates/bptt"],
                                      first["samples"][0]["estimates/bptt"])


def _tiny_compare(cache, out, estimators=("reinforce", "shac")):
    """A small comparison in a new process with its caches in ``cache``."""
    command = [sys.executable, "-m", "diffpg.cli", "compare", "--estimators", *estimators,
               "--horizon", "2", "--num-envs", "4", "--num-estimates", "4", "--sweep", "none",
               "--critic-warmup", "2", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_LIMIT_S,
                          env=dict(os.environ, DIFFPG_CACHE_DIR=str(cache)))


def _messages(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not progress bars."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and "task" not in line]


def test_a_read_only_cache_with_a_damaged_entry_is_read_silently(tmp_path):
    """A shared, pre-built cache on a read-only file system: a command loads what it can,
    compiles the rest (a damaged entry too), keeps nothing, and says nothing about it."""
    with small_disk(tmp_path / "cache", "256m") as cache:
        first = _tiny_compare(cache, tmp_path / "a")
        assert first.returncode == 0, first.stderr[-2000:]
        kept = sorted((cache / "programs").glob("*.bin"))
        assert len(kept) == 3
        kept[0].write_bytes(b"damaged")
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(cache)],
                                   capture_output=True, text=True)
        if remounted.returncode:
            pytest.skip(f"cannot remount read-only here ({remounted.stderr.strip()})")
        second = _tiny_compare(cache, tmp_path / "b")
        assert second.returncode == 0, second.stderr[-2000:]
        assert _messages(second.stderr) == []
        assert sorted((cache / "programs").glob("*.bin")) == kept  # nothing removed or added
    for name in ("point0/estimates/reinforce", "point0/estimates/shac"):
        np.testing.assert_array_equal(np.load(tmp_path / "b" / "samples.npz")[name],
                                      np.load(tmp_path / "a" / "samples.npz")[name])


def test_an_unusable_cache_folder_is_named_and_the_command_runs_without_it(tmp_path):
    """A file, a folder under a file, a link loop: each is refused with its reason, and a
    command whose cache folder is one says so in one line and runs."""
    (tmp_path / "file").write_text("")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    assert unusable_cache_folder(tmp_path / "file") == "is not a folder"
    assert unusable_cache_folder(tmp_path / "loop_a") == "is not a folder"
    assert unusable_cache_folder(tmp_path / "file" / "cache").startswith("cannot be created")
    assert unusable_cache_folder(tmp_path / "new" / "cache") is None
    done = _tiny_compare(tmp_path / "file", tmp_path / "out", estimators=("reinforce",))
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = _messages(done.stderr)
    assert line.startswith(f"diffpg: compilation cache {str(tmp_path / 'file')!r} is not a folder")
    assert (tmp_path / "out" / "samples.npz").exists()


def test_an_empty_cache_entry_a_full_disk_left_is_removed(tmp_path):
    """JAX writes a cache entry in place and never over an existing one: an entry a full disk
    left empty made its program compile at every run. Such entries are removed when the cache
    is enabled; whole ones and other files stay."""
    from diffpg.compilation_cache import _remove_cut_entries

    (tmp_path / "jit_ravel-0123-cache").write_bytes(b"")
    (tmp_path / "jit_step-4567-cache").write_bytes(b"an entry")
    (tmp_path / "notes").write_bytes(b"")
    _remove_cut_entries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jit_step-4567-cache", "notes"]
    _remove_cut_entries(tmp_path / "missing")  # (nothing there: nothing to do)


def test_an_entry_cut_short_is_replaced_by_the_program_compiled_in_its_place(tmp_path):
    """An entry cut anywhere (a kill or a full disk while JAX wrote it) fails to load; it is
    removed then, so that the program compiled instead is kept in its place, not compiled again
    at every run (JAX never writes over an entry)."""
    from jax._src.compilation_cache import decompress_executable

    program = ("import sys, jax, jax.numpy as jnp\n"
               "from diffpg.compilation_cache import enable_compilation_cache\n"
               "enable_compilation_cache(sys.argv[1])\n"
               "print(float(jax.jit(lambda x: jnp.sum(jnp.sin(x) ** 2))(jnp.arange(64.0))))\n")

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", program, str(tmp_path)], capture_output=True,
                              text=True, timeout=HANG_LIMIT_S)
        assert done.returncode == 0 and _messages(done.stderr) == [], done.stderr[-2000:]
        return done.stdout

    expected = run()
    entries = {path: path.read_bytes() for path in tmp_path.glob("*-cache")}
    assert entries
    for path, whole in entries.items():
        path.write_bytes(whole[: len(whole) // 2])  # cut after its first block
    assert run() == expected
    for path in entries:
        decompress_executable(path.read_bytes())  # whole again
