r"""Model Breadcrumbs: drop each task vector's largest and smallest magnitudes."""

from __future__ import annotations

import functools

import jax

from .. import kernels_extra
from ._common import fraction, numeric
from ._contract import GroupMerge, Method, Traits


@functools.partial(jax.jit, static_argnames=("top", "bottom"))
def _masks(x, *, top, bottom):
    return {"masks": kernels_extra.breadcrumbs_masks(x, top=top, bottom=bottom)}


def _block_state(x, info, *, top, bottom):
    del info
    return _masks(x, top=top, bottom=bottom)


def _merge(x, members, state, *, scale, top, bottom):
    masks = (state or {}).get("masks")
    return GroupMerge(kernels_extra.breadcrumbs(x, members, top=top, bottom=bottom, scale=scale,
                                                masks=masks), None, None)


def breadcrumbs(scale=1.0, top: float = 0.01, bottom: float = 0.85) -> Method:
    r"""Model Breadcrumbs: per tensor, drop the ``top`` largest and ``bottom``
    smallest magnitudes of each task vector, then ``scale * SUM``.

    Args:
      scale: ``jax.typing.ArrayLike`` (traceable, differentiable).
      top, bottom: fractions; static: they fix order statistics (ranks).

    Each task's masks are computed once per block and shared by its groups.

    References:
      Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795).
    """
    why = "it fixes an order statistic"
    t = fraction("top", top, "breadcrumbs", why)
    b = fraction("bottom", bottom, "breadcrumbs", why)
    if t + b >= 1.0:
        raise ValueError(f"breadcrumbs: top + bottom must be < 1, got {top} + {bottom}")
    return Method("breadcrumbs", _merge, numeric=(("scale", numeric("scale", scale)),),
                  static=(("bottom", bottom), ("top", top)),
                  traits=Traits(whole_parameter=True), block_state=_block_state, builtin=True)
