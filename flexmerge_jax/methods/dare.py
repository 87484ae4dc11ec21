r"""DARE: random drop and rescale of every task-vector entry, before any method."""

from __future__ import annotations

import dataclasses

from ._common import static_number
from ._contract import Dare, Method


def dare(method: Method, drop: float = 0.9, seed: int = 43) -> Method:
    r"""DARE preprocessing before ``method``.

    Each task-vector entry is kept iff :math:`U(0,1) > p` and rescaled by
    :math:`1/(1-p)`, with an explicit ``jax.random.key(seed)`` (per task and
    parameter keys, so the result is independent of how parameters are
    read). The reference uses a torch generator: results match it in
    distribution only.

    Args:
      method: the method merging the dropped task vectors.
      drop: :math:`p` in ``[0, 1)``. Static: the task vectors are
        preprocessed once, before planning.
      seed: integer seed.

    References:
      Yu et al., Language Models are Super Mario (DARE), ICML 2024.
    """
    if not isinstance(method, Method):
        raise ValueError(f"dare() wraps a Method, got {type(method).__name__}")
    if method.sparsify is not None:
        raise ValueError("dare() applied twice")
    p = static_number("drop", drop, "dare", "the task vectors are preprocessed before planning")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    if method.trims:
        raise ValueError(
            "dare(ties(keep<1)): the reference computes the TIES trim from the "
            "original task vectors and silently discards DARE; use "
            "ties(keep=1.0) so that DARE replaces the magnitude trim"
        )
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return dataclasses.replace(method, sparsify=Dare(p, int(seed)))
