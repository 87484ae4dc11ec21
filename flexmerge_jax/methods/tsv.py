r"""TSV-M (Task Singular Vectors): per-task low-rank factors, orthogonalised."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._common import (
    Block,
    as_members,
    check_exclude,
    gather_components,
    group_slots,
    is_matrix,
    matmul,
    matrices_else_mean,
    member_count_i32,
    numeric,
    polar_factor,
)
from ._contract import GroupMerge, Method, Traits


def task_svd(x: Block, *, exclude=()) -> dict:
    """Per-task thin SVDs of the block's matrices (group-independent; hoist them out of a vmap).

    Returns:
      ``{name: (U f32[n, a, r], S f32[n, r], Vh f32[n, r, b])}`` for every matrix parameter.
    """
    exclude = check_exclude(exclude)
    return {
        k: tuple(jnp.linalg.svd(v, full_matrices=False))
        for k, v in x.items()
        if is_matrix(k, v, exclude)
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
    change the polar factor of the filled ones (see ``polar_factor``).

    Choices: FusionBench's ``compute_and_sum_svd_mem_reduction`` and the paper agree on the
    algorithm; we follow both. With ``r < m`` every member keeps 0 triplets (``k = 0``) and
    the merged matrix is 0, as in FusionBench. Non-matrix parameters: the mean (FusionBench;
    the paper only defines TSV-M for matrices).

    References:
      Gargiulo et al., Task Singular Vectors, CVPR 2025 (arXiv:2412.00081).
    """
    members = as_members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    m1 = jnp.maximum(member_count_i32(members), 1)

    def merge_matrix(name, v):
        if svd is not None and name in svd:
            U, S, Vh = svd[name]
        else:
            U, S, Vh = jnp.linalg.svd(v, full_matrices=False)
        r = S.shape[-1]
        width = jnp.int32(r) // m1
        if k is not None:
            width = jnp.minimum(jnp.asarray(k, jnp.int32), width)
        task, j, valid = group_slots(members, width, r)
        Uc, Sc, Vc = gather_components(U, S, Vh, task, j, valid)
        return s * matmul(polar_factor(Uc) * Sc[None, :], polar_factor(Vc))

    return matrices_else_mean(x, members, s, exclude, merge_matrix)


@jax.jit
def _svd(x):
    return {"svd": task_svd(x)}


def _block_state(x, info, **static):
    del info, static
    return _svd(x)


def _merge(x, members, state, *, scale, k=None):
    svd = (state or {}).get("svd")
    return GroupMerge(tsv_merge(x, members, scale=scale, k=k, svd=svd), None, None)


def tsv(scale=1.0, k: int | None = None) -> Method:
    r"""TSV-M (Task Singular Vectors): per 2-D parameter, each member keeps its
    top ``k`` singular triplets (default ``floor(rank / m)``); the concatenated
    factors are orthogonalised and summed; other parameters: mean.

    Args:
      scale: :math:`\alpha`; ``jax.typing.ArrayLike`` (traceable,
        differentiable).
      k: singular triplets kept per task, or ``None``. Static: it fixes
        array shapes.

    Each task's SVDs are computed once per block and shared by its groups.

    References:
      Gargiulo et al., Task Singular Vectors: Reducing Task Interference in
      Model Merging, CVPR 2025 (arXiv:2412.00081).
    """
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    return Method("tsv", _merge, numeric=(("scale", numeric("scale", scale)),),
                  static=(("k", k),) if k is not None else (),
                  traits=Traits(whole_parameter=True), block_state=_block_state, builtin=True)
