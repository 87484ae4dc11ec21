r"""Merge kernels beyond the FlexMerge reference: TSV-M, Iso-C/Iso-CTS, Breadcrumbs, DELLA,
MagMax, Model Stock, SLERP, the "sum" task-arithmetic convention and TIES with
``merge_func`` in {mean, sum, max}.

The contract is the one of :mod:`flexmerge_jax.kernels`: every kernel takes ``x``, a dict
``{parameter name: f32[n, ...]}`` of the task vectors :math:`\tau_i=\theta_i-\theta_0` of all
n tasks restricted to one block, and ``members``, a ``bool[n]`` mask selecting the group
(``None`` = all n tasks). It returns ``{name: f32[...]}``, the merged task vector (without
:math:`\theta_0`). Shapes never depend on the group: group-dependent concatenations (TSV-M,
Iso-CTS) are laid out in a fixed-width buffer by a fixed-shape gather driven by the member
ranks (``cumsum(members)``), so one compilation serves every group of a block and every kernel
``vmap``\ s over groups. Hyperparameters are keyword arguments and may be traced scalars;
behaviour switches (``merge_func``, ``granularity``, ``angle_average``, ``exclude``, ``k=None``)
are static Python values. Randomness (DELLA) only comes from an explicit ``key``. The group
size :math:`m=\sum_i \mathrm{members}_i` may be traced.

Parameter layout. "Matrices" are the parameters whose per-task value is 2-D (``x[name].ndim
== 3``) and whose name is not in ``exclude``; the SVD-based methods (TSV-M, Iso-C, Iso-CTS) are
transpose-equivariant, so Flax ``[in, out]`` kernels and torch ``[out, in]`` weights give
transposed results. Higher-rank kernels (conv, ``DenseGeneral``) are *not* matrices here: reshape
them to 2-D before merging if they should be treated as such (FusionBench only sees the 2-D
torch ``Linear`` weights). The magnitude-ranking methods (Breadcrumbs, DELLA) have a
``granularity``: ``"tensor"`` ranks over the whole tensor, ``"node"`` ranks, for every output
unit ``j``, the entries ``tau[..., j]`` (over all axes but the last: the Flax ``[in, out]``
layout; this is the row-wise ranking of a torch ``[out, in]`` weight). 0-D/1-D parameters are
ranked as one group either way.

Numerics. Products of SVD factors use ``Precision.HIGHEST`` (TF32/bf16 matmuls on
accelerators would cost 3 decimal digits). Group sums use :func:`kernels.task_sum`
(sequential, task order) and group means :func:`kernels.average`, as the reference kernels do.
Counts derived from fractions (Iso-CTS's common-space size, Breadcrumbs' cut-offs) are computed
exactly (float64 ``int(count * frac)``, as Python/FusionBench/mergekit do) when the fraction is
a Python number, and in float32 with a ``1e-6`` relative guard when it is traced (so that
``0.7 -> 0.69999999`` does not lose one). The two paths can differ by one when the float64
product falls just below an integer: ``int(100 * 0.29)`` is 28 (``28.999999999999996``) while
the guarded float32 path gives 29.

Per-method choices between the papers and FusionBench are listed in each docstring under
"Choices"; the summary:

* ``tsv_merge``: FusionBench = paper (``k = floor(r/m)``, polar factors via SVD); non-matrix
  parameters: mean (FusionBench). Optional ``k`` is clipped to ``floor(r/m)``.
* ``iso_c`` / ``iso_cts``: FusionBench = paper for matrices (Iso-C flattens the spectrum of the
  **sum**); non-matrix parameters: mean (FusionBench); FusionBench's rounding of the
  task-specific size is kept, and clamped where FusionBench would crash (tiny ``r``).
* ``breadcrumbs``: FusionBench has no Breadcrumbs. Sum convention, whole-tensor ranking (paper,
  mergekit); the authors' code ranks each row (``granularity="node"``).
* ``della``: FusionBench has none. Authors' code (declare-lab/della) followed: rank-linear keep
  probabilities ``[density-eps, density+eps]`` per node, rescale by ``1/p_keep`` (the paper's
  :math:`1/(1-p_i)`; upstream mergekit rescales by the L1 norm instead), sign election with
  ``sum >= 0 -> +``, disjoint mean, then ``scale``.
* ``magmax``: FusionBench = official code: ties go to the later task.
* ``model_stock``: FusionBench (angle averaged over the pairs for m > 2) without its ``1e-8``;
  ``angle_average="cosine"`` averages cosines instead (mergekit's choice, per tensor here).
* ``slerp``: FusionBench/mergekit (lerp above ``|cos| > 0.9995``, no normalisation below
  ``eps``); on task vectors by default, on full weights with ``base=``.
* ``task_arithmetic_sum``: FusionBench/mergekit convention :math:`\alpha\sum_i\tau_i`.
* ``ties_disjoint_merge``: FusionBench's ``disjoint_merge`` for ``merge_func`` in {sum, max};
  ``mean`` is exactly :func:`kernels.ties_merge`. The zero-sign fallback is the reference's
  block majority (+1 if that is 0), not FusionBench's whole-model majority (which stays 0 when
  the majority is 0).

References:
  Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025
  (arXiv:2412.00081).
  Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
  Subspaces, ICML 2025 (arXiv:2502.04959).
  Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks,
  ECCV 2024 (arXiv:2312.06795).
  Deep, Bhardwaj & Poria, DELLA-Merging: Reducing Interference in Model Merging through
  Magnitude-Based Sampling, 2024 (arXiv:2406.11617).
  Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual Learning, ECCV 2024
  (arXiv:2407.06322).
  Jang, Yun & Han, Model Stock: All we need is just a few fine-tuned models, ECCV 2024
  (arXiv:2403.19522).
  Shoemake, Animating rotation with quaternion curves (SLERP), SIGGRAPH 1985.
  Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089).
  Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708).
  Tang et al., FusionBench, 2024 (arXiv:2406.03280).
"""

from __future__ import annotations

import functools
import zlib
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from .kernels import (
    Block, _elected_sign, _masked, _members, average, _elected_entries, _elected_mean, task_sum,
    ties_merge,
)

__all__ = [
    "tsv_merge",
    "task_svd",
    "iso_c",
    "iso_cts",
    "breadcrumbs",
    "breadcrumbs_masks",
    "della",
    "della_noise",
    "magprune",
    "della_fuse",
    "magmax",
    "model_stock",
    "model_stock_ratio",
    "slerp",
    "task_arithmetic_sum",
    "ties_disjoint_merge",
    "GRANULARITIES",
]

GRANULARITIES = ("tensor", "node")
_HI = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- helpers


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HI)


def _n_tasks(x: Block) -> int:
    return next(iter(x.values())).shape[0]


def _icount(members: jax.Array) -> jax.Array:
    return jnp.sum(members, dtype=jnp.int32)


def _is_python_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _floor_count(total: int, frac) -> jax.Array:
    """``floor(total * frac)`` as int32 (see the module docstring, "Numerics")."""
    if _is_python_number(frac):
        return jnp.int32(int(total * float(frac)))
    v = jnp.float32(total) * jnp.asarray(frac, jnp.float32)
    return jnp.floor(v + jnp.abs(v) * jnp.float32(1e-6)).astype(jnp.int32)


def _is_matrix(name: str, v: jax.Array, exclude) -> bool:
    return v.ndim == 3 and name not in exclude


def _check_exclude(exclude) -> tuple:
    if isinstance(exclude, str):
        raise ValueError("exclude is a collection of parameter names, not one string")
    return tuple(exclude)


def _matrices_else_mean(x: Block, members, s, exclude, merge_matrix) -> Block:
    """``merge_matrix(name, v)`` for every matrix leaf (``v: f32[n, a, b]``);
    ``s`` times the members' mean for the others (and names in ``exclude``)."""
    exclude = _check_exclude(exclude)
    rest = {k: v for k, v in x.items() if not _is_matrix(k, v, exclude)}
    mean = average(rest, members) if rest else {}
    return {k: s * mean[k] if k in mean else merge_matrix(k, v) for k, v in x.items()}


def _group_slots(members: jax.Array, width, r: int):
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


def _gather_components(U, S, Vh, task, j, valid):
    """``U[task_c, :, j_c]``, ``S[task_c, j_c]``, ``Vh[task_c, j_c, :]`` for every slot c."""
    Ug = jnp.where(valid[:, None], U[task, :, j], 0.0).T  # [a, r]
    Sg = jnp.where(valid, S[task, j], 0.0)  # [r]
    Vg = jnp.where(valid[:, None], Vh[task, j, :], 0.0)  # [r, b]
    return Ug, Sg, Vg


def _polar(a: jax.Array) -> jax.Array:
    r"""Orthogonal polar factor :math:`PQ^\top` of :math:`a = P\Sigma Q^\top` (thin SVD).

    Zero columns (unused slots) do not change the factor's other columns when those are
    linearly independent: the right singular vectors of the zero singular values then span
    exactly the zero columns' coordinates.
    """
    P, _, Qh = jnp.linalg.svd(a, full_matrices=False)
    return _mm(P, Qh)


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _ranks(a: jax.Array, granularity: str) -> tuple[jax.Array, int]:
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


# --------------------------------------------------------------------------- TSV-M


def task_svd(x: Block, *, exclude=()) -> dict:
    """Per-task thin SVDs of the block's matrices (group-independent; hoist them out of a vmap).

    Returns:
      ``{name: (U f32[n, a, r], S f32[n, r], Vh f32[n, r, b])}`` for every matrix parameter.
    """
    exclude = _check_exclude(exclude)
    return {
        k: tuple(jnp.linalg.svd(v, full_matrices=False))
        for k, v in x.items()
        if _is_matrix(k, v, exclude)
    }


def tsv_merge(x: Block, members=None, *, scale=1.0, k=None, exclude=(), svd=None) -> Block:
    r"""TSV-M (Task Singular Vectors: Merge) of a group.

    For each matrix :math:`\tau_i\in\mathbb{R}^{a\times b}` (:math:`r=\min(a,b)`) with thin SVD
    :math:`\tau_i=U_i\Sigma_iV_i^\top`, every member keeps its top :math:`k` triplets
    (:math:`k=\lfloor r/m\rfloor`); the truncated factors are concatenated,
    :math:`U=[U_{1,:k},\dots,U_{m,:k}]`, :math:`\Sigma=\mathrm{diag}(\Sigma_{1,:k},\dots)`,
    :math:`V=[V_{1,:k},\dots]`, orthogonalised by their polar factors
    (:math:`U=P\,S\,Q^\top\Rightarrow U_\perp=PQ^\top`, likewise :math:`V_\perp`), and

    .. math:: \Delta = \alpha\,U_\perp\,\Sigma\,V_\perp^\top.

    Non-matrix parameters (and names in ``exclude``): :math:`\alpha\cdot` mean of the group.

    Args:
      x: ``{name: f32[n, ...]}`` task vectors of one block.
      members: ``bool[n]`` group mask (``None``: all tasks).
      scale: :math:`\alpha` (FusionBench ``alpha``; the paper uses 1.0). May be traced.
      k: triplets kept per member; ``None`` (the paper) is :math:`\lfloor r/m\rfloor`. An
        explicit ``k`` (int, may be traced) is clipped to :math:`\lfloor r/m\rfloor` so the
        concatenation never exceeds :math:`r` columns.
      exclude: static collection of parameter names merged by the mean (FusionBench's
        ``exclude_keys``).
      svd: optional :func:`task_svd` output for ``x`` (the per-task SVDs do not depend on the
        group; pass them to avoid recomputing them for every group under ``vmap``).

    Returns:
      ``{name: f32[...]}``.

    Layout: the concatenation is a fixed ``[a, r]`` buffer (member of rank p fills columns
    ``[p k, (p+1) k)``, the rest is zero), exactly FusionBench's layout; the zero columns do not
    change the polar factor of the filled ones (see ``_polar``).

    Choices: FusionBench's ``compute_and_sum_svd_mem_reduction`` and the paper agree on the
    algorithm; we follow both. With ``r < m`` every member keeps 0 triplets (``k = 0``) and
    the merged matrix is 0, as in FusionBench. Non-matrix parameters: the mean (FusionBench;
    the paper only defines TSV-M for matrices).

    References:
      Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv:2412.00081).
    """
    members = _members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    m1 = jnp.maximum(_icount(members), 1)

    def merge_matrix(name, v):
        if svd is not None and name in svd:
            U, S, Vh = svd[name]
        else:
            U, S, Vh = jnp.linalg.svd(v, full_matrices=False)
        r = S.shape[-1]
        width = jnp.int32(r) // m1
        if k is not None:
            width = jnp.minimum(jnp.asarray(k, jnp.int32), width)
        task, j, valid = _group_slots(members, width, r)
        Uc, Sc, Vc = _gather_components(U, S, Vh, task, j, valid)
        return s * _mm(_polar(Uc) * Sc[None, :], _polar(Vc))

    return _matrices_else_mean(x, members, s, exclude, merge_matrix)


# --------------------------------------------------------------------------- Iso-C / Iso-CTS


def iso_c(x: Block, members=None, *, scale=1.0, exclude=()) -> Block:
    r"""Iso-C: isotropic merging in the common subspace.

    For each matrix, :math:`\Delta_{TA}=\sum_{i\in G}\tau_i=U\Sigma V^\top` (the **sum**, not the
    mean) and the spectrum is flattened to its mean,

    .. math:: \Delta=\alpha\,\bar\sigma\,UV^\top,\qquad \bar\sigma=\tfrac1r\sum_{j=1}^r\sigma_j,

    over all :math:`r=\min(a,b)` singular values (zeros included). Non-matrix parameters:
    :math:`\alpha\cdot` mean.

    Args:
      x: ``{name: f32[n, ...]}``; members: ``bool[n]`` (``None``: all).
      scale: :math:`\alpha` (FusionBench ``scaling_factor``, default 1.0 there). May be traced.
      exclude: static names merged by the mean.

    Returns:
      ``{name: f32[...]}``. A single task is *not* returned unchanged (its spectrum is
      flattened).

    Choices: FusionBench's ``iso_c`` = paper for matrices; non-matrix parameters are averaged
    as in FusionBench (the paper defines Iso-C on matrices only).

    References:
      Marczak et al., No Task Left Behind, ICML 2025 (arXiv:2502.04959), Sec. 4 (Iso-C).
    """
    members = _members(x, members)
    s = jnp.asarray(scale, jnp.float32)

    def merge_matrix(name, v):
        U, S, Vh = jnp.linalg.svd(task_sum(_masked(v, members)), full_matrices=False)
        return (s * jnp.mean(S)) * _mm(U, Vh)

    return _matrices_else_mean(x, members, s, exclude, merge_matrix)


def iso_cts(x: Block, members=None, *, scale=1.0, common_fraction=0.8, exclude=()) -> Block:
    r"""Iso-CTS: isotropic merging in common and task-specific subspaces.

    For each matrix (:math:`r=\min(a,b)`): :math:`c_0=\lfloor r\,f\rfloor`,
    :math:`s=\mathrm{round}((r-c_0)/m)` (half to even, as Python's ``round``) clipped to
    :math:`[0,\lfloor r/m\rfloor]`, common size :math:`c=r-ms`. With
    :math:`\sum_{i\in G}\tau_i=U\Sigma V^\top`, the common subspace is :math:`U_{:c}`; each member
    is projected off it, :math:`\hat\tau_i=\tau_i-U_{:c}U_{:c}^\top\tau_i=\hat U_i\hat\Sigma_i\hat
    V_i^\top`, and keeps its top :math:`s` triplets. The :math:`r` components
    :math:`[\hat U_{1,:s},\dots,\hat U_{m,:s},U_{:c}]` (and the corresponding :math:`V`'s) are
    orthogonalised by their polar factors and the spectrum is flattened to the mean
    :math:`\bar\sigma` of the :math:`r` concatenated singular values:

    .. math:: \Delta=\alpha\,\bar\sigma\,U_\perp V_\perp^\top.

    Non-matrix parameters: :math:`\alpha\cdot` mean.

    Args:
      x: ``{name: f32[n, ...]}``; members: ``bool[n]`` (``None``: all).
      scale: :math:`\alpha` (FusionBench ``scaling_factor``). May be traced.
      common_fraction: :math:`f`, the common-space fraction (paper and FusionBench: 0.8).
        May be traced.
      exclude: static names merged by the mean.

    Returns:
      ``{name: f32[...]}``.

    Choices: FusionBench's ``iso_cts`` (the authors' code) is followed, including its
    rounding of the task-specific size so that :math:`ms + c = r` exactly. Where FusionBench's
    rounding would make :math:`ms > r` (e.g. :math:`r=5, m=3, f=0`: it then slices with a
    negative common size and crashes) :math:`s` is clipped to :math:`\lfloor r/m\rfloor`.
    Non-matrix parameters are averaged (FusionBench). The column order of the concatenation
    (task-specific first, then common) is FusionBench's; the result does not depend on it.

    References:
      Marczak et al., No Task Left Behind, ICML 2025 (arXiv:2502.04959), Sec. 4 (Iso-CTS).
    """
    members = _members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    m = _icount(members)
    m1 = jnp.maximum(m, 1)

    def merge_matrix(name, v):
        a, b = v.shape[1:]
        r = min(a, b)
        c0 = _floor_count(r, common_fraction)
        per = jnp.round((jnp.int32(r) - c0).astype(jnp.float32) / m1.astype(jnp.float32))
        per = jnp.clip(per.astype(jnp.int32), 0, jnp.int32(r) // m1)
        c = jnp.int32(r) - m * per
        U, S, Vh = jnp.linalg.svd(task_sum(_masked(v, members)), full_matrices=False)
        slot = jnp.arange(r, dtype=jnp.int32)
        Uk = jnp.where((slot < c)[None, :], U, 0.0)  # [a, r], common space only
        coef = jnp.einsum("ar,nab->nrb", Uk, v, precision=_HI)
        proj = v - jnp.einsum("ar,nrb->nab", Uk, coef, precision=_HI)
        Ut, St, Vht = jnp.linalg.svd(proj, full_matrices=False)
        task, j, valid = _group_slots(members, per, r)
        Ug, Sg, Vg = _gather_components(Ut, St, Vht, task, j, valid)
        common = slot >= m * per
        jc = jnp.clip(slot - m * per, 0, r - 1)
        Ucomb = jnp.where(valid[None, :], Ug, jnp.where(common[None, :], U[:, jc], 0.0))
        Scomb = jnp.where(valid, Sg, jnp.where(common, S[jc], 0.0))
        Vcomb = jnp.where(valid[:, None], Vg, jnp.where(common[:, None], Vh[jc, :], 0.0))
        return (s * jnp.mean(Scomb)) * _mm(_polar(Ucomb), _polar(Vcomb))

    return _matrices_else_mean(x, members, s, exclude, merge_matrix)


# --------------------------------------------------------------------------- Breadcrumbs


def breadcrumbs_masks(x: Block, *, top=0.01, bottom=0.85, granularity="tensor") -> Block:
    r"""Breadcrumbs masks of every task (group-independent).

    Within each ranking group of N entries (see ``granularity``), sorted by :math:`|\tau|`,
    the :math:`\lfloor \mathrm{top}\cdot N\rfloor` largest and the
    :math:`\lfloor\mathrm{bottom}\cdot N\rfloor` smallest are masked out; ties are ranked by
    position.

    Returns:
      ``{name: bool[n, ...]}`` (True = kept).
    """
    _check_granularity(granularity)
    out = {}
    for name, v in x.items():
        rank, N = _ranks(jnp.abs(v), granularity)
        n_top = _floor_count(N, top)
        n_bot = _floor_count(N, bottom)
        out[name] = (rank >= n_bot) & (rank < jnp.int32(N) - n_top)
    return out


def breadcrumbs(
    x: Block, members=None, *, top=0.01, bottom=0.85, scale=1.0, granularity="tensor",
    masks=None,
) -> Block:
    r"""Model Breadcrumbs: sparse masks without outliers, then the task-arithmetic **sum**.

    .. math:: \Delta=\alpha\sum_{i\in G} M_i\odot\tau_i,

    :math:`M_i` = :func:`breadcrumbs_masks` (per tensor, the top ``top`` and bottom ``bottom``
    fractions of :math:`|\tau_i|` removed).

    Args:
      x: ``{name: f32[n, ...]}``; members: ``bool[n]`` (``None``: all).
      top: fraction of the **largest** magnitudes removed (outliers; mergekit ``gamma``, the
        authors' code ``top_k_remove``/``gamma``, their search range 0.001-0.01). Traceable.
      bottom: fraction of the **smallest** magnitudes removed (mergekit
        ``1 - density - gamma``; the authors' code keeps ``beta = 1 - top - bottom``, search
        range 0.05-0.2 kept). Traceable. The brief's "top-beta, bottom-gamma" wording and the
        authors' symbols disagree, hence the explicit names.
      scale: :math:`\alpha` on the sum (authors' search 0.01-1, e.g. 0.2-0.3 for 8 tasks).
      granularity: ``"tensor"`` (paper: per layer; mergekit) or ``"node"`` (the authors'
        code: ``topk`` along the last torch axis, i.e. per output unit). Static.
      masks: optional :func:`breadcrumbs_masks` output for ``x`` with these ``top``,
        ``bottom`` and ``granularity`` (the masks do not depend on the group; pass them to
        avoid sorting every task again for each group).

    Returns:
      ``{name: f32[...]}``.

    Choices: FusionBench has no Breadcrumbs; compared with mergekit's ``magnitude_outliers``
    (same counts: ``n_top = int(gamma N)``, kept ``= int(density N)``). The authors' code
    applies the two cut-offs sequentially (remove the top, then keep the top ``beta`` of the
    rest), which is the same set. Masks are per task and do not depend on the group.

    References:
      Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795).
    """
    members = _members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    if masks is None:
        masks = breadcrumbs_masks(x, top=top, bottom=bottom, granularity=granularity)
    return {
        k: s * task_sum(_masked(jnp.where(masks[k], v, 0.0), members)) for k, v in x.items()
    }


# --------------------------------------------------------------------------- DELLA


def della_noise(x: Block, key: jax.Array) -> Block:
    """The uniform draws of :func:`magprune`: ``{name: f32[n, ...]}`` in ``[0, 1)``.

    Per parameter key ``fold_in(key, crc32(name))``, per task ``fold_in(., task index)``: a
    task's drops do not depend on the group, on the block's other parameters or on their order.
    """
    out = {}
    for name, v in x.items():
        kp = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        keys = jax.vmap(lambda t, kp=kp: jax.random.fold_in(kp, t))(jnp.arange(v.shape[0]))
        out[name] = jax.vmap(
            lambda kk, shape=v.shape[1:]: jax.random.uniform(kk, shape, jnp.float32)
        )(keys)
    return out


def magprune(
    x: Block,
    *,
    key=None,
    noise=None,
    density=0.5,
    epsilon=0.15,
    rescale=True,
    granularity="node",
) -> Block:
    r"""DELLA's MagPrune on every task (group-independent preprocessing, like DARE).

    In each ranking group of N entries, with :math:`r_j\in\{0..N-1\}` the ascending rank of
    :math:`|\tau_j|`, the keep probability is

    .. math:: p_j=(d-\epsilon)+2\epsilon\,\frac{r_j}{N-1}\quad(N=1:\ p=d),

    the entry is kept iff :math:`u_j<p_j` (:math:`u_j\sim U[0,1)`) and rescaled by
    :math:`1/p_j` (the paper's :math:`1/(1-p^{drop}_j)`).

    Args:
      x: ``{name: f32[n, ...]}``.
      key: PRNG key (see :func:`della_noise`); or
      noise: explicit uniforms ``{name: f32[n, ...]}`` (tests, custom streams).
      density: :math:`d`, the mean keep probability (1 - drop rate). Traceable.
      epsilon: :math:`\epsilon`, half-width of the keep-probability window (mergekit's
        ``epsilon``; the authors' code passes ``epsilon = window_size / 2``). The caller must
        keep :math:`0<d\pm\epsilon\le1`. Traceable.
      rescale: static; ``False`` returns the masked vectors unscaled.
      granularity: ``"node"`` (the authors' code: each row of a torch weight, i.e. each output
        unit) or ``"tensor"`` (their ``rank_magnitude_layer_sampling``). Static.

    Returns:
      ``{name: f32[n, ...]}``.
    """
    _check_granularity(granularity)
    if noise is None:
        if key is None:
            raise ValueError("magprune needs a PRNG key (key=jax.random.key(seed)) or noise=")
        noise = della_noise(x, key)
    d = jnp.asarray(density, jnp.float32)
    eps = jnp.asarray(epsilon, jnp.float32)
    out = {}
    for name, v in x.items():
        rank, N = _ranks(jnp.abs(v), granularity)
        if N > 1:
            norm = rank.astype(jnp.float32) / jnp.float32(N - 1)
        else:
            norm = jnp.full(v.shape, 0.5, jnp.float32)
        p = (d - eps) + norm * 2.0 * eps
        keep = noise[name] < p
        val = v / jnp.where(keep, p, 1.0) if rescale else v
        out[name] = jnp.where(keep, val, 0.0)
    return out


def della_fuse(x: Block, members=None, *, scale=1.0) -> Block:
    r"""DELLA's elect + fuse on (pruned) task vectors.

    Elected sign :math:`s=+1` where :math:`\sum_{i\in G}\tau_i\ge0`, else :math:`-1`; the
    entries with exactly that sign (zeros never) are averaged, times :math:`\lambda`.
    """
    members = _members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    out = {}
    for k, v in x.items():
        sg = jnp.where(task_sum(_masked(v, members)) >= 0, jnp.float32(1), jnp.float32(-1))
        out[k] = s * _elected_mean(v, sg, members)
    return out


def della(
    x: Block,
    members=None,
    *,
    key=None,
    noise=None,
    density=0.5,
    epsilon=0.15,
    scale=1.0,
    rescale=True,
    granularity="node",
) -> Block:
    r"""DELLA-Merging: MagPrune (:func:`magprune`), then elect + fuse (:func:`della_fuse`).

    Args:
      x: ``{name: f32[n, ...]}``; members: ``bool[n]`` (``None``: all).
      key: PRNG key (required unless ``noise`` is given); the draws of a task are the same in
        every group (:func:`della_noise`).
      density, epsilon, rescale, granularity: see :func:`magprune` (defaults: mean drop 0.5,
        mergekit's ``epsilon=0.15``).
      scale: :math:`\lambda` on the fused vector (the authors' ``lambda``, default 1).

    Returns:
      ``{name: f32[...]}``.

    Choices: FusionBench has no DELLA. We follow the authors' code (declare-lab/della, the
    paper's implementation, its ``rank_magnitude`` sparsifier with the ``della`` merge
    method): per-row (per-node) ranks, rank-linear keep probabilities with ranks normalised to
    [0, 1] by ``N - 1``, rescaling of the kept entries by ``1/p`` (the paper's
    :math:`1/(1-p^{drop})`; upstream mergekit's ``della`` rescales by the L1 norm instead),
    sign election "``sum >= 0`` -> +" per entry (not the reference TIES block-majority
    fallback) and the disjoint mean. The mask and probabilities are compared with mergekit's
    ``della_magprune`` (same formula). A singleton ranking group (N = 1) gets
    ``p = density`` (the authors' code divides 0 by 0 there).

    References:
      Deep et al., DELLA-Merging, 2024 (arXiv:2406.11617).
    """
    pruned = magprune(
        x,
        key=key,
        noise=noise,
        density=density,
        epsilon=epsilon,
        rescale=rescale,
        granularity=granularity,
    )
    return della_fuse(pruned, members, scale=scale)


# --------------------------------------------------------------------------- MagMax


def magmax(x: Block, members=None, *, scale=1.0) -> Block:
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
    members = _members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    out = {}
    for k, v in x.items():
        n = v.shape[0]
        mb = members.reshape((n,) + (1,) * (v.ndim - 1))
        a = jnp.where(mb, jnp.abs(v), -1.0)
        idx = (n - 1) - jnp.argmax(a[::-1], axis=0)
        out[k] = s * jnp.take_along_axis(v, idx[None], axis=0)[0]
    return out


# --------------------------------------------------------------------------- Model Stock


def model_stock_ratio(x: Block, members=None, *, angle_average="angle") -> dict:
    r"""Model Stock's per-tensor interpolation ratio :math:`t` of a group.

    :math:`\cos\theta_{ij}=\langle\tau_i,\tau_j\rangle/(\|\tau_i\|\|\tau_j\|)` (0 if a norm is
    0), averaged over the member pairs :math:`i<j` as angles (``"angle"``: FusionBench,
    :math:`\cos\bar\theta`) or as cosines (``"cosine"``); then

    .. math:: t=\frac{m\cos\theta}{1+(m-1)\cos\theta},

    and :math:`t=1` for a single task. Not clipped: :math:`t` is negative for obtuse angles and
    singular at :math:`\cos\theta=-1/(m-1)` (the paper assumes acute angles).

    Returns:
      ``{name: f32[]}``.
    """
    if angle_average not in ("angle", "cosine"):
        raise ValueError(f"angle_average must be 'angle' or 'cosine', got {angle_average!r}")
    members = _members(x, members)
    n = members.shape[0]
    mf = _icount(members).astype(jnp.float32)
    ar = jnp.arange(n)
    pair = members[:, None] & members[None, :] & (ar[:, None] < ar[None, :])
    npairs = jnp.sum(pair, dtype=jnp.int32)
    out = {}
    for k, v in x.items():
        f = _masked(v, members).reshape(n, -1)
        G = jnp.matmul(f, f.T, precision=_HI)
        nrm = jnp.sqrt(jnp.diagonal(G))
        den = nrm[:, None] * nrm[None, :]
        cos = jnp.clip(jnp.where(den > 0, G / jnp.where(den > 0, den, 1.0), 0.0), -1.0, 1.0)
        npf = jnp.maximum(npairs, 1).astype(jnp.float32)
        if angle_average == "angle":
            c = jnp.cos(jnp.sum(jnp.where(pair, jnp.arccos(cos), 0.0)) / npf)
        else:
            c = jnp.sum(jnp.where(pair, cos, 0.0)) / npf
        t = mf * c / (1.0 + (mf - 1.0) * c)
        out[k] = jnp.where(npairs > 0, t, jnp.float32(1.0))
    return out


def model_stock(x: Block, members=None, *, angle_average="angle") -> Block:
    r"""Model Stock in task-vector form: :math:`\Delta=t\cdot\mathrm{mean}_{i\in G}\tau_i` per tensor.

    The paper's :math:`w_H=t\,\bar w+(1-t)\,w_0` with the pretrained :math:`w_0=\theta_0` as
    anchor is :math:`\theta_0+t\,\bar\tau`: the kernel needs nothing from the base beyond the
    task vectors themselves (which must be taken w.r.t. the model the fine-tunes started from,
    the anchor of the angle). :math:`t` from :func:`model_stock_ratio`; no scale
    hyperparameter. One task in gives itself out (:math:`t=1`).

    Args:
      x: ``{name: f32[n, ...]}``; members: ``bool[n]`` (``None``: all).
      angle_average: static; ``"angle"`` (FusionBench: mean of the pairwise angles) or
        ``"cosine"`` (mean of the pairwise cosines).

    Choices: the paper derives :math:`t` for m models assuming one common angle between all
    pairs (its "thin shell" observation) and does not say how to estimate it; FusionBench
    averages the pairwise angles in degrees, mergekit averages cosines (per row). Default:
    FusionBench. FusionBench adds ``1e-8`` to both denominators; we do not (the paper's
    formula; relative difference :math:`\sim10^{-8}/\|\tau\|^2`). "Layer" = one parameter
    tensor (FusionBench: one state-dict key). FusionBench's CLIP config ignores some keys
    (they get :math:`t=1`, the plain average): select them out in the block spec instead.

    References:
      Jang, Yun & Han, Model Stock, ECCV 2024 (arXiv:2403.19522).
    """
    members = _members(x, members)
    t = model_stock_ratio(x, members, angle_average=angle_average)
    mean = average(x, members)
    return {k: t[k] * mean[k] for k in x}


# --------------------------------------------------------------------------- SLERP


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


def slerp(
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

    .. math:: \mathrm{slerp}(t)=\frac{\sin((1-t)\Omega)}{\sin\Omega}v_0
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
    n = _n_tasks(x)
    if members is None:
        if n != 2:
            raise ValueError(f"slerp merges exactly 2 tasks; got n={n} tasks and members=None")
        members = jnp.ones((n,), bool)
    else:
        cnt = _concrete_count(members)
        if cnt is not None and cnt != 2:
            raise ValueError(f"slerp merges exactly 2 tasks; the group has {cnt}")
        members = jnp.asarray(members, bool)
    m = _icount(members)
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


# --------------------------------------------------------------------------- sum conventions


def task_arithmetic_sum(x: Block, members=None, *, scale=1.0) -> Block:
    r"""Task arithmetic in the sum convention: :math:`\Delta=\alpha\sum_{i\in G}\tau_i`.

    ``scale`` is FusionBench's ``scaling_factor`` / mergekit's ``weight`` x ``lambda``
    (FusionBench's config: 0.3). Equals :func:`kernels.task_arithmetic` with
    ``scale = alpha * m``. Summed sequentially in task order.

    References:
      Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089).
    """
    members = _members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    return {k: s * task_sum(_masked(v, members)) for k, v in x.items()}


def ties_disjoint_merge(
    x: Block,
    members=None,
    *,
    scale=1.0,
    merge_func: Literal["mean", "sum", "max"] = "mean",
) -> Block:
    r"""TIES elect + disjoint merge with FusionBench's ``merge_func``, times :math:`\lambda`.

    Sign election as :func:`kernels.ties_merge` (sign of the column sum; zeros take the block
    majority, +1 if that is 0). Over the entries with exactly the elected sign:

    * ``"mean"``: their mean -- exactly :func:`kernels.ties_merge` (the reference's default);
    * ``"sum"``: their sum (FusionBench's config default);
    * ``"max"``: the elected sign times their largest magnitude.

    No trimming here (TIES trims per task over the whole model:
    :func:`flexmerge_jax.prep.ties_trim`). ``merge_func`` is static.

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
    members = _members(x, members)
    signs = _elected_sign(x, members)
    s = jnp.asarray(scale, jnp.float32)
    out = {}
    for k, v in x.items():
        rows = [sel for sel, _ in _elected_entries(v, signs[k], members)]  # task order
        if merge_func == "sum":
            out[k] = s * functools.reduce(jnp.add, rows)
        else:
            out[k] = s * (functools.reduce(jnp.maximum, map(jnp.abs, rows)) * signs[k])
    return out
