r"""MagMax: per parameter, the task-vector entry of largest magnitude."""

from __future__ import annotations

from .. import kernels_extra
from ._common import numeric
from ._contract import GroupMerge, Method


def _merge(x, members, state, *, scale):
    del state
    return GroupMerge(kernels_extra.magmax(x, members, scale=scale), None, None)


def magmax(scale=1.0) -> Method:
    r"""MagMax: per parameter, the task-vector entry of largest magnitude.

    Args:
      scale: ``jax.typing.ArrayLike`` (traceable, differentiable).

    References:
      Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual
      Learning, ECCV 2024 (arXiv:2407.06322).
    """
    return Method("magmax", _merge, numeric=(("scale", numeric("scale", scale)),), builtin=True)
