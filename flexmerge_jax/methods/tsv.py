r"""TSV-M (Task Singular Vectors): per-task low-rank factors, orthogonalised."""

from __future__ import annotations

import jax

from .. import kernels_extra
from ._common import numeric
from ._contract import GroupMerge, Method, Traits


@jax.jit
def _svd(x):
    return {"svd": kernels_extra.task_svd(x)}


def _block_state(x, info, **static):
    del info, static
    return _svd(x)


def _merge(x, members, state, *, scale, k=None):
    svd = (state or {}).get("svd")
    return GroupMerge(kernels_extra.tsv_merge(x, members, scale=scale, k=k, svd=svd), None, None)


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
