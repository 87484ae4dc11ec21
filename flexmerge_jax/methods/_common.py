r"""Pieces the method modules share.

Kernel contract. Every kernel takes ``x``, a dict ``{parameter name: f32[n, ...]}``
holding the (preprocessed) task vectors of the n tasks restricted to one
block, and ``members``, a ``bool[n]`` mask selecting the group to merge
(``None`` = all n tasks). Shapes never depend on the group, so one
compilation serves every group of a block and the kernels ``vmap`` over
groups. Kernels are plain functions (the caller jits them, so outer jits can
fuse). Hyperparameters are keyword arguments and may be traced scalars;
behaviour switches are static Python values.

Numerics. The reference's kernels are mirrored operation by operation in
float32, including the summation order over tasks (sequential in ascending
task index, as the reference's Python ``sum`` and torch reductions over the
task axis do: :func:`task_sum`), so that discrete decisions (elected signs,
masks on the consensus boundary) agree with it. Products of SVD factors use
``Precision.HIGHEST`` (TF32/bf16 matmuls on accelerators would cost 3
decimal digits). Counts derived from fractions (:func:`floor_count`) are
exact (float64 ``int(count * frac)``, as Python/FusionBench/mergekit do)
when the fraction is a Python number, and float32 with a ``1e-6`` relative
guard when it is traced (so that ``0.7 -> 0.69999999`` does not lose one).
The two can differ by one when the float64 product falls just below an
integer: ``int(100 * 0.29)`` is 28 while the guarded float32 path gives 29.

Also here: the hyperparameter checks that accept tracers (:func:`numeric`,
:func:`static_number`, :func:`fraction`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ._contract import is_traced

Block = dict  # {parameter name: f32[n, ...]}
GRANULARITIES = ("tensor", "node")
HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- hyperparameters


def numeric(name: str, v):
    """A numeric hyperparameter: a Python number (checked finite, as
    ``float``) or an array/tracer (``jax.typing.ArrayLike``, kept as is)."""
    if is_traced(v) or isinstance(v, jax.Array):
        return v
    return _finite(name, v, "a number or an array")


def static_number(name: str, v, method: str, why: str) -> float:
    """A hyperparameter that must be a Python number (``why`` says why)."""
    if is_traced(v) or isinstance(v, jax.Array) and v.ndim:
        raise ValueError(f"{method}: {name} must be a Python number, not an array ({why})")
    return _finite(name, v, "a number")


def _finite(name: str, v, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def fraction(name: str, v, method: str, why: str, lo_open=False) -> float:
    """A static fraction in ``[0, 1]`` (``(0, 1]`` with ``lo_open``)."""
    f = static_number(name, v, method, why)
    if not (0.0 < f if lo_open else 0.0 <= f) or f > 1.0:
        raise ValueError(f"{name} must be in {'(0' if lo_open else '[0'}, 1], got {v}")
    return f


# --------------------------------------------------------------------------- groups and sums


def per_task(v: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-task vector ``[n]`` to broadcast against ``x [n, ...]``."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def as_members(x: Block, members) -> jax.Array:
    n = next(iter(x.values())).shape[0]
    if members is None:
        return jnp.ones((n,), bool)
    return jnp.asarray(members, bool)


def n_tasks(x: Block) -> int:
    return next(iter(x.values())).shape[0]


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


def mask_members(x: jax.Array, members: jax.Array) -> jax.Array:
    return jnp.where(per_task(members, x), x, jnp.zeros((), x.dtype))


def member_count(members: jax.Array) -> jax.Array:
    return jnp.sum(members, dtype=jnp.int32).astype(jnp.float32)


def member_count_i32(members: jax.Array) -> jax.Array:
    return jnp.sum(members, dtype=jnp.int32)


def group_mean(x: Block, members=None) -> Block:
    r"""Mean of the group's task vectors (reference ``state_dict_avg``).

    Args:
      x: ``{name: f32[n, ...]}`` task vectors of one block.
      members: ``bool[n]`` group mask (``None``: all tasks).

    Returns:
      ``{name: f32[...]}`` — :math:`\sum_k \mathrm{fl}(w x_k)`,
      :math:`w=\mathrm{fl}_{32}(1/m)`, summed in task order.
    """
    members = as_members(x, members)
    w = jnp.float32(1.0) / member_count(members)
    return {k: task_sum(mask_members(v * w, members)) for k, v in x.items()}


# --------------------------------------------------------------------------- sign election


def block_majority(colsigns) -> jax.Array:
    """The block's fallback sign for zero column sums: the sign of the sum
    of the column signs over all its tensors, ``+1`` if that is 0.

    Counted in int32, exactly: a float32 sum of signs is exact only up to
    2^24 entries, past which the result depended on how the block's
    tensors were split and summed (a flat-row cut, :mod:`flexmerge_jax._flat`,
    sums them as one tensor)."""
    total = sum(jnp.sum(s.astype(jnp.int32), dtype=jnp.int32) for s in colsigns)
    return jnp.where(total < 0, jnp.float32(-1), jnp.float32(1))


def elected_sign(x: Block, members: jax.Array) -> Block:
    colsign = {k: jnp.sign(task_sum(mask_members(v, members))) for k, v in x.items()}
    majority = block_majority(colsign.values())
    return {k: jnp.where(s == 0, majority, s) for k, s in colsign.items()}


def elected_entries(v: jax.Array, sign: jax.Array, members: jax.Array):
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


def elected_mean(v: jax.Array, sign: jax.Array, members: jax.Array) -> jax.Array:
    """Disjoint mean: the members' entries with the elected sign, summed in
    task order, over their count (at least 1)."""
    total = count = None
    for sel, keep in elected_entries(v, sign, members):
        c = keep.astype(jnp.float32)
        total, count = (sel, c) if total is None else (total + sel, count + c)
    return total / jnp.maximum(count, 1.0)


# --------------------------------------------------------------------------- counts and ranks


def is_python_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def floor_count(total: int, frac) -> jax.Array:
    """``floor(total * frac)`` as int32 (see the module docstring, "Numerics")."""
    if is_python_number(frac):
        return jnp.int32(int(total * float(frac)))
    v = jnp.float32(total) * jnp.asarray(frac, jnp.float32)
    return jnp.floor(v + jnp.abs(v) * jnp.float32(1e-6)).astype(jnp.int32)


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def rank_within(a: jax.Array, granularity: str) -> tuple[jax.Array, int]:
    """Ascending ranks (0-based, ties by position) of ``a [n, ...]`` within each ranking group.

    ``"tensor"``: one group per task; ``"node"``: one group per task and last-axis index (for
    per-task ndim >= 2). Returns ``(int32 ranks shaped like a, group size N)``.
    """
    n = a.shape[0]
    if granularity == "tensor" or a.ndim <= 2:
        flat = a.reshape(n, -1)
    else:
        flat = a.reshape(n, -1, a.shape[-1])
    order = jnp.argsort(flat, axis=1, stable=True).astype(jnp.int32)
    # The ranks are the inverse permutation of ``order``: one scatter, not
    # a second sort (sorting dominates these kernels on CPU).
    ranks = jnp.broadcast_to(
        jnp.arange(flat.shape[1], dtype=jnp.int32).reshape((1, -1) + (1,) * (flat.ndim - 2)),
        flat.shape)
    rank = jnp.put_along_axis(jnp.zeros_like(order), order, ranks, axis=1, inplace=False)
    return rank.reshape(a.shape), flat.shape[1]


# --------------------------------------------------------------------------- matrices (SVD methods)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=HIGHEST)


def is_matrix(name: str, v: jax.Array, exclude) -> bool:
    return v.ndim == 3 and name not in exclude


def check_exclude(exclude) -> tuple:
    if isinstance(exclude, str):
        raise ValueError("exclude is a collection of parameter names, not one string")
    return tuple(exclude)


def matrices_else_mean(x: Block, members, s, exclude, merge_matrix) -> Block:
    """``merge_matrix(name, v)`` for every matrix leaf (``v: f32[n, a, b]``);
    ``s`` times the members' mean for the others (and names in ``exclude``)."""
    exclude = check_exclude(exclude)
    rest = {k: v for k, v in x.items() if not is_matrix(k, v, exclude)}
    mean = group_mean(rest, members) if rest else {}
    return {k: s * mean[k] if k in mean else merge_matrix(k, v) for k, v in x.items()}


def group_slots(members: jax.Array, width, r: int):
    """Fixed-width layout of the concatenation of ``width`` components per member.

    Slot ``c`` in ``[0, r)`` holds component ``j = c mod width`` of the ``p``-th member
    (``p = c div width``, members in task order); it is valid iff ``width > 0`` and ``p < m``.
    Returns ``(task int32[r], j int32[r], valid bool[r])``.
    """
    n = members.shape[0]
    csum = jnp.cumsum(members.astype(jnp.int32))
    m = csum[-1]
    width = jnp.asarray(width, jnp.int32)
    c = jnp.arange(r, dtype=jnp.int32)
    w = jnp.maximum(width, 1)
    p = c // w
    j = c - p * w
    task = jnp.clip(jnp.searchsorted(csum, p + 1, side="left"), 0, n - 1).astype(jnp.int32)
    valid = (width > 0) & (p < m)
    return task, j, valid


def gather_components(U, S, Vh, task, j, valid):
    """``U[task_c, :, j_c]``, ``S[task_c, j_c]``, ``Vh[task_c, j_c, :]`` for every slot c."""
    Ug = jnp.where(valid[:, None], U[task, :, j], 0.0).T  # [a, r]
    Sg = jnp.where(valid, S[task, j], 0.0)  # [r]
    Vg = jnp.where(valid[:, None], Vh[task, j, :], 0.0)  # [r, b]
    return Ug, Sg, Vg


def polar_factor(a: jax.Array) -> jax.Array:
    r"""Orthogonal polar factor :math:`PQ^\top` of :math:`a = P\Sigma Q^\top` (thin SVD).

    Zero columns (unused slots) do not change the factor's other columns when those are
    linearly independent: the right singular vectors of the zero singular values then span
    exactly the zero columns' coordinates.
    """
    P, _, Qh = jnp.linalg.svd(a, full_matrices=False)
    return matmul(P, Qh)
