r"""TALL masks (consensus merging) on task arithmetic or on TIES."""

from __future__ import annotations

import jax.numpy as jnp

from ._common import Block, as_members, numeric, per_task
from ._contract import GroupMerge, Method, Traits, is_traced
from .task_arithmetic import task_arithmetic_merge
from .ties import ties_merge


def consensus_masks(x: Block, merged: Block, members=None, *, consensus=0.3) -> Block:
    r"""TALL masks :math:`M_k = |x_k| > c\,|v - x_k|` (strict), members only.

    Args:
      x: ``{name: f32[n, ...]}`` task vectors.
      merged: ``{name: f32[...]}`` the group's merged vector :math:`v`
        (including :math:`\lambda`).
      members: ``bool[n]``; non-members get all-False masks.
      consensus: :math:`c` (the reference's ``--CONSENSUS_LAMBDA``).

    Returns:
      ``{name: bool[n, ...]}``.
    """
    members = as_members(x, members)
    c = jnp.asarray(consensus, jnp.float32)
    return {
        k: (jnp.abs(v) > c * jnp.abs(merged[k][None] - v)) & per_task(members, v)
        for k, v in x.items()
    }


def _masked(v, x, members, consensus):
    masks = consensus_masks(x, v, members, consensus=consensus)
    n = next(iter(x.values())).shape[0]
    return GroupMerge(v, masks, jnp.ones((n,), jnp.float32))


def _merge_ta(x, members, state, *, scale, consensus):
    del state
    return _masked(task_arithmetic_merge(x, members, scale=scale), x, members, consensus)


def _merge_ties(x, members, state, *, scale, consensus):
    del state
    return _masked(ties_merge(x, members, scale=scale), x, members, consensus)


def _check(consensus):
    consensus = numeric("consensus", consensus)
    if not is_traced(consensus) and not hasattr(consensus, "ndim") and consensus < 0:
        raise ValueError(f"consensus must be >= 0, got {consensus}")
    return consensus


def consensus_ta(scale=1.0, consensus=0.3) -> Method:
    r"""TALL masks on task arithmetic (reference ``consensus_ta``).

    Merged groups of at least 3 tasks store :math:`v=\lambda\,\mathrm{mean}`
    and per-task boolean masks :math:`M_k=|x_k|>\lambda_c|v-x_k|`; task k is
    deployed as :math:`\theta_0+M_k\odot v`.

    Args:
      scale: :math:`\lambda`; ``jax.typing.ArrayLike`` (traceable).
      consensus: :math:`\lambda_c`; ``jax.typing.ArrayLike`` (traceable;
        the masks are step functions of it, so its gradient is zero).

    References:
      Wang et al., Localizing Task Information for Improved Model Merging
      and Compression, ICML 2024.
    """
    return Method("consensus_ta", _merge_ta,
                  numeric=(("scale", numeric("scale", scale)), ("consensus", _check(consensus))),
                  traits=Traits(uses_masks=True, linear=True, tunable=True, elementwise=True),
                  builtin=True)


def consensus_ties(scale=1.0, consensus=0.3) -> Method:
    """TALL masks on TIES (elect + disjoint mean; never trims, as the reference).

    Hyperparameters as :func:`consensus_ta` (both traceable).
    """
    return Method("consensus_ties", _merge_ties,
                  numeric=(("scale", numeric("scale", scale)), ("consensus", _check(consensus))),
                  traits=Traits(uses_masks=True, tunable=True, elementwise=True), builtin=True)
