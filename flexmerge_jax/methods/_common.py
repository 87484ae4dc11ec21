"""Pieces the method modules share: hyperparameter checks that accept tracers."""

from __future__ import annotations

import math

import jax

from ._contract import is_traced


def numeric(name: str, v):
    """A numeric hyperparameter: a Python number (checked finite, as
    ``float``) or an array/tracer (``jax.typing.ArrayLike``, kept as is)."""
    if is_traced(v) or isinstance(v, jax.Array):
        return v
    return _finite(name, v, "a number or an array")


def static_number(name: str, v, method: str, why: str) -> float:
    """A hyperparameter that must be a Python number (``why`` says why)."""
    if is_traced(v) or isinstance(v, jax.Array) and v.ndim:
        raise ValueError(f"{method}: {name} must be a Python number, not an array ({why})")
    return _finite(name, v, "a number")


def _finite(name: str, v, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def fraction(name: str, v, method: str, why: str, lo_open=False) -> float:
    """A static fraction in ``[0, 1]`` (``(0, 1]`` with ``lo_open``)."""
    f = static_number(name, v, method, why)
    if not (0.0 < f if lo_open else 0.0 <= f) or f > 1.0:
        raise ValueError(f"{name} must be in {'(0' if lo_open else '[0'}, 1], got {v}")
    return f

