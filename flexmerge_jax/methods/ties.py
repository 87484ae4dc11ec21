r"""TIES-Merging: global per-task trim, sign election, disjoint mean."""

from __future__ import annotations

from .. import kernels, kernels_extra
from ._common import fraction, numeric
from ._contract import GroupMerge, Method, Traits


def _merge_mean(x, members, state, *, scale, keep):
    del state, keep  # the trim is applied before merging (Method.trim_keep)
    return GroupMerge(kernels.ties_merge(x, members, scale=scale), None, None)


def _merge_disjoint(x, members, state, *, scale, keep, merge_func):
    del state, keep
    return GroupMerge(kernels_extra.ties_disjoint_merge(x, members, scale=scale,
                                                        merge_func=merge_func), None, None)


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
                      traits=Traits(tunable=True), trim_keep=trim, builtin=True)
    if merge_func not in ("sum", "max"):
        raise ValueError(f"merge_func must be 'mean', 'sum' or 'max', got {merge_func!r}")
    return Method("ties", _merge_disjoint, numeric=(("scale", scale),),
                  static=(("keep", keep), ("merge_func", merge_func)), trim_keep=trim,
                  builtin=True)
