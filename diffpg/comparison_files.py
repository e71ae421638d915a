"""A ``diffpg compare`` folder's files: ``results.json`` (the settings and each sweep point's
statistics, written by the command) and ``samples.npz`` (every raw gradient, ``save_samples``),
read back by ``load_samples`` (for analysis) and ``load_finished_points`` (for ``--resume``)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from diffpg.comparison_settings import CompareSettings
from diffpg.envs.core import SettingError

SAMPLES_FILE = "samples.npz"
"""The raw gradients of a comparison, beside its results.json (``load_samples`` reads them)."""


SETTINGS_ARRAY = "settings"
"""samples.npz's record of the settings its samples were computed with (JSON text), which
``--resume`` compares with results.json's."""


def samples_file_bytes_at_most(num_floats: int, num_arrays: int, settings: dict) -> int:
    """An upper bound of the size of ``save_samples``' file: ``num_floats`` float32 values in
    ``num_arrays`` arrays, each with its ``.npy`` header (128 bytes) and zip entries (local and
    central headers with zip64 fields and its name twice: under 1 KiB), the settings' JSON as a
    numpy unicode array (4 bytes a character) and the zip's end records (1 KiB). Deflate grows
    incompressible data by 5 bytes in 16 KiB at most (counted as 1 in 1,000)."""
    settings_bytes = 4 * len(json.dumps(settings, sort_keys=True, default=str)) + 2**10
    data_bytes = 4 * num_floats + settings_bytes
    return data_bytes + data_bytes // 1000 + 2**10 * (num_arrays + 1)


def save_samples(samples_per_point: list[dict], path: Path, settings: dict | None = None) -> None:
    """Write ``run_comparison``'s ``"samples"`` as one compressed ``.npz``: array
    ``point{i}/{name}`` for sweep point ``i`` (the order of results.json's ``results``) and
    ``name`` one of ``reference [P]``, ``reference_standard_error [P]`` (zeros for an exact
    reference), ``reference_estimates [R, P]`` (an estimated reference's samples) and
    ``estimates/{label} [K, P]`` (float32, one flat gradient per row, in
    ``jax.flatten_util.ravel_pytree`` order of the policy's parameters); and ``settings``, the
    comparison's settings as JSON text."""
    arrays = {f"point{i}/{name}": value for i, point in enumerate(samples_per_point)
              for name, value in point.items()}
    if settings is not None:
        arrays[SETTINGS_ARRAY] = np.array(json.dumps(settings, sort_keys=True))
    np.savez_compressed(path, **arrays)


def load_samples(run_dir: Path | str) -> list[dict]:
    """The raw gradients of a ``diffpg compare`` run folder, per sweep point (in order): a dict
    with ``sweep_value``, ``horizon``, ``reference [P]``, ``reference_standard_error [P]``,
    ``reference_estimates [R, P]`` (only for an estimated reference) and ``estimates``:
    ``{label: [K, P]}``. ``diffpg.stats.gradient_statistics(estimates[label], reference,
    reference_standard_error)`` recomputes the run's statistics."""
    run_dir = Path(run_dir)
    results_path, samples_path = run_dir / "results.json", run_dir / SAMPLES_FILE
    for path in (results_path, samples_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a diffpg compare run folder holds "
                                    f"results.json and {SAMPLES_FILE})")
    results = json.loads(results_path.read_text())["results"]
    points = [{"sweep_value": entry["sweep_value"], "horizon": entry["horizon"], "estimates": {}}
              for entry in results]
    with np.load(samples_path) as arrays:
        for name in arrays.files:
            index, _, key = name.partition("/")
            if not key:  # (the settings record)
                continue
            point = points[int(index.removeprefix("point"))]
            if key.startswith("estimates/"):
                point["estimates"][key.removeprefix("estimates/")] = arrays[name]
            else:
                point[key] = arrays[name]
    return points


def load_finished_points(run_dir: Path) -> tuple[CompareSettings, tuple[tuple[dict, dict], ...]]:
    """The settings and the finished sweep points (``run_comparison``'s ``finished``) of the
    comparison in ``run_dir``: what ``diffpg compare --resume`` continues."""
    results_path, samples_path = run_dir / "results.json", run_dir / SAMPLES_FILE
    for path in (results_path, samples_path):
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise SettingError(f"resume={str(run_dir)!r}: its {path.name} is not a file (a "
                               "folder, a pipe or a link to nowhere); put the comparison's back")
        if not path.is_file():
            raise SettingError(f"resume={str(run_dir)!r} has no {path.name}: not a diffpg "
                               "compare folder")
    try:
        results = json.loads(results_path.read_text())
        values = {name: tuple(value) if isinstance(value, list) else value
                  for name, value in results["settings"].items()}
        settings = CompareSettings(**values)
        samples: list[dict] = [{} for _ in results["results"]]
        with np.load(samples_path) as arrays:
            recorded = (json.loads(str(arrays[SETTINGS_ARRAY])) if SETTINGS_ARRAY in arrays.files
                        else None)
            for name in arrays.files:
                index, _, key = name.partition("/")
                if key:
                    samples[int(index.removeprefix("point"))][key] = arrays[name]
    except SettingError as error:  # a saved setting that this version refuses
        raise SettingError(f"resume={str(run_dir)!r}: its results.json holds a setting that is "
                           f"not valid ({error})") from None
    except (ValueError, TypeError, KeyError, IndexError, OSError, EOFError,
            zipfile.BadZipFile) as error:
        raise SettingError(f"resume={str(run_dir)!r}: its results.json or {SAMPLES_FILE} is not "
                           f"a diffpg comparison's ({type(error).__name__}: {error})") from None
    edited = [name for name, value in (recorded or {}).items()
              if results["settings"].get(name, value) != value]
    if edited:
        name = edited[0]
        raise SettingError(f"resume={str(run_dir)!r}: its results.json has {name}="
                           f"{results['settings'][name]!r}, but its samples were computed with "
                           f"{recorded[name]!r} (was results.json edited?); put it back to "
                           "resume, or start a new comparison with the new value")
    finished = tuple(zip(results["results"], samples, strict=True))
    check_finished_points(finished, settings)
    return settings, finished


def check_finished_points(finished, settings: CompareSettings, reference_kind: str | None = None
                          ) -> None:
    """The kept points of a stopped comparison must be the first of this one's sweep, with its
    estimators (and ``reference_kind``, when given); anything else is another comparison's."""
    points = settings.points
    if len(finished) > len(points):
        raise SettingError(f"the folder holds {len(finished)} sweep points; this comparison has "
                           f"{len(points)}")
    labels = {spec.label for spec in settings.specs}
    sizes = settings.resolved()
    expected_rows = {f"estimates/{label}": sizes.num_estimates for label in labels} | {
        "reference_estimates": sizes.reference_estimates}
    for entry, samples in finished:
        for key, rows in expected_rows.items():
            if key in samples and len(samples[key]) != rows:
                raise SettingError(
                    f"the folder's point {entry['sweep_value']:g} holds {len(samples[key])} "
                    f"samples of {key}, where this comparison's settings take {rows} (were "
                    "its settings in results.json changed?)")
    for (entry, _), point in zip(finished, points, strict=False):
        if (entry["sweep_value"] != point.value or entry["horizon"] != point.horizon
                or set(entry["estimators"]) != labels
                or entry["reference"]["kind"] != (reference_kind or entry["reference"]["kind"])):
            raise SettingError(
                f"the folder's point {entry['sweep_value']:g} (estimators "
                f"{sorted(entry['estimators'])}, reference {entry['reference']['kind']}) is not "
                f"this comparison's (estimators {sorted(labels)}, reference {reference_kind})")
