r"""TIES-Merging: global per-task trim, sign election, disjoint mean.

The trim is done once per task over the **whole model** before any merge
(``Method.trim_keep``): its thresholds are order statistics
(:func:`flexmerge_jax.stats.order.ties_trim_thresholds`, or the host pass
:func:`flexmerge_jax.stats.passes.trim_pass` fused with the Gram matrices)
and :func:`flexmerge_jax.tree.trim` applies them. The kernels here
elect signs and merge: :func:`ties_merge` (the reference: disjoint mean) and
:func:`ties_disjoint_merge` (FusionBench's ``merge_func`` sum / max).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from ._common import (
    Block,
    as_members,
    block_majority,
    elected_entries,
    elected_sign,
    fraction,
    numeric,
)
from ._contract import GroupMerge, Method, Traits


def _signed_means(v: jax.Array, members: jax.Array):
    """``(sign of the column sum, mean of the positive entries, mean of the
    negative entries)`` of the members' rows of ``v``, all summed in task
    order, from one fused pass over ``v``.

    The disjoint mean for an elected sign ``+1`` (``-1``) is exactly the
    positive (negative) mean: the other entries only add zeros.
    """
    z = jnp.zeros((), v.dtype)
    total = pos = neg = npos = nneg = None
    for i in range(v.shape[0]):
        vi = jnp.where(members[i], v[i], z)
        p, q = vi > 0, vi < 0
        terms = (vi, jnp.where(p, vi, z), jnp.where(q, vi, z),
                 p.astype(jnp.float32), q.astype(jnp.float32))
        if total is None:
            total, pos, neg, npos, nneg = terms
        else:
            total, pos, neg, npos, nneg = (a + b for a, b in
                                           zip((total, pos, neg, npos, nneg), terms))
    return jnp.sign(total), pos / jnp.maximum(npos, 1.0), neg / jnp.maximum(nneg, 1.0)


def ties_merge(x: Block, members=None, *, scale=1.0) -> Block:
    r"""TIES elect + disjoint mean (no trim), times :math:`\lambda`.

    Sign election :math:`s_j=\mathrm{sign}(\sum_k x_{kj})`; where
    :math:`s_j = 0` it takes the sign of :math:`\sum_{j'} s_{j'}` over the
    whole block (+1 if that is 0). The disjoint mean averages, per
    coordinate, the entries with exactly the elected sign (:math:`x>0` for
    :math:`s>0`, :math:`x<0` for :math:`s<0`) over their count (at least 1).

    One read of ``x``: the block majority needs every column sign before any
    output, so each coordinate's positive and negative means are computed
    with its sign (an optimization barrier keeps XLA from recomputing the
    column sums in a second pass) and the majority then only picks.

    Returns:
      ``{name: f32[...]}``.
    """
    members = as_members(x, members)
    parts = jax.lax.optimization_barrier(
        {k: _signed_means(v, members) for k, v in x.items()})
    majority = block_majority(sg for sg, _, _ in parts.values())
    s = jnp.asarray(scale, jnp.float32)
    return {k: s * jnp.where(jnp.where(sg == 0, majority, sg) > 0, mp, mn)
            for k, (sg, mp, mn) in parts.items()}


def ties_disjoint_merge(
    x: Block,
    members=None,
    *,
    scale=1.0,
    merge_func: Literal["mean", "sum", "max"] = "mean",
) -> Block:
    r"""TIES elect + disjoint merge with FusionBench's ``merge_func``, times :math:`\lambda`.

    Sign election as :func:`ties_merge` (sign of the column sum; zeros take the block
    majority, +1 if that is 0). Over the entries with exactly the elected sign:

    * ``"mean"``: their mean -- exactly :func:`ties_merge` (the reference's default);
    * ``"sum"``: their sum (FusionBench's config default);
    * ``"max"``: the elected sign times their largest magnitude.

    No trimming here (TIES trims per task over the whole model:
    :func:`flexmerge_jax.stats.order.ties_trim_thresholds`). ``merge_func`` is static.

    Choices: FusionBench's ``resolve_sign`` takes the zero-sign fallback over the whole
    flattened model and leaves it 0 when the model-wide majority is 0 (``disjoint_merge`` then
    keeps the negative entries for ``mean``/``sum`` and gives 0 for ``max``); we keep the
    reference's block majority and +1 so that ``"mean"`` stays the reference TIES.

    References:
      Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708).
    """
    if merge_func not in ("mean", "sum", "max"):
        raise ValueError(f"merge_func must be 'mean', 'sum' or 'max', got {merge_func!r}")
    if merge_func == "mean":
        return ties_merge(x, members, scale=scale)
    members = as_members(x, members)
    signs = elected_sign(x, members)
    s = jnp.asarray(scale, jnp.float32)
    out = {}
    for k, v in x.items():
        rows = [sel for sel, _ in elected_entries(v, signs[k], members)]  # task order
        if merge_func == "sum":
            out[k] = s * functools.reduce(jnp.add, rows)
        else:
            out[k] = s * (functools.reduce(jnp.maximum, map(jnp.abs, rows)) * signs[k])
    return out


def _merge_mean(x, members, state, *, scale, keep):
    del state, keep  # the trim is applied before merging (Method.trim_keep)
    return GroupMerge(ties_merge(x, members, scale=scale), None, None)


def _merge_disjoint(x, members, state, *, scale, keep, merge_func):
    del state, keep
    return GroupMerge(ties_disjoint_merge(x, members, scale=scale, merge_func=merge_func),
                      None, None)


def ties(scale=1.0, keep: float = 1.0, merge_func: str = "mean") -> Method:
    r"""TIES-Merging with the reference's global trim.

    Args:
      scale: :math:`\lambda` on the disjoint mean; ``jax.typing.ArrayLike``
        (traceable, differentiable).
      keep: fraction of each task's entries kept, trimmed once per task over
        the whole model (``int(d*keep)+1`` kept, ties kept); ``1.0`` disables
        trimming (the reference's vision default). Static: it fixes an order
        statistic (the trim threshold is the ``int(d*keep)+1``-th largest
        magnitude, found by a radix select over the whole model).
      merge_func: ``"mean"`` (the reference: disjoint mean), ``"sum"`` or
        ``"max"`` (FusionBench/mergekit's ``merge_func``; with ``"sum"``,
        ``scale`` is their ``scaling_factor``). Static: it picks the kernel.

    References:
      Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708).
    """
    scale = numeric("scale", scale)
    keep = fraction("keep", keep, "ties", "it fixes an order statistic", lo_open=True)
    trim = keep if keep < 1.0 else None
    if merge_func == "mean":
        return Method("ties", _merge_mean, numeric=(("scale", scale),), static=(("keep", keep),),
                      traits=Traits(tunable=True, elementwise=True), trim_keep=trim, builtin=True)
    if merge_func not in ("sum", "max"):
        raise ValueError(f"merge_func must be 'mean', 'sum' or 'max', got {merge_func!r}")
    return Method("ties", _merge_disjoint, numeric=(("scale", scale),),
                  static=(("keep", keep), ("merge_func", merge_func)),
                  traits=Traits(elementwise=True), trim_keep=trim,
                  builtin=True)
