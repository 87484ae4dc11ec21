r"""MagMax: per parameter, the task-vector entry of largest magnitude."""

from __future__ import annotations

import jax.numpy as jnp

from ._common import Block, as_members, numeric
from ._contract import GroupMerge, Method, Traits


def magmax_merge(x: Block, members=None, *, scale=1.0) -> Block:
    r"""MagMax: per entry, the member task vector entry of largest magnitude, times :math:`\lambda`.

    :math:`\Delta_j=\lambda\,\tau_{i^*(j),j}`, :math:`i^*(j)=\arg\max_{i\in G}|\tau_{ij}|`;
    ties go to the **later** task (the official code folds with ``>=``; FusionBench too).

    Args:
      scale: :math:`\lambda` (FusionBench default 0.5, the official 8-task script). Traceable.

    Returns:
      ``{name: f32[...]}``; one task in gives ``scale`` times itself.

    References:
      Marczak et al., MagMax, ECCV 2024 (arXiv:2407.06322).
    """
    members = as_members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    out = {}
    for k, v in x.items():
        n = v.shape[0]
        mb = members.reshape((n,) + (1,) * (v.ndim - 1))
        a = jnp.where(mb, jnp.abs(v), -1.0)
        idx = (n - 1) - jnp.argmax(a[::-1], axis=0)
        out[k] = s * jnp.take_along_axis(v, idx[None], axis=0)[0]
    return out


def _merge(x, members, state, *, scale):
    del state
    return GroupMerge(magmax_merge(x, members, scale=scale), None, None)


def magmax(scale=1.0) -> Method:
    r"""MagMax: per parameter, the task-vector entry of largest magnitude.

    Args:
      scale: ``jax.typing.ArrayLike`` (traceable, differentiable).

    References:
      Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual
      Learning, ECCV 2024 (arXiv:2407.06322).
    """
    return Method("magmax", _merge, numeric=(("scale", numeric("scale", scale)),),
                  traits=Traits(elementwise=True), builtin=True)
