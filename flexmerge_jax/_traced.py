"""``fm.merge`` as one traceable function (``jit``, ``vmap``, ``grad``).

When a method's numeric hyperparameters or the input parameters are JAX
tracers, :func:`flexmerge_jax.merge` runs here instead of the host engine
(:mod:`._prepared`, which reads blocks, checks them for NaN/Inf and computes
order statistics with NumPy): every step is a ``jax.numpy`` function of the
in-memory pytrees, in the engine's order and with its kernels, so the
result equals the eager one (same float32 operations; XLA may fuse them
differently, hence tolerances of a few ulps in the tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import blocks as blocks_lib
from .methods import Method
from .methods._contract import is_traced
from .methods.dare import dare_drop
from .stats.order import trim_traceable
from .tree import canonical, check_finetuned, flatten, named


def any_traced(method: Method, base, finetuned) -> bool:
    """Whether ``merge`` must take the traceable path."""
    if method.traced:
        return True
    leaves = jax.tree.leaves([base, *finetuned]) if isinstance(finetuned, (list, tuple)) else []
    return any(is_traced(v) for v in leaves)


def _check(method: Method) -> None:
    if method.uses_masks:
        raise ValueError(
            f"merge() with the mask method {method.name} returns a FlexModel (a vector and "
            "per-task masks), which is not traceable; trace a method without masks")
    if method.prepare is not None:
        raise ValueError(
            f"merge() with {method.name} cannot be traced: its whole-model statistics "
            "(prepare) are order statistics computed on the host")




def traced_merge(base, finetuned, method: Method, blocks):
    """The merged params of all tasks (see :func:`flexmerge_jax.merge`),
    traceable in ``method``'s numeric hyperparameters and in the params."""
    _check(method)
    if not isinstance(finetuned, (list, tuple)) or isinstance(base, (str, bytes)):
        raise ValueError("a traced merge() needs in-memory pytrees (base, [finetuned, ...])")
    layout = check_finetuned(base, finetuned)
    names, base_leaves, treedef = flatten(base)
    b0 = dict(zip(names, base_leaves))
    fts = [dict(zip(names, flatten(f)[1])) for f in finetuned]
    partition = blocks_lib.resolve(blocks, layout.names, layout.sizes, warn=False)
    if partition.unmatched:
        raise ValueError(
            f"merge(): {len(partition.unmatched)} parameter(s) match no block "
            f"(e.g. {partition.unmatched[0]!r})")
    n = len(finetuned)
    tau = {k: jnp.stack([jnp.asarray(f[k], jnp.float32) for f in fts])
           - jnp.asarray(b0[k], jnp.float32)[None] for k in names}
    if method.trims:
        tau = trim_traceable(tau, method.trim_keep, layout.total)
    elif method.sparsify is not None:
        key = jax.random.key(method.sparsify.seed)
        index = layout.index()
        tau = {k: dare_drop(v, key, method.sparsify.drop, index[k]) for k, v in tau.items()}
    everyone = jnp.ones((n,), bool)
    out = {}
    for b, block in enumerate(partition.blocks):
        # Positional keys, as the engine's (the leaves' order is the block's,
        # not the names' sorted order; per-leaf PRNG keys depend on it).
        x = canonical({k: tau[k] for k in block.leaves})
        state = None
        if method.block_state is not None:
            key = None if method.seed is None else \
                jax.random.fold_in(jax.random.key(method.seed), b)
            state = {**({} if key is None else {"key": key}),
                     **method.shared_state(x, key, numel=block.numel)}
        v = named(method.merge_group(x, everyone, state).vector, block.leaves)
        for k in block.leaves:
            dt = jnp.asarray(b0[k]).dtype
            out[k] = (jnp.asarray(b0[k], jnp.float32) + v[k]).astype(dt)
    return jax.tree_util.tree_unflatten(treedef, [out[k] for k in names])
