"""Multi-task serving of a :class:`~flexmerge_jax.FlexModel`: one batch, many tasks.

A FlexModel of size s holds, per block, g_b parameter sets and a routing
table task -> set. :func:`stack` puts it on the device *as it is counted*:
each block's sets stacked into ``[g_b, ...]`` arrays (never one copy per
task), plus, for mask methods, the base ``theta0``, one bit-packed boolean
mask per task of a masked set and its rescaler. A batch then mixes tasks
(``task_ids: int32[batch]``) and runs **block by block**: at each block every
row uses the parameters its task is routed to, and rows routed to the same set
share one computation:

* **grouped matmuls** (:meth:`Router.dense`): rows in contiguous segments of
  one set are multiplied in static tiles, each tile piece by its own set's
  kernel (:func:`grouped_matmul`: ``"tiled"`` one batched matmul over all
  pieces, ``"scan"`` one piece after the other, ``"ragged"``
  :func:`jax.lax.ragged_dot`);
* **segmented application** of any block function (:meth:`Router.apply`):
  rows cut into tiles of one set each, the block function ``vmap``-ed over
  the tiles with each tile's parameters;
* **gathers** for small blocks (LayerNorm scales, biases, embeddings,
  :meth:`Router.params`): each row gets its set's parameters.

Segments: by default (``presort=True``) the batch is sorted by task id once,
on entry (and the outputs put back in order on exit), so that no block
permutes rows: a block's segments are the tasks, each using its set's kernel
(consecutive tasks of one set share the kernel, not a copy). With
``presort=False`` each block sorts the rows by its own set instead (two row
gathers per grouped op, segments = sets).

Routing tables and task ids are *data* (int32 arrays), not static: one
compilation serves every batch composition and every routing of a model with
the same number of sets per block (e.g. the same model after a re-plan, or any
cut with the same ``g_b``); only the batch size and the per-block set counts
are static.

Wiring a model
--------------
A generic pytree apply cannot be cut at blocks automatically, so the model's
forward is written once against a :class:`Router` ``r`` instead of a params
pytree. Parameters are addressed by their **paths in the params pytree**
("/"-joined, as :func:`flexmerge_jax.tree.leaf_names` names them), so the same
forward works for any block specification: the block that holds a parameter
decides which rows share it. Per kind of layer the user provides

* linear layers: ``r.dense("blocks/0/mlp/fc1", x)`` (``.../kernel`` ``[in, out]``
  and an optional ``.../bias``; ``x: [batch, ..., in]``);
* small parameters used directly: ``r.params("ln_pre")`` gives every row its
  own ``{"scale": [batch, d], "bias": [batch, d]}`` (a leaf path gives one
  array ``[batch, *shape]``);
* any other module: a function ``fn(p, x)`` that applies it to a batch, with
  ``p`` the module's parameters (the sub-pytree under the path, path prefix
  removed, e.g. ``{"qkv": {...}, "out": {...}}`` for ``blocks/0/attn``):
  ``r.apply("blocks/0/attn", fn, x)``. For a Flax nnx layer,
  ``fn = nnx_block(model.layers[i])`` calls the layer with ``p``.

and calls them in the model's order; parameter-free computation (residuals,
activations, attention scores) is written as usual on the whole batch.
:func:`vit_forward` is this for the zoo ViT; ``examples/serve_nnx.py`` does it
for an nnx module with a list of layers. Parameters kept per task outside the
FlexModel (classification heads) join with ``stack(model, per_task={"head":
heads})`` and are addressed as ``"head"``.

Memory and compute
------------------
Device memory is what :attr:`FlexModel.n_models` counts (see
:meth:`ServeState.nbytes`): g_b copies of each block, plus for a block with a
masked set the base and ``ceil(numel/8)`` bytes per task mask (the reference's
1/32 of a float32 parameter per entry) and one float per rescaler. Masked
parameters are deployed on the fly: at each call every masked block computes
``theta0 + gamma_k * M_k * (W - theta0)`` for its masked tasks (elementwise,
``O(n_masked * numel_b)`` per call, independent of the batch size), which
lives only while that block runs — the transient peak is one block's deployed
variants, never the full per-task model (``pack_masks=False`` keeps bool
masks, 8x their memory, to skip the unpacking). Grouped matmuls compute
``rows + (segments - 1) * tile`` rows instead of ``rows * sets``
(``"ragged"`` outside TPUs lowers to a masked dense product over all sets);
``"tiled"`` also gathers one kernel per piece (``O((rows / tile + segments)
* numel)`` transient), ``"scan"`` runs the pieces in a loop without copies.
Blocks with one set skip all grouping. Measured on 2 CPU cores with the tiny
zoo ViT (benchmarks/serve), a mixed batch at 1x runs ~1.2-1.45x faster than
the 8 fine-tuned models one by one, at ~2x on par, at 4x-8x ~0.8-0.9x (the
grouping overhead of width-64 layers), with ``n_models`` x the memory of one
model instead of n x.

Example (the zoo)::

    z = zoo.load()
    model = fm.plan(z.base, z.finetuned, blocks="vit", method="ta").at_size(2.0)
    srv = serve.Server(model, serve.vit_forward, per_task={"head": serve.zoo_heads(z.heads)})
    logits = srv(task_ids, images)        # [batch, max classes]; other classes -inf
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._flexmodel import FlexModel

__all__ = [
    "BlockStack",
    "ServeState",
    "Router",
    "Server",
    "stack",
    "run",
    "grouped_matmul",
    "apply_per_task",
    "vit_forward",
    "zoo_heads",
    "nnx_block",
]

PyTree = Any
DENSE_IMPLS = ("auto", "tiled", "scan", "ragged")
APPLY_MODES = ("auto", "gather", "segment")


# ----------------------------------------------------------------------------- state


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class BlockStack:
    """One block on the device: its stacked sets, routing and masks.

    Variants: ``0..g-1`` are the sets themselves; ``g + j`` is masked slot j
    (a task routed to a masked set), deployed as
    ``base + (sets[mask_set[j]] - base) * (unpack(masks[j]) * rescalers[j])``.

    Attributes:
      sets: ``{leaf: [g, *shape]}`` (full leaf names).
      variant: ``int32[n]`` the variant of each task (routing, as data).
      base: ``{leaf: [*shape]}`` or ``None`` (only with masked sets).
      masks: ``{leaf: uint8[n_masked, ceil(numel / 8)]}`` bit-packed
        (little bit order) or ``{leaf: bool[n_masked, *shape]}``, or ``None``.
      mask_set: ``int32[n_masked]`` the set of each masked slot, or ``None``.
      rescalers: ``float32[n_masked]``, or ``None``.
      name: block name (static).
      leaves: leaf names (static).
      shapes: leaf shapes (static).
      kind: ``"block"``, ``"unmatched"`` (a parameter in no block, per task)
        or ``"per_task"`` (e.g. a classification head).
      packed: masks are bit-packed.
    """

    sets: dict
    variant: Any
    base: dict | None = None
    masks: dict | None = None
    mask_set: Any = None
    rescalers: Any = None
    name: str = ""
    leaves: tuple = ()
    shapes: tuple = ()
    kind: str = "block"
    packed: bool = True

    def tree_flatten(self):
        children = (self.sets, self.variant, self.base, self.masks, self.mask_set, self.rescalers)
        return children, (self.name, self.leaves, self.shapes, self.kind, self.packed)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def num_sets(self) -> int:
        return int(self.sets[self.leaves[0]].shape[0])

    @property
    def num_masked(self) -> int:
        return 0 if self.mask_set is None else int(self.mask_set.shape[0])

    @property
    def num_variants(self) -> int:
        return self.num_sets + self.num_masked

    @property
    def numel(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


@jax.tree_util.register_pytree_node_class
class ServeState:
    """A FlexModel stacked for serving (a pytree: pass it to jitted functions).

    Attributes:
      blocks: ``{name: BlockStack}`` — the model's blocks, one pseudo-block
        per unmatched parameter (``kind="unmatched"``, one set per task) and
        one per ``per_task`` entry (``kind="per_task"``).
      task_names: the n task names.
      info: ``{"n_models", "method", "stored_parameters"}`` of the source
        model (host-side only; empty inside jitted code).
    """

    def __init__(self, blocks: Mapping[str, BlockStack], task_names: Sequence[str], info=None):
        self.blocks = dict(blocks)
        self.task_names = tuple(task_names)
        self.info = dict(info or {})
        self.leaf_block = {leaf: name for name, b in self.blocks.items() for leaf in b.leaves}

    def tree_flatten(self):
        names = tuple(self.blocks)
        return tuple(self.blocks[k] for k in names), (names, self.task_names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        names, task_names = aux
        return cls(dict(zip(names, children)), task_names)

    @property
    def n(self) -> int:
        return len(self.task_names)

    def nbytes(self) -> dict[str, int]:
        """Bytes held on the device, by kind.

        ``params``: stacked sets and bases of the model's blocks and unmatched
        parameters — exactly ``itemsize * (stored parameters without the mask
        term)``; ``masks``: bit-packed masks; ``tables``: routing tables and
        rescalers; ``per_task``: extra per-task parameters (heads); ``total``.
        """
        out = {"params": 0, "masks": 0, "tables": 0, "per_task": 0}
        for b in self.blocks.values():
            p = sum(int(a.nbytes) for a in b.sets.values())
            p += sum(int(a.nbytes) for a in (b.base or {}).values())
            out["per_task" if b.kind == "per_task" else "params"] += p
            out["masks"] += sum(int(a.nbytes) for a in (b.masks or {}).values())
            out["tables"] += sum(
                int(a.nbytes) for a in (b.variant, b.mask_set, b.rescalers) if a is not None
            )
        out["total"] = sum(out.values())
        return out

    def stored_parameters(self) -> float:
        """Held entries in the reference's accounting (one mask bit = 1/32).

        Equals :meth:`FlexModel.stored_parameters` up to the byte padding of
        each packed mask (at most 7 bits per leaf and mask); per-task extras
        (heads) are not counted, as in the model.
        """
        total = 0.0
        for b in self.blocks.values():
            if b.kind == "per_task":
                continue
            total += sum(int(a.size) for a in b.sets.values())
            total += sum(int(a.size) for a in (b.base or {}).values())
            for a in (b.masks or {}).values():
                total += (a.size * 8 if b.packed else a.size) / 32
        return total

    def summary(self) -> str:
        nb = self.nbytes()
        lines = [
            f"ServeState: {self.n} tasks, {len(self.blocks)} blocks, "
            + ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in nb.items())
        ]
        for name, b in self.blocks.items():
            lines.append(
                f"  {name}: {b.num_sets} set(s)"
                + (f" + {b.num_masked} masked task(s)" if b.num_masked else "")
                + (f" [{b.kind}]" if b.kind != "block" else "")
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ServeState(n={self.n}, blocks={len(self.blocks)}, bytes={self.nbytes()['total']})"


def _as_array(x, dtype):
    a = jnp.asarray(x)
    if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(dtype)
    return a


def stack(
    model: FlexModel,
    *,
    per_task: Mapping[str, Sequence[PyTree]] | None = None,
    dtype=None,
    pack_masks: bool = True,
) -> ServeState:
    """Stacks a FlexModel for serving: per block its g_b sets, never per task.

    Args:
      model: the deployed model (any size, any method).
      per_task: extra per-task parameters that are not in the model (e.g.
        ``{"head": [head_0, ..., head_{n-1}]}``): each a list of n pytrees of
        identical structure and shapes (pad them first, see
        :func:`zoo_heads`), addressed by ``"<name>/<leaf path>"``.
      dtype: cast floating parameters (e.g. ``jnp.bfloat16``); ``None`` keeps
        the model's dtypes. Masked deployment is computed in float32.
      pack_masks: bit-pack masks (8 per byte, the size the model is counted
        with); ``False`` keeps one bool byte per entry (8x the masks' memory,
        no unpacking per call).

    Returns:
      A :class:`ServeState`; the FlexModel can be dropped afterwards.
    """
    n = model.n
    blocks: dict[str, BlockStack] = {}
    for name, b in model.blocks.items():
        g = len(b.sets)
        sets = {k: _as_array(jnp.stack([jnp.asarray(s[k]) for s in b.sets]), dtype) for k in b.leaves}
        routing = np.asarray(b.routing, np.int32)
        masked = np.asarray(b.masked, bool)
        slots = [t for t in range(n) if masked[routing[t]]]
        variant = routing.copy()
        for j, t in enumerate(slots):
            variant[t] = g + j
        shapes = tuple(tuple(int(d) for d in sets[k].shape[1:]) for k in b.leaves)
        base = masks = mask_set = rescalers = None
        if slots:
            base = {k: _as_array(b.base[k], dtype) for k in b.leaves}
            masks = {}
            for k in b.leaves:
                m = np.stack([np.asarray(b.masks[t][k], bool).reshape(-1) for t in slots])
                masks[k] = jnp.asarray(np.packbits(m, axis=-1, bitorder="little") if pack_masks
                                       else m.reshape((len(slots),) + sets[k].shape[1:]))
            mask_set = jnp.asarray(routing[slots], jnp.int32)
            rescalers = jnp.asarray(np.asarray(b.rescalers, np.float32)[slots])
        blocks[name] = BlockStack(sets, jnp.asarray(variant), base, masks, mask_set, rescalers,
                                  name, tuple(b.leaves), shapes, "block", bool(pack_masks))
    for leaf in model.partition.unmatched:
        a = _as_array(jnp.stack([jnp.asarray(u[leaf]) for u in model.unmatched]), dtype)
        blocks[leaf] = BlockStack({leaf: a}, jnp.arange(n, dtype=jnp.int32), name=leaf,
                                  leaves=(leaf,), shapes=(tuple(a.shape[1:]),), kind="unmatched")
    from .tree import flatten as tree_flatten

    for name, trees in (per_task or {}).items():
        if len(trees) != n:
            raise ValueError(f"per_task[{name!r}] has {len(trees)} entries, expected {n} (one per task)")
        flat = [tree_flatten(t) for t in trees]
        names0 = flat[0][0]
        for i, (nm, lv, _) in enumerate(flat):
            if nm != names0 or [np.shape(x) for x in lv] != [np.shape(x) for x in flat[0][1]]:
                raise ValueError(f"per_task[{name!r}][{i}] differs in structure or shapes from "
                                 f"entry 0; pad them to common shapes (see zoo_heads)")
        leaves = tuple(f"{name}/{k}" if k else name for k in names0)
        sets = {leaf: _as_array(jnp.stack([jnp.asarray(f[1][j]) for f in flat]), dtype)
                for j, leaf in enumerate(leaves)}
        if name in blocks or any(lf in model.layout.names for lf in leaves):
            raise ValueError(f"per_task name {name!r} collides with a model parameter or block")
        blocks[name] = BlockStack(sets, jnp.arange(n, dtype=jnp.int32), name=name, leaves=leaves,
                                  shapes=tuple(tuple(sets[lf].shape[1:]) for lf in leaves),
                                  kind="per_task")
    info = {"n_models": model.n_models, "method": model.method.describe(),
            "stored_parameters": model.stored_parameters()}
    return ServeState(blocks, model.task_names, info)


# ----------------------------------------------------------------------------- kernels


def _default_dense_impl(weight_entries: int | None = None) -> str:
    """TPU: ``ragged`` (a native grouped GEMM); CPU: ``scan`` (measured
    fastest, benchmarks/serve); GPU and others (not measured here): ``tiled``
    while the per-piece kernel gather stays under 2**24 entries, else ``scan``."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "ragged"
    if backend == "cpu":
        return "scan"
    return "tiled" if weight_entries is None or weight_entries <= 2**24 else "scan"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _auto_tile(rows: int, groups: int, impl: str = "tiled") -> int:
    # rows + (groups-1)*tile computed: a tile of rows/(4 groups) wastes <= 25%.
    return max(8, min(256 if impl == "scan" else 1024, _round_up(-(-rows // (4 * groups)), 8)))


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    group_ids: jax.Array | None = None,
    impl: str = "auto",
    tile: int | None = None,
) -> jax.Array:
    """``y[r] = x[r] @ w[group_ids[segment of r]]`` for rows in segments.

    Args:
      x: ``[m, k]`` rows in consecutive segments (segment j owns
        ``group_sizes[j]`` rows; ``sum(group_sizes) == m``).
      w: ``[g, k, n]`` kernels.
      group_sizes: ``int32[s]`` (data: any split of the rows, one compilation).
      group_ids: ``int32[s]`` the kernel of each segment (data; default
        ``arange(g)``, i.e. ``s == g`` segments sorted by kernel). Several
        segments may use one kernel (no copies, except for ``"ragged"``).
      impl: ``"tiled"`` (rows in static tiles; every (tile, group) piece is one
        batched matmul with its gathered kernel: ``m + (g-1)*tile`` rows of
        work), ``"scan"`` (the same pieces one after the other, no kernel
        gather), ``"ragged"`` (:func:`jax.lax.ragged_dot`: a grouped-GEMM
        kernel on TPU; elsewhere XLA expands it to a dense product over all
        g groups), ``"auto"`` (``ragged`` on TPU, ``scan`` on CPU, ``tiled``
        on GPU unless the kernel gather is large, then ``scan``).
      tile: rows per tile (tiled/scan); default ``~m / (4 s)``, a multiple of 8.

    Returns:
      ``[m, n]``.
    """
    if impl not in DENSE_IMPLS:
        raise ValueError(f"impl must be one of {DENSE_IMPLS}, got {impl!r}")
    m, k = x.shape
    g, _, nout = w.shape
    group_sizes = group_sizes.astype(jnp.int32)
    nseg = int(group_sizes.shape[0])
    if impl == "auto":
        c0 = int(tile) if tile else _auto_tile(m, nseg, "tiled")
        impl = _default_dense_impl((-(-m // c0) + nseg) * k * nout)
    if group_ids is None:
        if nseg != g:
            raise ValueError(f"{nseg} group sizes for {g} kernels: pass group_ids")
    else:
        group_ids = jnp.asarray(group_ids, jnp.int32)
    if impl == "ragged":
        ws = w if group_ids is None else w[group_ids]
        return jax.lax.ragged_dot(x, ws.astype(x.dtype), group_sizes)
    c = int(tile) if tile else _auto_tile(m, nseg, impl)
    t = -(-m // c)
    xp = jnp.pad(x, ((0, t * c - m), (0, 0)))
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    # Pieces: the intervals between all tile starts and all group starts; each
    # lies in one tile and one group (t + g of them, some empty).
    pts = jnp.sort(jnp.concatenate([jnp.arange(t, dtype=jnp.int32) * c, starts]))
    nxt = jnp.concatenate([pts[1:], jnp.full((1,), t * c, jnp.int32)])
    ptile = jnp.minimum(pts // c, t - 1)
    pgroup = jnp.minimum(jnp.searchsorted(ends, pts, side="right"), nseg - 1).astype(jnp.int32)
    if group_ids is not None:
        pgroup = group_ids[pgroup]
    offs = jnp.arange(c, dtype=jnp.int32)[None, :]
    if impl == "tiled":
        xt = xp.reshape(t, c, k)[ptile]
        y = jnp.einsum("ick,ikn->icn", xt, w[pgroup].astype(x.dtype))
        # Row r lies in the last piece starting at or before it (a gather,
        # not a scatter-add: every row is computed by exactly one piece).
        rows = jnp.arange(m, dtype=jnp.int32)
        piece = jnp.searchsorted(pts, rows, side="right").astype(jnp.int32) - 1
        return y.reshape(-1, nout)[piece * c + rows % c]

    # scan
    def body(i, out):
        r0 = ptile[i] * c
        xt = jax.lax.dynamic_slice_in_dim(xp, r0, c, axis=0)
        wi = jax.lax.dynamic_index_in_dim(w, pgroup[i], axis=0, keepdims=False).astype(x.dtype)
        y = xt @ wi
        row = r0 + offs[0]
        keep = (row >= pts[i]) & (row < nxt[i])
        cur = jax.lax.dynamic_slice_in_dim(out, r0, c, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep[:, None], y, cur), r0, axis=0)

    out = jnp.zeros((t * c, nout), jnp.result_type(x.dtype, w.dtype))
    out = jax.lax.fori_loop(0, t + nseg, body, out)
    return out[:m]


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


# ----------------------------------------------------------------------------- router


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
            pools = {lf: self.pool(lf)[self.state.blocks[self.block_of(lf)].variant] for lf in leaves}
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
        docstring; :func:`vit_forward` for the zoo).
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


# ----------------------------------------------------------------------------- the zoo ViT


def zoo_heads(heads: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The zoo's per-task heads padded to the most classes: zero kernel
    columns and ``-inf`` biases, so padded logits are ``-inf`` (argmax and
    softmax ignore them)."""
    c = max(int(np.shape(h["bias"])[0]) for h in heads)
    out = []
    for h in heads:
        k = np.asarray(h["kernel"], np.float32)
        b = np.asarray(h["bias"], np.float32)
        kp = np.zeros((k.shape[0], c), np.float32)
        kp[:, : k.shape[1]] = k
        bp = np.full((c,), -np.inf, np.float32)
        bp[: b.shape[0]] = b
        out.append({"kernel": kp, "bias": bp})
    return out


def _layer_norm_rows(r: Router, path: str, x: jax.Array, eps: float) -> jax.Array:
    p = r.params(path)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    scale = _lift_rows(p["scale"].astype(x.dtype), x.ndim)
    bias = _lift_rows(p["bias"].astype(x.dtype), x.ndim)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def vit_forward(r: Router, images: jax.Array, *, num_heads: int | None = None,
                head: str | None = "head") -> jax.Array:
    """Mixed-task forward of the zoo ViT (:mod:`flexmerge_jax.zoo.apply`).

    Linear layers (patch embedding, qkv, attention output, MLP, ``proj``,
    the head) are grouped matmuls; LayerNorms and the class/position
    embeddings are per-row gathers; attention scores are parameter-free.
    Works with any block specification of the zoo's parameters.

    Args:
      r: the router.
      images: ``[batch, 28, 28]`` pixel values 0..255.
      num_heads: attention heads (default: the zoo's).
      head: per-task head name in the state (``None`` or absent: return the
        backbone features ``[batch, feat_dim]``).

    Returns:
      Logits ``[batch, max classes]`` (``-inf`` beyond a task's classes with
      :func:`zoo_heads`) or features.
    """
    from .zoo import apply as F

    nh = num_heads or F.CONFIG.num_heads
    lb = r.state.leaf_block
    patch = int(round(math.sqrt(r.pool("embed/patch/kernel").shape[1])))
    x = F.patchify(F.preprocess(images), patch)
    x = r.dense("embed/patch", x)
    cls = r.param("embed/cls").astype(x.dtype)
    pos = r.param("embed/pos").astype(x.dtype)
    x = jnp.concatenate([cls[:, None, :], x], axis=1) + pos
    x = _layer_norm_rows(r, "ln_pre", x, F.LN_EPS)
    depth = len({lf.split("/")[1] for lf in lb if lf.startswith("blocks/")})
    for i in range(depth):
        p = f"blocks/{i}"
        h = _layer_norm_rows(r, f"{p}/ln_1", x, F.LN_EPS)
        bsz, t, w = h.shape
        hd = w // nh
        qkv = r.dense(f"{p}/attn/qkv", h).reshape(bsz, t, 3, nh, hd)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd)).astype(h.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(bsz, t, w)
        x = x + r.dense(f"{p}/attn/out", o)
        h = _layer_norm_rows(r, f"{p}/ln_2", x, F.LN_EPS)
        h = jax.nn.gelu(r.dense(f"{p}/mlp/fc1", h), approximate=False)
        x = x + r.dense(f"{p}/mlp/fc2", h)
    f = _layer_norm_rows(r, "ln_post", x[:, 0], F.LN_EPS)
    f = r.dense("proj", f, bias=None)
    if head is not None and head in r.state.blocks:
        return r.dense(head, f)
    return f


# ----------------------------------------------------------------------------- flax nnx


def nnx_block(module) -> Callable:
    """``fn(p, *xs)`` calling an nnx module with parameters ``p``.

    ``p`` is the module's :class:`flax.nnx.Param` state as a nested dict with
    string keys (the sub-pytree :meth:`Router.apply` passes for the module's
    path, e.g. ``{"kernel": ..., "bias": ...}`` for ``nnx.Linear``); other
    variables are taken from ``module``. The module itself is not modified.
    Use it as ``r.apply("layers/3", nnx_block(model.layers[3]), x)``.
    """
    from flax import nnx

    from .tree import flatten as tree_flatten

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    pure = params.to_pure_dict()
    names, _, treedef = tree_flatten(pure)

    def fn(p, *xs):
        flat = dict(zip(*tree_flatten(p)[:2])) if isinstance(p, Mapping) else {"": p}
        missing = [k for k in names if k not in flat]
        if missing:
            raise ValueError(f"nnx_block: parameter {missing[0]!r} of the module not given")
        state = jax.tree_util.tree_unflatten(treedef, [flat[k] for k in names])
        st = nnx.State(params)  # a copy: the module's own state stays untouched
        nnx.replace_by_pure_dict(st, state)
        return nnx.merge(graphdef, st, rest)(*xs)

    return fn
