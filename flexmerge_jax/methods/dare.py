r"""DARE: random drop and rescale of every task-vector entry, before any method.

:func:`dare` wraps a method (``Method.sparsify``); :func:`dare_drop` is the
drop itself, applied to every task vector as it is read.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ._common import static_number
from ._contract import Dare, Method


@functools.partial(jax.jit, static_argnames=("drop",))
def _dare_leaf(x, key, drop: float):
    # Draws take the shape (and sharding) of one task's slice; with the
    # partitionable threefry PRNG (JAX's default) the values do not depend
    # on the sharding.
    sh = getattr(jax.typeof(x), "sharding", None)
    rest = None
    if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.axis_names:
        rest = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*sh.spec[1:]))
    u = jnp.stack([
        jax.random.uniform(jax.random.fold_in(key, i), x.shape[1:], jnp.float32, out_sharding=rest)
        for i in range(x.shape[0])
    ])
    keep = u > jnp.float32(drop)
    return x * keep.astype(x.dtype) * jnp.float32(1.0 / (1.0 - drop))


def dare_drop(x: jax.Array, key: jax.Array, drop: float, leaf_index: int) -> jax.Array:
    r"""DARE on one leaf: keep each entry iff :math:`U(0,1) > p`, rescale.

    Args:
      x: ``f32[n, ...]`` task vectors of one parameter.
      key: the run's PRNG key (``jax.random.key(seed)``).
      drop: :math:`p \in [0, 1)`.
      leaf_index: the parameter's position in the layout; the per-task,
        per-parameter key is ``fold_in(fold_in(key, leaf_index), task)``, so
        the result does not depend on how the model is read (in memory,
        block by block, sharded).

    Returns:
      ``f32[n, ...]``: ``x * mask * (1 / (1 - p))``. Matches the reference
      (torch generator) in distribution only.
    """
    return _dare_leaf(x, jax.random.fold_in(key, leaf_index), float(drop))


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
