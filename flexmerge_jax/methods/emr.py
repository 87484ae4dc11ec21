"""EMR-Merging: unified vector, per-task masks and rescalers."""

from __future__ import annotations

from .. import kernels
from ._contract import GroupMerge, Method, Traits


def _merge(x, members, state):
    del state
    r = kernels.emr(x, members)
    return GroupMerge(r.unified, r.masks, r.rescalers)


def emr() -> Method:
    """EMR-Merging: unified vector, per-task masks and rescalers (no lambda).

    References:
      Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging,
      NeurIPS 2024 (arXiv:2405.17461).
    """
    return Method("emr", _merge, traits=Traits(uses_masks=True), builtin=True)
