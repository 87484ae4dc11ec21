r"""Task arithmetic: :math:`\lambda` times the mean (or sum) of the group."""

from __future__ import annotations

from .. import kernels, kernels_extra
from ._common import numeric
from ._contract import GroupMerge, Method, Traits


def _merge_mean(x, members, state, *, scale):
    del state
    return GroupMerge(kernels.task_arithmetic(x, members, scale=scale), None, None)


def _merge_sum(x, members, state, *, scale, convention):
    del state, convention
    return GroupMerge(kernels_extra.task_arithmetic_sum(x, members, scale=scale), None, None)


def task_arithmetic(scale=1.0, convention: str = "mean") -> Method:
    r"""Task arithmetic.

    Args:
      scale: ``jax.typing.ArrayLike`` (traceable, differentiable).
        ``convention="mean"`` (the reference's, default): :math:`\lambda`
        multiplying the **mean** of a merged group (singletons are not
        scaled); FusionBench/mergekit's ``scaling_factor`` :math:`\alpha` on
        the sum is ``scale / m``. ``convention="sum"``: :math:`\alpha`
        multiplying the **sum** (FusionBench/mergekit semantics).
      convention: ``"mean"`` or ``"sum"`` (static: it picks the kernel).

    References:
      Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023.
    """
    scale = numeric("scale", scale)
    if convention == "mean":
        return Method("ta", _merge_mean, numeric=(("scale", scale),),
                      traits=Traits(linear=True, tunable=True), builtin=True)
    if convention != "sum":
        raise ValueError(f"convention must be 'mean' or 'sum', got {convention!r}")
    return Method("ta", _merge_sum, numeric=(("scale", scale),),
                  static=(("convention", convention),),
                  traits=Traits(linear=True, sums=True), builtin=True)
