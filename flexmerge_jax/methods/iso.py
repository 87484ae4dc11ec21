r"""Isotropic merging: Iso-C and Iso-CTS (flattened spectra of the summed task matrix)."""

from __future__ import annotations

import jax.numpy as jnp

from ._common import (
    HIGHEST,
    Block,
    as_members,
    floor_count,
    fraction,
    gather_components,
    group_slots,
    mask_members,
    matmul,
    matrices_else_mean,
    member_count_i32,
    numeric,
    polar_factor,
    task_sum,
)
from ._contract import GroupMerge, Method, Traits


def iso_c_merge(x: Block, members=None, *, scale=1.0, exclude=()) -> Block:
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

    Choices: FusionBench's ``iso_c_merge`` = paper for matrices; non-matrix parameters are averaged
    as in FusionBench (the paper defines Iso-C on matrices only).

    References:
      Marczak et al., No Task Left Behind, ICML 2025 (arXiv:2502.04959), Sec. 4 (Iso-C).
    """
    members = as_members(x, members)
    s = jnp.asarray(scale, jnp.float32)

    def merge_matrix(name, v):
        U, S, Vh = jnp.linalg.svd(task_sum(mask_members(v, members)), full_matrices=False)
        return (s * jnp.mean(S)) * matmul(U, Vh)

    return matrices_else_mean(x, members, s, exclude, merge_matrix)


def iso_cts_merge(x: Block, members=None, *, scale=1.0, common_fraction=0.8, exclude=()) -> Block:
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

    Choices: FusionBench's ``iso_cts_merge`` (the authors' code) is followed, including its
    rounding of the task-specific size so that :math:`ms + c = r` exactly. Where FusionBench's
    rounding would make :math:`ms > r` (e.g. :math:`r=5, m=3, f=0`: it then slices with a
    negative common size and crashes) :math:`s` is clipped to :math:`\lfloor r/m\rfloor`.
    Non-matrix parameters are averaged (FusionBench). The column order of the concatenation
    (task-specific first, then common) is FusionBench's; the result does not depend on it.

    References:
      Marczak et al., No Task Left Behind, ICML 2025 (arXiv:2502.04959), Sec. 4 (Iso-CTS).
    """
    members = as_members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    m = member_count_i32(members)
    m1 = jnp.maximum(m, 1)

    def merge_matrix(name, v):
        a, b = v.shape[1:]
        r = min(a, b)
        c0 = floor_count(r, common_fraction)
        per = jnp.round((jnp.int32(r) - c0).astype(jnp.float32) / m1.astype(jnp.float32))
        per = jnp.clip(per.astype(jnp.int32), 0, jnp.int32(r) // m1)
        c = jnp.int32(r) - m * per
        U, S, Vh = jnp.linalg.svd(task_sum(mask_members(v, members)), full_matrices=False)
        slot = jnp.arange(r, dtype=jnp.int32)
        Uk = jnp.where((slot < c)[None, :], U, 0.0)  # [a, r], common space only
        coef = jnp.einsum("ar,nab->nrb", Uk, v, precision=HIGHEST)
        proj = v - jnp.einsum("ar,nrb->nab", Uk, coef, precision=HIGHEST)
        Ut, St, Vht = jnp.linalg.svd(proj, full_matrices=False)
        task, j, valid = group_slots(members, per, r)
        Ug, Sg, Vg = gather_components(Ut, St, Vht, task, j, valid)
        common = slot >= m * per
        jc = jnp.clip(slot - m * per, 0, r - 1)
        Ucomb = jnp.where(valid[None, :], Ug, jnp.where(common[None, :], U[:, jc], 0.0))
        Scomb = jnp.where(valid, Sg, jnp.where(common, S[jc], 0.0))
        Vcomb = jnp.where(valid[:, None], Vg, jnp.where(common[:, None], Vh[jc, :], 0.0))
        return (s * jnp.mean(Scomb)) * matmul(polar_factor(Ucomb), polar_factor(Vcomb))

    return matrices_else_mean(x, members, s, exclude, merge_matrix)


def _merge_c(x, members, state, *, scale):
    del state
    return GroupMerge(iso_c_merge(x, members, scale=scale), None, None)


def _merge_cts(x, members, state, *, scale, common_fraction):
    del state
    return GroupMerge(iso_cts_merge(x, members, scale=scale,
                                            common_fraction=common_fraction), None, None)


def iso_c(scale=1.0) -> Method:
    r"""Iso-C: flatten the spectrum of the summed task matrix (non-matrix: mean).

    Args:
      scale: :math:`\alpha`; ``jax.typing.ArrayLike`` (traceable; the SVD's
        gradient is defined for distinct singular values).

    References:
      Marczak et al., No Task Left Behind: Isotropic Model Merging with
      Common and Task-Specific Subspaces, ICML 2025 (arXiv:2502.04959).
    """
    return Method("iso_c", _merge_c, numeric=(("scale", numeric("scale", scale)),),
                  traits=Traits(whole_parameter=True), builtin=True)


def iso_cts(scale=1.0, common_fraction: float = 0.8) -> Method:
    """Iso-CTS: Iso-C on a common subspace plus task-specific subspaces.

    Args:
      scale: as :func:`iso_c` (traceable).
      common_fraction: share of the rank given to the common subspace.
        Static: it fixes subspace sizes (array shapes).
    """
    f = fraction("common_fraction", common_fraction, "iso_cts", "it fixes subspace sizes")
    del f
    return Method("iso_cts", _merge_cts, numeric=(("scale", numeric("scale", scale)),),
                  static=(("common_fraction", common_fraction),),
                  traits=Traits(whole_parameter=True), builtin=True)
