"""Shared helpers of the flax adapters: string keys and a checked leaf swap."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..tree import flatten


def stringify(tree: Any, path: str = "") -> Any:
    """Dict keys to ``str`` (list indices ``0`` -> ``"0"``), leaves untouched."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            sk = str(k)
            if sk in out:
                raise ValueError(f"keys {k!r} and {sk!r} collide under {path or '<root>'!r}")
            out[sk] = stringify(v, f"{path}/{sk}" if path else sk)
        return out
    return tree


def replace_leaves(target: Any, params: Any, what: str) -> Any:
    """``target``'s tree with each leaf taken from ``params`` by name.

    Names are compared as :func:`flexmerge_jax.tree.flatten` gives them (so an
    int key ``0`` in ``target`` matches ``"0"`` in ``params``). Values are cast
    to the target leaf's dtype (a no-op, hence exact, when they agree).

    Raises:
      ValueError: a missing or extra parameter, or a shape mismatch.
    """
    names, old, treedef = flatten(target)
    pnames, pleaves, _ = flatten(params)
    given = dict(zip(pnames, pleaves))
    missing = [n for n in names if n not in given]
    extra = [n for n in pnames if n not in set(names)]
    if missing:
        raise ValueError(f"params lack {missing[0]!r} of the {what} ({len(missing)} missing)")
    if extra:
        raise ValueError(f"params have {extra[0]!r}, not in the {what} ({len(extra)} extra)")
    new = []
    for n, o in zip(names, old):
        x = given[n]
        if tuple(jnp.shape(x)) != tuple(o.shape):
            raise ValueError(f"parameter {n!r} has shape {tuple(jnp.shape(x))}, "
                             f"the {what} has {tuple(o.shape)}")
        new.append(jnp.asarray(x, dtype=o.dtype))
    return jax.tree_util.tree_unflatten(treedef, new)
