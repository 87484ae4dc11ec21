"""Block-by-block routing of one mixed batch, running it, and the per-task baseline."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._flexmodel import FlexModel
from ._grouped import DENSE_IMPLS, grouped_matmul
from ._state import ServeState, stack

__all__ = ["Router", "Server", "run", "apply_per_task", "APPLY_MODES"]

PyTree = Any
APPLY_MODES = ("auto", "gather", "segment")


def _unpack(packed: jax.Array, shape: tuple, is_packed: bool) -> jax.Array:
    if not is_packed:
        return packed
    numel = math.prod(shape)
    bits = jnp.unpackbits(packed, axis=-1, count=numel, bitorder="little")
    return bits.reshape((packed.shape[0],) + tuple(shape))


def _nested(flat: Mapping[str, Any]) -> Any:
    """``{"": a}`` -> ``a``; ``{"a/b": x}`` -> ``{"a": {"b": x}}``."""
    if set(flat) == {""}:
        return flat[""]
    out: dict = {}
    for key, v in flat.items():
        node = out
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _lift_rows(p: jax.Array, ndim: int) -> jax.Array:
    """Per-row ``[b, *s]`` -> ``[b, 1, ..., *s]`` of rank ``ndim`` (row-aligned)."""
    return p.reshape(p.shape[:1] + (1,) * (ndim - p.ndim) + p.shape[1:])


class Router:
    """Block-by-block access to a :class:`ServeState` for one mixed batch.

    Built inside the (jitted) forward by :func:`run` / :class:`Server`; the
    model's forward calls :meth:`dense`, :meth:`params` and :meth:`apply` with
    parameter paths. Per block, the deployed variants and the rows' grouping
    are computed once per call and shared by every use.

    Rows are grouped per block in one of two ways:

    * ``presorted=False``: at each block the rows are sorted by the block's
      variant (a permutation in and out of every grouped op); segments are
      the variants.
    * ``presorted=True`` (the caller sorted the rows by task id once, as
      :class:`Server` does): no permutation per block; the segments are the
      tasks, each using its variant's parameters (consecutive tasks routed to
      one set use the same kernel, so still no copies).

    Args:
      state: the stacked model.
      task_ids: ``int32[batch]`` task of each row (sorted if ``presorted``).
      dense_impl: :func:`grouped_matmul` implementation.
      tile: rows per tile of grouped matmuls (default automatic).
      apply_mode: default mode of :meth:`apply`.
      presorted: rows are sorted by task id.
    """

    def __init__(self, state: ServeState, task_ids, *, dense_impl: str = "auto",
                 tile: int | None = None, apply_mode: str = "auto", presorted: bool = False):
        if dense_impl not in DENSE_IMPLS:
            raise ValueError(f"dense_impl must be one of {DENSE_IMPLS}, got {dense_impl!r}")
        if apply_mode not in APPLY_MODES:
            raise ValueError(f"apply_mode must be one of {APPLY_MODES}, got {apply_mode!r}")
        self.state = state
        self.task_ids = jnp.asarray(task_ids, jnp.int32)
        if self.task_ids.ndim != 1:
            raise ValueError(f"task_ids must be 1-d [batch], got shape {self.task_ids.shape}")
        self.batch = int(self.task_ids.shape[0])
        self.dense_impl = dense_impl
        self.tile = tile
        self.apply_mode = apply_mode
        self.presorted = bool(presorted)
        self._pools: dict[tuple[str, str], jax.Array] = {}
        self._rows: dict[str, jax.Array] = {}
        self._segs: dict[str, tuple] = {}

    # -- lookup
    def _leaves_under(self, path: str) -> list[str]:
        lb = self.state.leaf_block
        if path in lb:
            return [path]
        out = [lf for lf in lb if lf.startswith(path + "/")]
        if not out:
            raise KeyError(f"no parameter at or under {path!r} in the served model "
                           f"(blocks: {list(self.state.blocks)[:8]}...)")
        return out

    def block_of(self, leaf: str) -> str:
        """The block holding parameter ``leaf``."""
        try:
            return self.state.leaf_block[leaf]
        except KeyError:
            raise KeyError(f"no parameter {leaf!r} in the served model") from None

    def variants(self, block: str) -> jax.Array:
        """``int32[batch]``: each row's variant (set or masked task) of ``block``."""
        if block not in self._rows:
            self._rows[block] = self.state.blocks[block].variant[self.task_ids]
        return self._rows[block]

    def pool(self, leaf: str) -> jax.Array:
        """``[V, *shape]``: every variant of parameter ``leaf`` (sets, then the
        masked tasks' deployed values)."""
        name = self.block_of(leaf)
        key = (name, leaf)
        if key not in self._pools:
            b = self.state.blocks[name]
            sets = b.sets[leaf]
            if b.num_masked:
                shape = b.shapes[b.leaves.index(leaf)]
                base = b.base[leaf].astype(jnp.float32)[None]
                w = sets[b.mask_set].astype(jnp.float32)
                m = _unpack(b.masks[leaf], shape, b.packed).astype(jnp.float32)
                gamma = b.rescalers.reshape((-1,) + (1,) * len(shape))
                dep = (base + (w - base) * (m * gamma)).astype(sets.dtype)
                sets = jnp.concatenate([sets, dep], axis=0)
            self._pools[key] = sets
        return self._pools[key]

    def _segments(self, key: str, rows: jax.Array | None = None, ids: jax.Array | None = None,
                  nv: int | None = None):
        """``(perm, inv, sizes, ids, seg_sorted)`` grouping the rows for block
        ``key``: ``perm``/``inv`` (``None`` when presorted) order the rows into
        segments of ``sizes`` rows using variant ``ids[j]`` (``None``: segment j
        is variant j); ``seg_sorted`` is each sorted row's segment."""
        if key not in self._segs:
            if self.presorted:
                n = self.state.n
                sizes = jnp.bincount(self.task_ids, length=n).astype(jnp.int32)
                if ids is None and key in self.state.blocks:
                    ids = self.state.blocks[key].variant
                self._segs[key] = (None, None, sizes, ids, self.task_ids)
            else:
                if rows is None:
                    rows, nv = self.variants(key), self.state.blocks[key].num_variants
                perm = jnp.argsort(rows, stable=True)
                inv = jnp.zeros_like(perm).at[perm].set(jnp.arange(self.batch, dtype=perm.dtype))
                sizes = jnp.bincount(rows, length=nv).astype(jnp.int32)
                self._segs[key] = (perm, inv, sizes, None, rows[perm])
        return self._segs[key]

    # -- per-row parameters
    def param(self, leaf: str) -> jax.Array:
        """``[batch, *shape]``: each row's value of parameter ``leaf``."""
        pool = self.pool(leaf)
        if pool.shape[0] == 1:
            return jnp.broadcast_to(pool, (self.batch,) + pool.shape[1:])
        return pool[self.variants(self.block_of(leaf))]

    def params(self, path: str) -> PyTree:
        """Each row's parameters under ``path`` (gathered): an array
        ``[batch, *shape]`` for a leaf, else a nested dict with the path
        prefix removed (e.g. ``{"scale": [b, d], "bias": [b, d]}``)."""
        leaves = self._leaves_under(path)
        return _nested({_rel(lf, path): self.param(lf) for lf in leaves})

    # -- grouped computation
    def dense(self, path: str, x: jax.Array, *, kernel: str = "kernel", bias: str | None = "bias",
              impl: str | None = None, tile: int | None = None) -> jax.Array:
        """``x @ kernel + bias`` with each row's own kernel and bias.

        Args:
          path: the layer's path; its parameters are ``path/kernel``
            (``[in, out]``) and, if present, ``path/bias`` (``[out]``). A leaf
            path is taken as the kernel itself.
          x: ``[batch, ..., in]``.
          kernel, bias: leaf names under ``path`` (``bias=None``: no bias).
          impl, tile: override the router's :func:`grouped_matmul` settings.
        """
        lb = self.state.leaf_block
        kleaf = f"{path}/{kernel}" if f"{path}/{kernel}" in lb else path
        blk = self.block_of(kleaf)
        w = self.pool(kleaf)
        if w.ndim != 3:
            raise ValueError(f"dense: {kleaf!r} has shape {w.shape[1:]}, expected [in, out]")
        if x.shape[0] != self.batch:
            raise ValueError(f"dense: x has {x.shape[0]} rows, the batch has {self.batch}")
        if w.shape[0] == 1:
            y = x @ w[0].astype(x.dtype)
        else:
            perm, inv, sizes, ids, _ = self._segments(blk)
            mid = math.prod(x.shape[1:-1])
            xs = x if perm is None else x[perm]
            y = grouped_matmul(xs.reshape(self.batch * mid, x.shape[-1]), w, sizes * mid,
                               group_ids=ids, impl=impl or self.dense_impl, tile=tile or self.tile)
            y = y.reshape(x.shape[:-1] + (w.shape[-1],))
            if inv is not None:
                y = y[inv]
        bleaf = f"{path}/{bias}" if bias is not None else None
        if bleaf is not None and bleaf in lb:
            bp = self.pool(bleaf)
            if bp.shape[0] == 1:
                y = y + bp[0].astype(y.dtype).reshape((1,) * (y.ndim - 1) + bp.shape[1:])
            else:
                y = y + _lift_rows(self.param(bleaf).astype(y.dtype), y.ndim)
        return y

    def apply(self, path: str, fn: Callable, *xs: jax.Array, mode: str | None = None,
              tile: int | None = None) -> PyTree:
        """``fn(p, *xs)`` with each row's parameters ``p`` under ``path``.

        Args:
          path: module path; ``p`` is its parameter sub-pytree with the prefix
            removed (for a leaf path: the array).
          fn: applies the module to a batch: ``fn(p, *xs) -> ys`` with
            ``xs``/``ys`` batch-leading and rows independent.
          xs: ``[batch, ...]`` inputs.
          mode: ``"gather"`` (every row its parameters, ``fn`` vmapped over
            rows: for small modules), ``"segment"`` (rows grouped into tiles
            of one variant each, ``fn`` vmapped over the tiles with each
            tile's parameters), ``"auto"`` (gather when the module has no more
            parameters than a row has inputs).
          tile: rows per tile (segment; default ``~batch / (4 segments)``).

        Parameters of ``path`` held by several blocks are grouped by task
        (per-task copies of the module, transient).
        """
        mode = mode or self.apply_mode
        if mode not in APPLY_MODES:
            raise ValueError(f"mode must be one of {APPLY_MODES}, got {mode!r}")
        leaves = self._leaves_under(path)
        blocks = {self.block_of(lf) for lf in leaves}
        if len(blocks) == 1:
            (blk,) = blocks
            pools = {lf: self.pool(lf) for lf in leaves}
            rows = self.variants(blk)
            seg = lambda: self._segments(blk)  # noqa: E731
        else:  # several blocks: one group per task
            pools = {lf: self.pool(lf)[self.state.blocks[self.block_of(lf)].variant]
                     for lf in leaves}
            rows = self.task_ids
            n = self.state.n
            seg = lambda: self._segments("\0tasks", rows, jnp.arange(n, dtype=jnp.int32), n)  # noqa: E731
        rel = {lf: _rel(lf, path) for lf in leaves}
        if all(p.shape[0] == 1 for p in pools.values()):
            return fn(_nested({rel[lf]: p[0] for lf, p in pools.items()}), *xs)
        if mode == "auto":
            numel = sum(math.prod(p.shape[1:]) for p in pools.values())
            per_row = sum(math.prod(x.shape[1:]) for x in xs)
            mode = "gather" if numel <= per_row else "segment"
        if mode == "gather":
            prow = _nested({rel[lf]: p[rows] for lf, p in pools.items()})
            one = jax.vmap(lambda p, *x: fn(p, *(xi[None] for xi in x)))(prow, *xs)
            return jax.tree.map(lambda a: a[:, 0], one)
        perm, _, sizes, ids, segs = seg()
        b = self.batch
        ns = int(sizes.shape[0])
        c = int(tile) if tile else max(1, -(-b // (4 * ns)))
        nt = -(-b // c) + ns
        tiles_per = -(-sizes // c)
        tile_start = jnp.cumsum(tiles_per) - tiles_per
        seg_start = jnp.cumsum(sizes) - sizes
        pos = jnp.arange(b, dtype=jnp.int32) - seg_start[segs]
        tile_of = tile_start[segs] + pos // c
        slot = pos % c
        src = jnp.arange(b, dtype=jnp.int32) if perm is None else perm.astype(jnp.int32)
        index = jnp.full((nt, c), b, jnp.int32).at[tile_of, slot].set(src)
        tile_seg = jnp.zeros((nt,), jnp.int32).at[tile_of].set(segs.astype(jnp.int32))
        tile_var = tile_seg if ids is None else ids[tile_seg]
        loc = jnp.zeros((b,), jnp.int32).at[src].set(tile_of * c + slot)
        xt = [jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[index] for x in xs]
        pt = _nested({rel[lf]: p[tile_var] for lf, p in pools.items()})
        yt = jax.vmap(fn)(pt, *xt)
        return jax.tree.map(lambda a: a.reshape((nt * c,) + a.shape[2:])[loc], yt)


def _rel(leaf: str, path: str) -> str:
    return "" if leaf == path else leaf[len(path) + 1:]


# ----------------------------------------------------------------------------- running


def run(forward: Callable, state: ServeState, task_ids, *inputs, dense_impl: str = "auto",
        tile: int | None = None, apply_mode: str = "auto", presort: bool = True):
    """One mixed batch: ``forward(router, *inputs)`` (wrap in ``jax.jit``).

    Args:
      forward: ``forward(r: Router, *inputs) -> outputs``.
      state: the stacked model.
      task_ids: ``int32[batch]``.
      inputs: batch-leading arrays.
      dense_impl, tile, apply_mode: as :class:`Router`.
      presort: sort the rows by task once (inputs in, outputs back: every
        input and output leaf must be batch-leading) so that no block
        permutes rows; ``False`` sorts per block instead.
    """
    opts = dict(dense_impl=dense_impl, tile=tile, apply_mode=apply_mode)
    task_ids = jnp.asarray(task_ids, jnp.int32)
    if not presort:
        return forward(Router(state, task_ids, **opts), *inputs)
    perm = jnp.argsort(task_ids, stable=True)
    inv = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))
    inputs = jax.tree.map(lambda a: a[perm], inputs)
    out = forward(Router(state, task_ids[perm], presorted=True, **opts), *inputs)
    return jax.tree.map(lambda a: a[inv], out)


class Server:
    """A jitted multi-task server of one stacked model.

    Args:
      model: a FlexModel (stacked with ``per_task`` / ``dtype``) or a
        :class:`ServeState`.
      forward: ``forward(r: Router, *inputs) -> outputs`` (see the module
        docstring; :func:`flexmerge_jax.zoo.vit_forward` for the zoo).
      per_task, dtype, pack_masks: as :func:`stack`.
      dense_impl, tile, apply_mode, presort: as :func:`run`.

    ``server(task_ids, *inputs)`` runs one mixed batch. It compiles once per
    batch shape (and per number of sets per block): task ids, their mix and
    the routing tables are data. ``server.traces`` counts compilations.
    """

    def __init__(self, model: FlexModel | ServeState, forward: Callable, *,
                 per_task: Mapping[str, Sequence[PyTree]] | None = None, dtype=None,
                 pack_masks: bool = True, dense_impl: str = "auto", tile: int | None = None,
                 apply_mode: str = "auto", presort: bool = True):
        self.state = model if isinstance(model, ServeState) else stack(
            model, per_task=per_task, dtype=dtype, pack_masks=pack_masks)
        self.forward = forward
        self.traces = 0
        opts = dict(dense_impl=dense_impl, tile=tile, apply_mode=apply_mode, presort=presort)

        def call(state, task_ids, *inputs):
            self.traces += 1
            return run(forward, state, task_ids, *inputs, **opts)

        self._jit = jax.jit(call)

    def __call__(self, task_ids, *inputs):
        if not isinstance(task_ids, jax.core.Tracer):
            t = np.asarray(task_ids)
            if t.ndim != 1 or (t.size and (t.min() < 0 or t.max() >= self.state.n)):
                raise ValueError(f"task_ids must be 1-d with values in [0, {self.state.n})")
        return self._jit(self.state, jnp.asarray(task_ids, jnp.int32), *inputs)

    def lower(self, task_ids, *inputs):
        """``jax.jit(...).lower`` for these shapes (``.compile()`` it to time
        compilation alone)."""
        return self._jit.lower(self.state, jnp.asarray(task_ids, jnp.int32), *inputs)

    def swap(self, model: FlexModel | ServeState, **stack_kwargs) -> None:
        """Serve another model (another cut or routing); no recompilation when
        every block keeps its number of sets and masked tasks."""
        self.state = model if isinstance(model, ServeState) else stack(model, **stack_kwargs)


def apply_per_task(model: FlexModel, fn: Callable, task_ids, *inputs,
                   per_task: Mapping[str, Sequence[PyTree]] | None = None,
                   pad_value: float = -np.inf) -> np.ndarray:
    """The per-task baseline: each task's rows through ``params_for_task``.

    Args:
      model: the FlexModel.
      fn: ``fn(params, *inputs) -> [rows, ...]`` the model's plain apply
        (jitted here once per shape).
      task_ids: ``[batch]`` task of each row.
      inputs: ``[batch, ...]`` arrays.
      per_task: extra per-task parameters merged into each task's params
        (a dict params pytree) under their names, as in :func:`stack`.
      pad_value: fills trailing positions when tasks' outputs differ in their
        last axis (e.g. heads with different class counts).

    Returns:
      A numpy array ``[batch, ...]`` in the rows' order.
    """
    task_ids = np.asarray(task_ids)
    jfn = jax.jit(fn)
    inputs = [np.asarray(x) for x in inputs]
    outs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in np.unique(task_ids):
        rows = np.nonzero(task_ids == t)[0]
        params = model.params_for_task(int(t))
        if per_task:
            if not isinstance(params, Mapping):
                raise ValueError("per_task needs a dict params pytree")
            params = dict(params)
            for name, trees in per_task.items():
                params[name] = trees[int(t)]
        outs[int(t)] = (rows, np.asarray(jfn(params, *(x[rows] for x in inputs))))
    first = next(iter(outs.values()))[1]
    width = max(o.shape[-1] for _, o in outs.values()) if first.ndim > 1 else None
    shape = (len(task_ids),) + first.shape[1:-1] + ((width,) if width is not None else ())
    out = np.full(shape, pad_value if np.issubdtype(first.dtype, np.floating) else 0, first.dtype)
    for rows, o in outs.values():
        if width is None:  # one value per row
            out[rows] = o
        else:
            out[rows, ..., : o.shape[-1]] = o
    return out
