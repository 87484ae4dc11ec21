r"""SLERP: spherical interpolation of two tasks' task vectors."""

from __future__ import annotations

from .. import kernels_extra
from ._common import numeric
from ._contract import GroupMerge, Method, Traits, is_traced


def _merge(x, members, state, *, t):
    del state
    return GroupMerge(kernels_extra.slerp(x, members, t=t), None, None)


def slerp(t=0.5) -> Method:
    r"""SLERP of exactly **two** tasks' task vectors (``t``: 0 -> first task).

    SLERP is defined for pairs only (not symmetric, not associative): it
    merges two models; FlexMerge plans with it need ``n = 2``.

    Args:
      t: interpolation weight in ``[0, 1]``; ``jax.typing.ArrayLike``
        (traceable, differentiable).
    """
    t = numeric("t", t)
    if not is_traced(t) and not hasattr(t, "ndim") and not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    return Method("slerp", _merge, numeric=(("t", t),), traits=Traits(tasks=2), builtin=True)
