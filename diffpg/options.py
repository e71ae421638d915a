"""``key=value`` settings for the constructors diffpg does not own (environments), and estimator
specs ``name:key=value,...`` for ``diffpg compare``: their values are Python literals."""

from __future__ import annotations

import ast
import contextlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from diffpg.envs.core import SettingError

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""The largest number a run computes with (float32); a setting above it would be inf there."""
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
"""The smallest positive normal float32; a setting nearer 0 (but not 0) would be flushed to 0
on the device."""


def float32_problem(value: Any) -> str | None:
    """Why the number ``value`` (or a number inside a tuple or list) does not survive float32,
    the precision runs compute in: inf or NaN, beyond +-FLOAT32_MAX, or so near 0 that it
    becomes 0; ``None`` when it does (and for anything that is not a number)."""
    if isinstance(value, tuple | list):
        return next(filter(None, map(float32_problem, value)), None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "is not a finite number"
    if abs(value) > FLOAT32_MAX:
        return f"is beyond float32's range (|x| <= {FLOAT32_MAX:.4g}; inf on the device)"
    if value != 0 and abs(value) < FLOAT32_TINY:
        return f"becomes 0 in float32 (its smallest normal magnitude is {FLOAT32_TINY:.4g})"
    return None


def parse_value(text: str) -> Any:
    """A Python literal (number, bool, None, tuple, string in quotes), ``true``/``false`` in any
    case (the words the errors ask for), ``nan``/``inf`` as floats, else the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        with contextlib.suppress(ValueError):  # ('-+inf' is no float: the text, named later)
            return float(text)  # (checked as a number, and refused where it is not allowed)
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, RecursionError, MemoryError):  # not a literal: the text
        return text


def parse_options(items: Iterable[str], setting: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{"key": value}`` (values by ``parse_value``); ``setting`` names
    the option in errors."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SettingError(f"{setting}: {item!r} must be written key=value")
        key, value = key.strip(), parse_value(value.strip())
        if key in options:
            raise SettingError(f"{setting}: {key} is given twice ({key}={options[key]!r} and "
                               f"{key}={value!r}); give it once")
        problem = float32_problem(value)
        if problem is not None:
            raise SettingError(f"{setting}: {key}={value!r} {problem}")
        options[key] = value
    return options


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``("name", {"key": value, ...})``; a tuple value is
    written in brackets (``shac:critic_hidden_sizes=(32,32),window=4``), whose commas do not
    separate settings."""
    name, _, rest = text.strip().partition(":")
    return name, parse_options(filter(None, _top_level_items(rest)), f"estimator spec {text!r}")


def _top_level_items(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"a=(1,2),b=3"`` -> ``["a=(1,2)", "b=3"]``."""
    items, depth, start = [], 0, 0
    for index, character in enumerate(text):
        depth += (character in "([{") - (character in ")]}")
        if character == "," and depth <= 0:
            items.append(text[start:index])
            start = index + 1
    return [*items, text[start:]]


def check_not_owned(options: dict[str, Any], owners: dict[str, str], where: str) -> None:
    """A one-line error when ``options`` (given in ``where``) sets a value that an option of
    its own owns; ``owners`` maps each such key to the option to use instead."""
    for key in options:
        if key in owners:
            raise SettingError(f"{where} sets {key}, which {owners[key]} sets; use {owners[key]}")


def check_seed(name: str, value: Any, offsets: int = 0) -> None:
    """An integer that JAX's key takes (int64), also after adding up to ``offsets`` to it (a
    run's ``seeds`` seeds and its evaluation's draw ``seed + 1`` onwards)."""
    if (not isinstance(value, int) or isinstance(value, bool)
            or not -(2**63) <= value <= 2**63 - 1 - offsets):
        top = f"2**63 - {1 + offsets}" if offsets else "2**63 - 1"
        raise SettingError(f"{name}={value!r} must be an integer in [-2**63, {top}] (a 64-bit "
                           + (f"seed; the run also draws from the {offsets} after it: its seeds "
                              "and its evaluation's)" if offsets else "seed)"))


def seed_key(seed: int):
    """``jax.random.PRNGKey`` of any seed ``check_seed`` allows. JAX (32-bit integers) keeps a
    seed's low 32 bits only, so seeds 2**32 apart (and -1 and 2**63 - 1) drew the same keys:
    the high 32 bits are folded in (a seed in [0, 2**32) keeps the key it always had)."""
    import jax

    low, high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    key = jax.random.PRNGKey(low)
    return jax.random.fold_in(key, high) if high else key
