r"""PCB-Merging with the reference's global per-task thresholds."""

from __future__ import annotations

import jax.numpy as jnp

from .. import kernels, prep
from ._common import fraction, numeric
from ._contract import GroupMerge, Method, Traits


def _prepare(leaves, total, *, keep):
    """Whole-model per-task thresholds ``(lo, hi)`` (:func:`~flexmerge_jax.prep.pcb_thresholds`)."""
    return prep.pcb_thresholds(leaves, keep, total)


def _block_state(x, info, *, keep):
    del keep
    clo, chi = prep.pcb_clip_bounds(list(x.values()), info.numel)
    lo, hi = info.prepared
    return {"clip_lo": jnp.asarray(clo), "clip_hi": jnp.asarray(chi),
            "lo": jnp.asarray(lo), "hi": jnp.asarray(hi)}


def _merge(x, members, state, *, scale, keep):
    del keep
    if state is None:
        raise ValueError("pcb needs its thresholds (extra=...)")
    return GroupMerge(kernels.pcb_merge(x, members, scale=scale, **state), None, None)


def pcb(scale=1.0, keep: float = 0.2) -> Method:
    r"""PCB-Merging with the reference's global per-task thresholds.

    Args:
      scale: :math:`\lambda`; ``jax.typing.ArrayLike`` (traceable).
      keep: in (0, 1); the reference uses it as the fraction of sorted
        whole-model scores below the lower clamp threshold (a *drop*
        fraction, inconsistent with PCB's own trim — reproduced as is).
        Static: it fixes an order statistic.

    The thresholds are host order statistics over the whole model, so
    ``fm.merge`` with PCB is not traceable in its inputs (``scale`` is,
    given the thresholds).

    References:
      Du et al., Parameter Competition Balancing for Model Merging,
      NeurIPS 2024.
    """
    scale = numeric("scale", scale)
    keep = fraction("keep", keep, "pcb", "it fixes an order statistic", lo_open=True)
    if keep >= 1.0:
        raise ValueError(
            "pcb needs keep < 1 (its thresholds use keep as a fraction of "
            "sorted scores; the reference asserts on keep = 1)"
        )
    return Method("pcb", _merge, numeric=(("scale", scale),), static=(("keep", keep),),
                  traits=Traits(tunable=True, keep_block_state=True),
                  block_state=_block_state, prepare=_prepare, builtin=True)
