r"""Model Stock: the mean scaled by a ratio from the members' angles."""

from __future__ import annotations

from .. import kernels_extra
from ._contract import GroupMerge, Method, Traits


def _merge(x, members, state):
    del state
    return GroupMerge(kernels_extra.model_stock(x, members), None, None)


def model_stock() -> Method:
    r"""Model Stock: :math:`t\cdot\mathrm{mean}(\tau)` with
    :math:`t = m\cos\theta/(1+(m-1)\cos\theta)` from the average angle
    between the group's task vectors, per tensor. No hyperparameters.

    References:
      Jang et al., Model Stock: All we need is just a few fine-tuned models,
      ECCV 2024 (arXiv:2403.19522).
    """
    return Method("model_stock", _merge, traits=Traits(whole_parameter=True), builtin=True)
