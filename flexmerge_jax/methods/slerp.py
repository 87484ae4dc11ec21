r"""SLERP: spherical interpolation of two tasks' task vectors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._common import Block, member_count_i32, n_tasks, numeric
from ._contract import GroupMerge, Method, Traits, is_traced


def _concrete_count(members) -> int | None:
    try:
        return int(np.asarray(members, bool).sum())
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _slerp_pair(t, v0, v1, thr, eps):
    n0 = jnp.sqrt(jnp.sum(v0 * v0))
    n1 = jnp.sqrt(jnp.sum(v1 * v1))
    u0 = jnp.where(n0 > eps, v0 / jnp.where(n0 > eps, n0, 1.0), v0)
    u1 = jnp.where(n1 > eps, v1 / jnp.where(n1 > eps, n1, 1.0), v1)
    dot = jnp.sum(u0 * u1)
    lin = jnp.abs(dot) > thr
    lerp = (1.0 - t) * v0 + t * v1
    theta0 = jnp.arccos(jnp.where(lin, 0.0, dot))
    sin0 = jnp.sin(theta0)
    theta_t = theta0 * t
    s0 = jnp.sin(theta0 - theta_t) / sin0
    s1 = jnp.sin(theta_t) / sin0
    return jnp.where(lin, lerp, s0 * v0 + s1 * v1)


def slerp_merge(
    x: Block,
    members=None,
    *,
    t=0.5,
    base: Block | None = None,
    dot_threshold=0.9995,
    eps=1e-8,
) -> Block:
    r"""Spherical linear interpolation of exactly two tasks, per tensor.

    With :math:`v_0, v_1` the first and second member (task order),
    :math:`\cos\Omega=\langle \hat v_0,\hat v_1\rangle` (vectors of norm :math:`\le` ``eps``
    are not normalised), and

    .. math:: \mathrm{slerp_merge}(t)=\frac{\sin((1-t)\Omega)}{\sin\Omega}v_0
              +\frac{\sin(t\Omega)}{\sin\Omega}v_1,

    replaced by the lerp :math:`(1-t)v_0+tv_1` when :math:`|\cos\Omega|>` ``dot_threshold``.

    Args:
      x: ``{name: f32[n, ...]}``.
      members: ``bool[n]`` with exactly two True (``None``: ``n`` must be 2).
      t: interpolation factor (0 -> first member, 1 -> second). Traceable.
      base: ``{name: f32[...]}`` :math:`\theta_0` of the block, or ``None``. ``None``: SLERP of
        the task vectors (angle between :math:`\tau`'s). Given: SLERP of the full weights
        :math:`\theta_0+\tau_i` minus :math:`\theta_0` (FusionBench ``SlerpMergeAlgorithm`` and
        mergekit, which interpolate the fine-tuned weights themselves).
      dot_threshold, eps: FusionBench/mergekit's ``DOT_THRESHOLD`` (0.9995) and ``epsilon``.

    Returns:
      ``{name: f32[...]}``.

    Raises:
      ValueError: when the group size is known at trace time (``members`` ``None`` or
        concrete) and is not 2.

    Groups: SLERP is defined for pairs only. With traced ``members`` the size cannot be
    checked: a single member returns its own task vector (exact, as the lerp branch), and a
    group of more than two returns NaN (loudly invalid). It is not symmetric in the members
    (``t`` <-> ``1 - t``) and not associative, so it has no n-ary extension; the planner must
    only ever merge two singletons with it (e.g. a schedule restricted to disjoint pairs,
    smallest size ``ceil(n/2)`` models per block) and treat any larger group as
    unsupported -- or use a method defined on groups.
    """
    n = n_tasks(x)
    if members is None:
        if n != 2:
            raise ValueError(
                f"slerp merges exactly 2 tasks; got n={n} tasks and members=None")
        members = jnp.ones((n,), bool)
    else:
        cnt = _concrete_count(members)
        if cnt is not None and cnt != 2:
            raise ValueError(f"slerp merges exactly 2 tasks; the group has {cnt}")
        members = jnp.asarray(members, bool)
    m = member_count_i32(members)
    i0 = jnp.argmax(members)
    i1 = (n - 1) - jnp.argmax(members[::-1])
    tt = jnp.asarray(t, jnp.float32)
    out = {}
    for k, v in x.items():
        a, b = v[i0], v[i1]
        if base is not None:
            b0 = jnp.asarray(base[k], jnp.float32)
            res = _slerp_pair(tt, b0 + a, b0 + b, dot_threshold, eps) - b0
        else:
            res = _slerp_pair(tt, a, b, dot_threshold, eps)
        out[k] = jnp.where(m <= 2, res, jnp.float32(jnp.nan))
    return out


def _merge(x, members, state, *, t):
    del state
    return GroupMerge(slerp_merge(x, members, t=t), None, None)


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
