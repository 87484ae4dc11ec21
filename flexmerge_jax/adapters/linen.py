"""Flax linen variables <-> params pytrees.

``from_linen(variables)`` is ``variables["params"]`` as plain nested dicts
(``FrozenDict`` unfrozen; leaves untouched); ``to_linen(params, variables)``
returns new variables with that collection replaced (other collections, e.g.
``batch_stats``, kept). Exact (bitwise) round trip.

    variables = model.init(key, x)
    merged = fm.merge(from_linen(v0), [from_linen(v) for v in vs], ...)
    y = model.apply(to_linen(merged, variables), x)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax.core import FrozenDict, freeze, unfreeze

from ._common import replace_leaves, stringify

__all__ = ["from_linen", "to_linen"]

PyTree = Any


def _collection(variables, collection: str):
    if not isinstance(variables, Mapping):
        raise ValueError(f"linen variables are a dict, got {type(variables).__name__}")
    if collection not in variables:
        raise ValueError(
            f"variables have no {collection!r} collection (collections: {sorted(variables)}); "
            "pass model.init(...)'s result"
        )
    return variables[collection]


def from_linen(variables: Mapping, collection: str = "params") -> dict:
    """``variables[collection]`` as plain nested dicts with string keys."""
    col = _collection(variables, collection)
    return stringify(unfreeze(col) if isinstance(col, FrozenDict) else _plain(col))


def _plain(tree):
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def to_linen(params: PyTree, variables: Mapping, collection: str = "params") -> Mapping:
    """New variables with ``collection`` taken from ``params``.

    The result has the type of ``variables`` (``FrozenDict`` stays frozen).
    Values are cast to the existing leaves' dtypes (exact when they agree).

    Raises:
      ValueError: a missing/extra parameter or a shape mismatch (named).
    """
    col = _collection(variables, collection)
    new_col = replace_leaves(from_linen(variables, collection), params,
                             f"{collection!r} collection")
    out = {k: (new_col if k == collection else v) for k, v in variables.items()}
    if isinstance(variables, FrozenDict):
        return freeze(out)
    del col
    return out
