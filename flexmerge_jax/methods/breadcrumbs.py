r"""Model Breadcrumbs: drop each task vector's largest and smallest magnitudes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._common import (
    Block,
    as_members,
    check_granularity,
    floor_count,
    fraction,
    mask_members,
    numeric,
    rank_within,
    task_sum,
)
from ._contract import GroupMerge, Method, Traits


def breadcrumbs_masks(x: Block, *, top=0.01, bottom=0.85, granularity="tensor") -> Block:
    r"""Breadcrumbs masks of every task (group-independent).

    Within each ranking group of N entries (see ``granularity``), sorted by :math:`|\tau|`,
    the :math:`\lfloor \mathrm{top}\cdot N\rfloor` largest and the
    :math:`\lfloor\mathrm{bottom}\cdot N\rfloor` smallest are masked out; ties are ranked by
    position.

    Returns:
      ``{name: bool[n, ...]}`` (True = kept).
    """
    check_granularity(granularity)
    out = {}
    for name, v in x.items():
        rank, N = rank_within(jnp.abs(v), granularity)
        n_top = floor_count(N, top)
        n_bot = floor_count(N, bottom)
        out[name] = (rank >= n_bot) & (rank < jnp.int32(N) - n_top)
    return out


def breadcrumbs_merge(
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
    members = as_members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    if masks is None:
        masks = breadcrumbs_masks(x, top=top, bottom=bottom, granularity=granularity)
    return {
        k: s * task_sum(mask_members(jnp.where(masks[k], v, 0.0), members)) for k, v in x.items()
    }


@functools.partial(jax.jit, static_argnames=("top", "bottom"))
def _masks(x, *, top, bottom):
    return {"masks": breadcrumbs_masks(x, top=top, bottom=bottom)}


def _block_state(x, info, *, top, bottom):
    del info
    return _masks(x, top=top, bottom=bottom)


def _merge(x, members, state, *, scale, top, bottom):
    masks = (state or {}).get("masks")
    return GroupMerge(breadcrumbs_merge(x, members, top=top, bottom=bottom, scale=scale,
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
