"""Flax nnx modules <-> params pytrees (nested dicts with string keys).

``from_nnx(model)`` is the module's :class:`flax.nnx.Param` state as a pure
nested dict whose keys are strings (``nnx.List`` indices become ``"0"``,
``"1"``, ...), so leaf names are ``blocks/0/attn/qkv/kernel``; leaves are the
module's own arrays (no copy, dtypes kept). ``to_nnx(params, model)`` puts
such a pytree back: exact (bitwise) round trip.

    params = from_nnx(model)
    merged = fm.merge(from_nnx(base), [from_nnx(m) for m in models], ...)
    new_model = to_nnx(merged, model)        # a new module; model untouched
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from ..tree import flatten as flatten_tree
from ._common import replace_leaves, stringify

__all__ = ["from_nnx", "to_nnx", "nnx_block"]

PyTree = Any


def from_nnx(module_or_state: nnx.Module | nnx.State, filter: Any = nnx.Param) -> dict:
    """An nnx module (or a :class:`flax.nnx.State`) -> params nested dict.

    Args:
      module_or_state: a module (``filter`` selects its variables) or a state
        from ``nnx.split`` / ``nnx.state`` (taken as it is).
      filter: an nnx filter (default ``nnx.Param``: trainable parameters;
        e.g. ``(nnx.Param, nnx.BatchStat)`` to include batch statistics).

    Returns:
      A nested dict with string keys whose leaves are the variables' arrays.

    Raises:
      ValueError: not a module or state, or an int and a str key collide.
    """
    if isinstance(module_or_state, nnx.Module):
        state = nnx.state(module_or_state, filter)
    elif isinstance(module_or_state, nnx.State):
        state = module_or_state
    else:
        raise ValueError(
            f"from_nnx takes an nnx.Module or nnx.State, got {type(module_or_state).__name__}"
        )
    return stringify(state.to_pure_dict())


def to_nnx(params: PyTree, module: nnx.Module, *, filter: Any = nnx.Param,
           inplace: bool = False) -> nnx.Module:
    """Puts params (as :func:`from_nnx` gives them) into an nnx module.

    Args:
      params: a pytree with exactly the module's ``filter`` variables, named
        as :func:`from_nnx` names them (any pytree giving the same names,
        e.g. a merged model's ``params_for_task(i)``).
      module: the target. An abstract one from ``nnx.eval_shape`` works too
        (nothing is initialised twice); its variables outside ``filter``
        (e.g. ``BatchStat``) then stay abstract, so either give them in
        ``params`` (``filter=(nnx.Param, nnx.BatchStat)``) or use a concrete
        module.
      filter: which variables ``params`` holds (default ``nnx.Param``).
      inplace: update ``module`` itself and return it; default returns a new
        module (other variables shared with ``module``, which is untouched).

    Values are cast to the module variables' dtypes (exact when they agree).

    Raises:
      ValueError: a missing/extra parameter or a shape mismatch (named).
    """
    if not isinstance(module, nnx.Module):
        raise ValueError(f"to_nnx needs an nnx.Module target, got {type(module).__name__}")
    if inplace:
        state = nnx.state(module, filter)
        nnx.replace_by_pure_dict(state, replace_leaves(state.to_pure_dict(), params, "module"))
        nnx.update(module, state)
        return module
    graphdef, state, rest = nnx.split(module, filter, ...)
    nnx.replace_by_pure_dict(state, replace_leaves(state.to_pure_dict(), params, "module"))
    return nnx.merge(graphdef, state, rest)


def nnx_block(module) -> Callable:
    """``fn(p, *xs)`` calling an nnx module with parameters ``p``.

    ``p`` is the module's :class:`flax.nnx.Param` state as a nested dict with
    string keys (the sub-pytree :meth:`Router.apply` passes for the module's
    path, e.g. ``{"kernel": ..., "bias": ...}`` for ``nnx.Linear``); other
    variables are taken from ``module``. The module itself is not modified.
    Use it as ``r.apply("layers/3", nnx_block(model.layers[3]), x)``.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    pure = params.to_pure_dict()
    names, _, treedef = flatten_tree(pure)

    def fn(p, *xs):
        flat = dict(zip(*flatten_tree(p)[:2])) if isinstance(p, Mapping) else {"": p}
        missing = [k for k in names if k not in flat]
        if missing:
            raise ValueError(f"nnx_block: parameter {missing[0]!r} of the module not given")
        state = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in names])
        st = nnx.State(params)  # a copy: the module's own state stays untouched
        nnx.replace_by_pure_dict(st, state)
        return nnx.merge(graphdef, st, rest)(*xs)

    return fn
