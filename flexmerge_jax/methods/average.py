"""Plain average of the group's task vectors (the reference's ``avg``)."""

from __future__ import annotations

from ._common import group_mean
from ._contract import GroupMerge, Method, Traits


def _merge(x, members, state):
    del state
    return GroupMerge(group_mean(x, members), None, None)


def average() -> Method:
    """Plain average of the group's task vectors (reference ``avg``).

    No hyperparameters. Linear: plans need Gram matrices only.
    """
    return Method("avg", _merge, traits=Traits(linear=True, elementwise=True), builtin=True)
