r"""DELLA: magnitude-ranked random drops (MagPrune), elect, fuse."""

from __future__ import annotations

import functools

import jax

from .. import kernels_extra
from ._common import fraction, numeric, static_number
from ._contract import GroupMerge, Method, Traits


@functools.partial(jax.jit, static_argnames=("density", "epsilon"))
def _pruned(x, key, *, density, epsilon):
    return {"pruned": kernels_extra.magprune(x, key=key, density=density, epsilon=epsilon)}


def _block_state(x, info, *, density, epsilon):
    return _pruned(x, info.key, density=density, epsilon=epsilon)


def _merge(x, members, state, *, scale, density, epsilon):
    state = state or {}
    if "pruned" in state:
        return GroupMerge(kernels_extra.della_fuse(state["pruned"], members, scale=scale),
                          None, None)
    if "key" not in state:
        raise ValueError("della needs its per-block PRNG key (extra={'key': ...})")
    return GroupMerge(kernels_extra.della(x, members, key=state["key"], density=density,
                                          epsilon=epsilon, scale=scale), None, None)


def della(scale=1.0, density: float = 0.5, epsilon: float = 0.15, seed: int = 0) -> Method:
    r"""DELLA: magnitude-ranked random drops (MagPrune), elect, fuse.

    The draws of a task depend only on ``seed``, the block and the parameter,
    so a task is pruned the same way in every group (once per block, shared).

    Args:
      scale: ``jax.typing.ArrayLike`` (traceable, differentiable).
      density, epsilon: keep probabilities ``density +- epsilon`` by
        magnitude rank; static: ranks are order statistics.
      seed: integer seed of the per-block keys.

    References:
      Deep et al., DELLA-Merging, 2024 (arXiv:2406.11617).
    """
    why = "ranks are order statistics"
    fraction("density", density, "della", why)
    eps = static_number("epsilon", epsilon, "della", why)
    if eps < 0 or density - eps <= 0 or density + eps > 1:
        raise ValueError(f"della: need 0 < density - epsilon and density + epsilon <= 1, "
                         f"got density={density}, epsilon={eps}")
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return Method("della", _merge, numeric=(("scale", numeric("scale", scale)),),
                  static=(("density", density), ("epsilon", epsilon)),
                  traits=Traits(whole_parameter=True), block_state=_block_state,
                  seed=int(seed), builtin=True)
