r"""PCB-Merging with the reference's global per-task thresholds.

The method's three parts, all here: :func:`pcb_thresholds` (whole-model
per-task thresholds, the method's ``prepare``), :func:`pcb_clip_bounds`
(per-block order statistics, its ``block_state``) and :func:`pcb_merge`
(the reference's ``pcb_merging(trim=False)``). The order statistics come from
the exact radix select of :mod:`flexmerge_jax.stats.order`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..stats.order import Leaves, kth_smallest, leaf_iter
from ._common import (
    Block,
    as_members,
    fraction,
    mask_members,
    member_count,
    numeric,
    per_task,
    task_sum,
)
from ._contract import GroupMerge, Method, Traits


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
        ``int(d*(1-1e-4)-1)`` (:func:`pcb_clip_bounds`);
        they depend on the task only, not on the group.
      lo, hi: ``f32[n]`` the global per-task thresholds of
        :func:`pcb_thresholds` (whole model, all tasks).
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
    members = as_members(x, members)
    m = member_count(members)
    colsum = {k: task_sum(mask_members(v, members)) for k, v in x.items()}
    P, Xc = {}, {}
    for k, v in x.items():
        cl, ch = per_task(clip_lo, v), per_task(clip_hi, v)
        a = jnp.clip(jnp.abs(v), cl, ch)
        Xc[k] = jnp.sign(v) * a
        selfp = _minmax_sq(a, cl, ch)
        p = jnp.exp(m * selfp) * jnp.tanh(v * colsum[k][None])
        P[k] = jnp.clip(p, per_task(lo, v), per_task(hi, v))
    red = lambda t, f: f(t, axis=tuple(range(1, t.ndim)))  # no reshape: sharding-safe
    pmin = jnp.min(jnp.stack([red(p, jnp.min) for p in P.values()]), axis=0)
    pmax = jnp.max(jnp.stack([red(p, jnp.max) for p in P.values()]), axis=0)
    s = jnp.asarray(scale, jnp.float32)
    out = {}
    for k, v in x.items():
        sc = _minmax(P[k], per_task(pmin, v), per_task(pmax, v))
        num = task_sum(mask_members(Xc[k] * sc, members))
        den = task_sum(mask_members(sc, members))
        out[k] = s * (num / jnp.maximum(den, jnp.float32(1e-12)))
    return out


def _pcb_indices(d: int) -> tuple[int, int]:
    # The reference's clamp(x, min_ratio=0.0001, max_ratio=0.0001) indices,
    # with its Python float arithmetic reproduced exactly.
    return int(d * 0.0001), int(d * (1 - 0.0001) - 1)


def pcb_clip_bounds(leaves: Leaves, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-task order statistics of ``|x|`` used by PCB's clamp.

    Args:
      leaves: task-vector leaves ``f32[n, ...]`` (one block, or the model).
      d: their total number of entries per task.

    Returns:
      ``(lo, hi)``, ``f32[n]`` each: the values at sorted indices
      ``int(d*1e-4)`` and ``int(d*(1-1e-4)-1)`` of each task's ``|x|``.
    """
    i_lo, i_hi = _pcb_indices(d)
    first = next(iter(leaf_iter(leaves)))
    n = first.shape[0]
    lo = kth_smallest(leaves, np.full(n, i_lo + 1), magnitude=True)
    hi = kth_smallest(leaves, np.full(n, i_hi + 1), magnitude=True)
    return lo, hi


@jax.jit
def _pcb_scores(x, colsum, clip_lo, clip_hi):
    n = x.shape[0]
    b = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))
    a = jnp.clip(jnp.abs(x), b(clip_lo), b(clip_hi))
    selfp = _minmax_sq(a, b(clip_lo), b(clip_hi))  # 0 for a constant row (ref: NaN)
    return jnp.exp(jnp.float32(n) * selfp) * jnp.tanh(x * colsum[None])


def pcb_thresholds(leaves: Leaves, keep: float, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's global per-task PCB thresholds (``sparsify_pcb``).

    Over the whole model and all n tasks: :math:`A` = ``|T|`` clipped per
    task to :func:`pcb_clip_bounds`; self = minmax(A)^2; :math:`P =
    e^{n\\cdot\\mathrm{self}}\\tanh(T\\odot\\mathrm{colsum}(T))`; per task
    ``lo = sorted(P)[int(d*keep)]`` (``keep`` used as a *drop* fraction,
    the reference's quirk) and ``hi = max(P)``.

    Returns:
      ``(lo, hi)``, ``f32[n]`` each.
    """
    clip_lo, clip_hi = pcb_clip_bounds(leaves, d)
    cl, ch = jnp.asarray(clip_lo), jnp.asarray(clip_hi)
    colsum = jax.jit(task_sum)

    def scores():
        for x in leaf_iter(leaves):
            yield _pcb_scores(x, colsum(x), cl, ch)

    first = next(iter(leaf_iter(leaves)))
    n = first.shape[0]
    lo = kth_smallest(scores, np.full(n, int(d * keep) + 1), signed=True)
    hi = kth_smallest(scores, np.full(n, d), signed=True)
    return lo, hi


def _prepare(leaves, total, *, keep):
    """Whole-model per-task thresholds ``(lo, hi)`` (:func:`pcb_thresholds`)."""
    return pcb_thresholds(leaves, keep, total)


def _block_state(x, info, *, keep):
    del keep
    clo, chi = pcb_clip_bounds(list(x.values()), info.numel)
    lo, hi = info.prepared
    return {"clip_lo": jnp.asarray(clo), "clip_hi": jnp.asarray(chi),
            "lo": jnp.asarray(lo), "hi": jnp.asarray(hi)}


def _merge(x, members, state, *, scale, keep):
    del keep
    if state is None:
        raise ValueError("pcb needs its thresholds (extra=...)")
    return GroupMerge(pcb_merge(x, members, scale=scale, **state), None, None)


def pcb(scale=1.0, keep: float = 0.2) -> Method:
    r"""PCB-Merging with the reference's global per-task thresholds.

    Args:
      scale: :math:`\lambda`; ``jax.typing.ArrayLike`` (traceable).
      keep: in (0, 1); the reference uses it as the fraction of sorted
        whole-model scores below the lower clamp threshold (a *drop*
        fraction, inconsistent with PCB's own trim — reproduced as is).
        Static: it fixes an order statistic.

    The thresholds are host order statistics over the whole model, so
    ``fm.merge`` with PCB is not traceable in its inputs (``scale`` is,
    given the thresholds).

    References:
      Du et al., Parameter Competition Balancing for Model Merging,
      NeurIPS 2024.
    """
    scale = numeric("scale", scale)
    keep = fraction("keep", keep, "pcb", "it fixes an order statistic", lo_open=True)
    if keep >= 1.0:
        raise ValueError(
            "pcb needs keep < 1 (its thresholds use keep as a fraction of "
            "sorted scores; the reference asserts on keep = 1)"
        )
    return Method("pcb", _merge, numeric=(("scale", scale),), static=(("keep", keep),),
                  traits=Traits(tunable=True, keep_block_state=True),
                  block_state=_block_state, prepare=_prepare, builtin=True)
