r"""Pure merge kernels on the stacked task vectors of one block.

Every kernel takes ``x``, a dict ``{parameter name: f32[n, ...]}`` holding the
(preprocessed) task vectors of the n tasks restricted to one block, and
``members``, a ``bool[n]`` mask selecting the group to merge (``None`` = all
n tasks). Shapes never depend on the group, so one compilation serves every
group of a block and the kernels ``vmap`` over groups. Kernels are plain
functions (the caller jits them, so outer jits can fuse).

The arithmetic mirrors the FlexMerge reference (spec §5) operation by
operation in float32, including the summation order over tasks (sequential
in ascending task index, as the reference's Python ``sum`` and torch
reductions over the task axis do), so that discrete decisions (elected
signs, masks on the consensus boundary) agree with it:

* ``average``: :math:`v = \sum_k \mathrm{fl}(w x_k)` with
  :math:`w = \mathrm{fl}_{32}(1/m)` — the reference's weighted mean.
* ``task_arithmetic``: :math:`v = \lambda \cdot \mathrm{mean}` — note
  :math:`\lambda` multiplies the **mean**; in the sum convention of
  FusionBench/mergekit (``scaling_factor`` :math:`\alpha` on
  :math:`\sum_k \tau_k`) this is :math:`\alpha = \lambda / m`.
* ``ties_merge``: elect the sign of the column sum (zero signs take the sign
  of the sum of signs over the whole block, +1 if that is 0), disjoint mean
  over the entries with exactly the elected sign, times :math:`\lambda`. No
  trimming here: TIES trims once per task over the whole model
  (:func:`flexmerge_jax.prep.ties_trim`).
* ``pcb_merge``: the reference's ``pcb_merging(trim=False)`` with its global
  per-task thresholds.
* ``consensus_masks``: TALL masks :math:`M_k = |x_k| > c\,|v - x_k|`.
* ``emr``: EMR-Merging with the reference's per-block rescalers (sum over
  the block's tensors of per-tensor means).

References:
  Ilharco et al., Editing Models with Task Arithmetic, 2023.
  Yadav et al., TIES-Merging, 2023 (arXiv:2306.01708).
  Du et al., Parameter Competition Balancing (PCB-Merging), 2024.
  Wang et al., Localizing Task Information (TALL masks / Consensus), 2024.
  Huang et al., EMR-Merging, 2024 (arXiv:2405.17461).
  Dhasade et al., FlexMerge, 2025 (arXiv:2505.23209).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Block",
    "average",
    "task_arithmetic",
    "ties_merge",
    "pcb_merge",
    "consensus_masks",
    "emr",
    "EmrResult",
    "task_sum",
]

Block = dict  # {parameter name: f32[n, ...]}


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-task vector ``[n]`` to broadcast against ``x [n, ...]``."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _members(x: Block, members) -> jax.Array:
    n = next(iter(x.values())).shape[0]
    if members is None:
        return jnp.ones((n,), bool)
    return jnp.asarray(members, bool)


def task_sum(x: jax.Array) -> jax.Array:
    """Sum over the leading task axis, sequentially in task order.

    ``((x[0] + x[1]) + x[2]) + ...``: the order of the reference's Python
    ``sum`` and torch's reductions over the task axis. XLA does not
    reassociate float additions, so the result is reproducible.
    """
    acc = x[0]
    for k in range(1, x.shape[0]):
        acc = acc + x[k]
    return acc


def task_max(x: jax.Array) -> jax.Array:
    """Maximum over the leading task axis, as an unrolled elementwise chain.

    XLA's CPU reduction over the leading axis materializes its operand and
    runs several times slower than one read; the chain fuses with whatever
    computes ``x``.
    """
    acc = x[0]
    for k in range(1, x.shape[0]):
        acc = jnp.maximum(acc, x[k])
    return acc


def _masked(x: jax.Array, members: jax.Array) -> jax.Array:
    return jnp.where(_bcast(members, x), x, jnp.zeros((), x.dtype))


def _count(members: jax.Array) -> jax.Array:
    return jnp.sum(members, dtype=jnp.int32).astype(jnp.float32)


def average(x: Block, members=None) -> Block:
    r"""Mean of the group's task vectors (reference ``state_dict_avg``).

    Args:
      x: ``{name: f32[n, ...]}`` task vectors of one block.
      members: ``bool[n]`` group mask (``None``: all tasks).

    Returns:
      ``{name: f32[...]}`` — :math:`\sum_k \mathrm{fl}(w x_k)`,
      :math:`w=\mathrm{fl}_{32}(1/m)`, summed in task order.
    """
    members = _members(x, members)
    w = jnp.float32(1.0) / _count(members)
    return {k: task_sum(_masked(v * w, members)) for k, v in x.items()}


def task_arithmetic(x: Block, members=None, *, scale=1.0) -> Block:
    r"""Task arithmetic as the reference implements it: :math:`\lambda\cdot` mean.

    ``scale`` (:math:`\lambda`) multiplies the **mean** of the group's task
    vectors. The sum convention (:math:`\alpha\sum_k\tau_k`) corresponds to
    ``scale = alpha * m`` for a group of m tasks.

    Returns:
      ``{name: f32[...]}``.
    """
    s = jnp.asarray(scale, jnp.float32)
    return {k: s * v for k, v in average(x, members).items()}


def _majority(colsigns) -> jax.Array:
    """The block's fallback sign for zero column sums: the sign of the sum
    of the column signs over all its tensors, ``+1`` if that is 0."""
    total = sum(jnp.sum(s, dtype=jnp.float32) for s in colsigns)
    return jnp.where(total < 0, jnp.float32(-1), jnp.float32(1))


def _elected_sign(x: Block, members: jax.Array) -> Block:
    colsign = {k: jnp.sign(task_sum(_masked(v, members))) for k, v in x.items()}
    majority = _majority(colsign.values())
    return {k: jnp.where(s == 0, majority, s) for k, s in colsign.items()}


def _elected_entries(v: jax.Array, sign: jax.Array, members: jax.Array):
    """Yields, task by task, ``(entries, keep)``: member ``i``'s entries with
    exactly the elected ``sign`` (``+-1``; others 0) and the ``bool`` mask.

    Folding these rows (rather than building ``[n, ...]`` masks and reducing
    them) lets XLA compute every output entry in one fused pass over ``v``:
    a shared ``[n, ...]`` mask would be materialized for its two reductions.
    """
    for i in range(v.shape[0]):
        vi = jnp.where(members[i], v[i], jnp.zeros((), v.dtype))
        keep = jnp.where(sign > 0, vi > 0, vi < 0)
        yield jnp.where(keep, vi, jnp.zeros((), v.dtype)), keep


def _elected_mean(v: jax.Array, sign: jax.Array, members: jax.Array) -> jax.Array:
    """Disjoint mean: the members' entries with the elected sign, summed in
    task order, over their count (at least 1)."""
    total = count = None
    for sel, keep in _elected_entries(v, sign, members):
        c = keep.astype(jnp.float32)
        total, count = (sel, c) if total is None else (total + sel, count + c)
    return total / jnp.maximum(count, 1.0)


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
    members = _members(x, members)
    parts = jax.lax.optimization_barrier(
        {k: _signed_means(v, members) for k, v in x.items()})
    majority = _majority(sg for sg, _, _ in parts.values())
    s = jnp.asarray(scale, jnp.float32)
    return {k: s * jnp.where(jnp.where(sg == 0, majority, sg) > 0, mp, mn)
            for k, (sg, mp, mn) in parts.items()}


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
    members = _members(x, members)
    c = jnp.asarray(consensus, jnp.float32)
    return {
        k: (jnp.abs(v) > c * jnp.abs(merged[k][None] - v)) & _bcast(members, v)
        for k, v in x.items()
    }


class EmrResult(NamedTuple):
    """EMR output: unified vector, per-task boolean masks and rescalers."""

    unified: Block  # {name: f32[...]}
    masks: Block  # {name: bool[n, ...]} (False for non-members)
    rescalers: jax.Array  # f32[n] (1 for non-members)


def emr(x: Block, members=None) -> EmrResult:
    r"""EMR-Merging of a group, with the reference's per-block rescalers.

    Per tensor :math:`\ell`: :math:`\mu=\mathrm{mean}_k x_k`, flag
    :math:`=+1` where :math:`\mu>0` else :math:`-1`;
    :math:`M_k=[x_k\cdot\mathrm{flag}>0]`;
    :math:`v=\mathrm{flag}\cdot\max_k|M_k x_k|`. Rescaler
    :math:`\gamma_k=\sum_\ell\mathrm{mean}|x_k[\ell]| /
    \sum_\ell\mathrm{mean}|v[\ell]\odot M_k[\ell]|` — a sum over the block's
    tensors of per-tensor means (the reference's quirk; the original EMR uses
    whole-model sums). Deployed: :math:`\theta_0+\gamma_k M_k\odot v`.

    Where the denominator is 0 (task vector zero on the block, e.g. a frozen
    layer) the reference yields NaN parameters; the rescaler is 1 here.

    Returns:
      :class:`EmrResult` with ``unified`` ``{name: f32[...]}``, ``masks``
      ``{name: bool[n, ...]}`` and ``rescalers`` ``f32[n]``.
    """
    members = _members(x, members)
    m = _count(members)
    unified, masks = {}, {}
    num = None
    den = None
    for k, v in x.items():
        vm = _masked(v, members)
        mu = task_sum(vm) / m
        flag = jnp.where(mu > 0, jnp.float32(1), jnp.float32(-1))
        mk = ((v * flag[None]) > 0) & _bcast(members, v)
        u = flag * task_max(jnp.abs(jnp.where(mk, v, 0.0)))
        unified[k], masks[k] = u, mk
        red = tuple(range(1, v.ndim))
        a = jnp.mean(jnp.abs(v), axis=red) if red else jnp.abs(v)
        b = jnp.mean(jnp.abs(jnp.where(mk, u[None], 0.0)), axis=red) if red else jnp.abs(
            jnp.where(mk, u[None], 0.0)
        )
        num = a if num is None else num + a
        den = b if den is None else den + b
    # den == 0 (the task's mask selects nothing, e.g. a frozen, all-zero
    # block): the reference divides by zero and deploys NaN; M_k * v is 0
    # there whatever the rescaler, so we use 1 (deliberate deviation).
    ok = members & (den > 0)
    rescalers = jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.float32(1))
    return EmrResult(unified, masks, rescalers)


def _minmax(a, lo, hi):
    """``(a - lo) / (hi - lo)``, 0 where ``hi == lo`` (the reference: NaN)."""
    span = hi - lo
    ok = span > 0
    return jnp.where(ok, (a - lo) / jnp.where(ok, span, 1.0), 0.0)


def _minmax_sq(a, lo, hi):
    return jnp.square(_minmax(a, lo, hi))


def pcb_merge(
    x: Block,
    members=None,
    *,
    clip_lo: jax.Array,
    clip_hi: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    scale=1.0,
) -> Block:
    r"""PCB-Merging as the reference's ``pcb_merging(trim=False)``.

    Args:
      x: ``{name: f32[n, ...]}`` task vectors of one block.
      members: ``bool[n]`` group mask.
      clip_lo, clip_hi: ``f32[n]`` per-task order statistics of :math:`|x_k|`
        over this block at indices ``int(d*1e-4)`` and
        ``int(d*(1-1e-4)-1)`` (:func:`flexmerge_jax.prep.pcb_clip_bounds`);
        they depend on the task only, not on the group.
      lo, hi: ``f32[n]`` the global per-task thresholds of
        :func:`flexmerge_jax.prep.pcb_thresholds` (whole model, all tasks).
      scale: :math:`\lambda`.

    With :math:`A_k=\mathrm{clip}(|x_k|, \mathrm{clip\_lo}_k,
    \mathrm{clip\_hi}_k)`, self :math:`=\mathrm{minmax}(A_k)^2`,
    :math:`P_k = e^{m\cdot\mathrm{self}}\tanh(x_k\odot\sum_{k'}x_{k'})`
    (m = group size), :math:`s_k=\mathrm{minmax}(\mathrm{clip}(P_k, lo_k,
    hi_k))` over the block, :math:`v=\lambda\sum_k s_k\,\mathrm{sign}(x_k)A_k
    / \max(\sum_k s_k, 10^{-12})`. A constant clipped :math:`P_k` gives NaN,
    as in the reference.

    Returns:
      ``{name: f32[...]}``.
    """
    members = _members(x, members)
    m = _count(members)
    colsum = {k: task_sum(_masked(v, members)) for k, v in x.items()}
    P, Xc = {}, {}
    for k, v in x.items():
        cl, ch = _bcast(clip_lo, v), _bcast(clip_hi, v)
        a = jnp.clip(jnp.abs(v), cl, ch)
        Xc[k] = jnp.sign(v) * a
        selfp = _minmax_sq(a, cl, ch)
        p = jnp.exp(m * selfp) * jnp.tanh(v * colsum[k][None])
        P[k] = jnp.clip(p, _bcast(lo, v), _bcast(hi, v))
    red = lambda t, f: f(t, axis=tuple(range(1, t.ndim)))  # no reshape: sharding-safe
    pmin = jnp.min(jnp.stack([red(p, jnp.min) for p in P.values()]), axis=0)
    pmax = jnp.max(jnp.stack([red(p, jnp.max) for p in P.values()]), axis=0)
    s = jnp.asarray(scale, jnp.float32)
    out = {}
    for k, v in x.items():
        sc = _minmax(P[k], _bcast(pmin, v), _bcast(pmax, v))
        num = task_sum(_masked(Xc[k] * sc, members))
        den = task_sum(_masked(sc, members))
        out[k] = s * (num / jnp.maximum(den, jnp.float32(1e-12)))
    return out
