r"""Task arithmetic: :math:`\lambda` times the mean (or sum) of the group."""

from __future__ import annotations

import jax.numpy as jnp

from ._common import Block, as_members, group_mean, mask_members, numeric, task_sum
from ._contract import GroupMerge, Method, Traits


def task_arithmetic_merge(x: Block, members=None, *, scale=1.0) -> Block:
    r"""Task arithmetic as the reference implements it: :math:`\lambda\cdot` mean.

    ``scale`` (:math:`\lambda`) multiplies the **mean** of the group's task
    vectors. The sum convention (:math:`\alpha\sum_k\tau_k`) corresponds to
    ``scale = alpha * m`` for a group of m tasks.

    Returns:
      ``{name: f32[...]}``.
    """
    s = jnp.asarray(scale, jnp.float32)
    return {k: s * v for k, v in group_mean(x, members).items()}


def task_arithmetic_sum(x: Block, members=None, *, scale=1.0) -> Block:
    r"""Task arithmetic in the sum convention: :math:`\Delta=\alpha\sum_{i\in G}\tau_i`.

    ``scale`` is FusionBench's ``scaling_factor`` / mergekit's ``weight`` x ``lambda``
    (FusionBench's config: 0.3). Equals :func:`task_arithmetic_merge` with
    ``scale = alpha * m``. Summed sequentially in task order.

    References:
      Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089).
    """
    members = as_members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    return {k: s * task_sum(mask_members(v, members)) for k, v in x.items()}


def _merge_mean(x, members, state, *, scale):
    del state
    return GroupMerge(task_arithmetic_merge(x, members, scale=scale), None, None)


def _merge_sum(x, members, state, *, scale, convention):
    del state, convention
    return GroupMerge(task_arithmetic_sum(x, members, scale=scale), None, None)


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
                      traits=Traits(linear=True, tunable=True, elementwise=True), builtin=True)
    if convention != "sum":
        raise ValueError(f"convention must be 'mean' or 'sum', got {convention!r}")
    return Method("ta", _merge_sum, numeric=(("scale", scale),),
                  static=(("convention", convention),),
                  traits=Traits(linear=True, sums=True, elementwise=True), builtin=True)
