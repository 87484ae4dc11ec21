"""Preprocessing, per-block statistics and materialization, block by block.

:class:`Prepared` wraps a :class:`~._source.Source` with one method's global
preprocessing (DARE, the whole-model TIES trim thresholds, PCB thresholds):
it hands out the preprocessed task vectors of one block at a time. The
statistics pass (:func:`grams`) and materialization (:func:`materialize_block`)
both read one block at a time, so peak memory is one block of all tasks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import prep
from .blocks import Partition
from .methods import Method
from ._schedule import canonical, named
from ._source import Source, _host_resident


class Prepared:
    """A source of task vectors with a method's global preprocessing applied.

    Global statistics (TIES thresholds, PCB thresholds) are computed at
    construction in streaming passes over all parameters; every task vector
    is checked for NaN/Inf whenever it is read (fused into its computation),
    and parameters outside the blocks are checked here, so nothing that is
    deployed goes unchecked.
    """

    def __init__(self, source: Source, partition: Partition, method: Method):
        self.source = source
        self.partition = partition
        self.method = method
        self.layout = source.layout
        self._index = self.layout.index()
        self._extra: dict[int, dict] = {}
        self._trim_threshold = None
        self._select = None
        self.pcb_lohi = None
        d = self.layout.total
        names = list(self.layout.names)

        def all_leaves():
            # Every parameter, including unmatched ones: the reference trims
            # (and computes PCB thresholds) before assigning blocks.
            for chunk in _chunks(names, self.layout.sizes):
                yield from self.source.task_vectors(chunk).values()

        self._all_leaves = all_leaves
        if method.trims:
            # First radix pass now; the second is either fused into the Gram
            # pass (see fused_trimmed_grams) or run when first needed.
            k = np.full((source.n,), prep.ties_keep_count(d, method.keep), np.int64)
            self._select = prep.RadixSelect(k, magnitude=True)
            self._select.first_pass(all_leaves())
        elif method.name == "pcb":
            self.pcb_lohi = prep.pcb_thresholds(all_leaves, method.keep, d)
        elif partition.unmatched:
            # Blocks are checked when read; unmatched parameters are deployed
            # as they are, so check them now.
            self.source.task_vectors(partition.unmatched)
        self.key = jax.random.key(int(method.seed)) if method.drop is not None else None

    @property
    def n(self) -> int:
        return self.source.n

    @property
    def trim_threshold(self) -> np.ndarray | None:
        """Per-task TIES thresholds ``f32[n]`` (``None`` when not trimming)."""
        if self._select is not None and self._trim_threshold is None:
            self._trim_threshold = self._select.second_pass(self._all_leaves())
        return self._trim_threshold

    def tau(self, b: int) -> dict[str, jax.Array]:
        """Raw task vectors ``{name: f32[n, ...]}`` of block ``b``."""
        return self.source.task_vectors(self.partition.blocks[b].leaves)

    def x(self, b: int, tau: dict | None = None) -> dict[str, jax.Array]:
        """Preprocessed task vectors of block ``b`` (what merges and similarity use)."""
        tau = self.tau(b) if tau is None else tau
        return self.preprocess(tau)

    def preprocess(self, tau: dict[str, jax.Array]) -> dict[str, jax.Array]:
        m = self.method
        if self.trim_threshold is not None:
            thr = jnp.asarray(self.trim_threshold)
            return {k: prep.trim(v, thr) for k, v in tau.items()}
        if m.drop is not None:
            return {
                k: prep.dare(v, self.key, m.drop, self._index[k]) for k, v in tau.items()
            }
        return tau

    def extra(self, b: int, x: dict | None = None) -> dict | None:
        """Per-block method state (PCB clip bounds and global thresholds; the
        DELLA key of the block)."""
        if self.method.name == "della":
            return {"key": jax.random.fold_in(jax.random.key(int(self.method.seed)), b)}
        if self.method.name != "pcb":
            return None
        if b not in self._extra:
            x = self.x(b) if x is None else x
            leaves = list(x.values())
            clo, chi = prep.pcb_clip_bounds(leaves, self.partition.blocks[b].numel)
            lo, hi = self.pcb_lohi
            self._extra[b] = {
                "clip_lo": jnp.asarray(clo),
                "clip_hi": jnp.asarray(chi),
                "lo": jnp.asarray(lo),
                "hi": jnp.asarray(hi),
            }
        return self._extra[b]


def _chunks(names: Sequence[str], sizes: Sequence[int], budget: int = 1 << 24):
    """Groups consecutive parameters into reads of about ``budget`` entries."""
    cur, total = [], 0
    for name, size in zip(names, sizes):
        cur.append(name)
        total += size
        if total >= budget:
            yield cur
            cur, total = [], 0
    if cur:
        yield cur


@jax.jit
def _gram(leaves: tuple) -> jax.Array:
    g = None
    for x in leaves:
        part = gram_dot(x.astype(jnp.float64), x.astype(jnp.float64))
        g = part if g is None else g + part
    return g


@jax.jit
def _gram32(leaves: tuple) -> jax.Array:
    g = None
    for x in leaves:
        part = gram_dot(x, x)
        g = part if g is None else g + part
    return g


GRAM_PRECISIONS = ("float64", "float32")


def gram_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``[n, ...] x [m, ...] -> [n, m]`` contracting every non-task axis.

    No reshape (illegal on explicitly sharded arrays); on a mesh each device
    contracts its shard and the ``[n, m]`` partial sums are all-reduced into
    a replicated result, so no task vector is gathered on one device.
    """
    axes = tuple(range(1, a.ndim))
    return jax.lax.dot_general(
        a, b, ((axes, axes), ((), ())), precision=jax.lax.Precision.HIGHEST,
        out_sharding=replicated_like(a),
    )


def replicated_like(x: jax.Array):
    """A replicated sharding on ``x``'s mesh (``None`` off a mesh)."""
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
    aval = getattr(x, "aval", None)
    sh = getattr(aval, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.axis_names:
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
    return None


def block_gram(x: dict[str, jax.Array], precision: str = "float64") -> np.ndarray:
    """Gram matrix ``f64[n, n]`` of one block's (preprocessed) task vectors.

    Args:
      x: ``{name: f32[n, ...]}``.
      precision: ``"float64"`` (products and sums in float64: exact decisions
        between near-equal similarities; the default) or ``"float32"``
        (HIGHEST-precision float32 matmul, as the reference computes; much
        faster, relative error ~1e-7).

    Host-resident blocks use the BLAS behind NumPy (several times faster
    than XLA's CPU dot for this ``[n, d] x [d, n]`` shape); device or sharded
    arrays use XLA (sharded: per-shard products, all-reduced).
    """
    if precision not in GRAM_PRECISIONS:
        raise ValueError(f"gram precision must be one of {GRAM_PRECISIONS}, got {precision!r}")
    leaves = tuple(x.values())
    if all(_host_resident(v) for v in leaves):
        n = leaves[0].shape[0]
        g = np.zeros((n, n), np.float64)
        chunk = max(4096, (1 << 20) // n)  # columns: ~8 MB of float64 per product
        for v in leaves:
            a = np.asarray(v).reshape(n, -1)
            if precision == "float32":
                a = a.astype(np.float32, copy=False)
                g += a @ a.T
                continue
            # Converted in cache-sized chunks: no full-size float64 copy.
            for j in range(0, a.shape[1], chunk):
                c = a[:, j:j + chunk].astype(np.float64)
                g += c @ c.T
        return g
    if precision == "float32":
        return np.asarray(_gram32(leaves), np.float64)
    with jax.enable_x64(True):
        return np.asarray(_gram(leaves), np.float64)


def grams(prepared: Prepared, *, raw: bool = False, precision: str = "float64") -> np.ndarray:
    """Per-block Gram matrices ``f64[B, n, n]`` in one pass over the blocks.

    Args:
      prepared: the preprocessed source.
      raw: use the raw task vectors instead of the preprocessed ones.
      precision: see :func:`block_gram`.
    """
    if not raw and prepared._select is not None and prepared._trim_threshold is None:
        fused = fused_trimmed_grams(prepared, precision)
        if fused is not None:
            return fused
    out = []
    for b in range(len(prepared.partition)):
        tau = prepared.tau(b)
        out.append(block_gram(tau if raw else prepared.x(b, tau), precision))
    return np.stack(out)


def fused_trimmed_grams(prepared: Prepared, precision: str) -> np.ndarray | None:
    """Gram matrices of TIES-trimmed task vectors with the radix select's
    second pass fused in: one read instead of two.

    After the first radix pass, an entry is kept if the high bits of its
    ``|x|`` exceed the threshold's bin, dropped if below, undecided in the
    bin. One pass over the blocks accumulates the Gram ``G_D`` of the kept
    entries and captures the coordinates where some task is undecided
    (typically well under 1%); those values finish the select exactly, and
    ``G = G_D - D_C D_C^T + X_C X_C^T`` over the captured coordinates ``C``
    completes the trimmed Gram. NumPy on the host, in cache-sized column
    chunks. Returns ``None`` (caller falls back) when the blocks are not
    host-resident (sharded or on an accelerator).
    """
    sel, part, n = prepared._select, prepared.partition, prepared.n
    prefix = np.asarray(sel.prefix, np.uint32)[:, None]
    wide = np.float64 if precision == "float64" else np.float32
    chunk = max(2048, (1 << 17) // n)
    grams_out, captured, values = [], [], []

    def scan(tvs: dict, gram: bool):
        g = np.zeros((n, n), np.float64)
        caps = []
        for v in tvs.values():
            if not _host_resident(v):
                return None
            a = np.asarray(v).reshape(n, -1)
            for j in range(0, a.shape[1], chunk):
                ac = a[:, j:j + chunk]
                hb = (ac.view(np.uint32) & 0x7FFFFFFF) >> 16  # high bits of |x|
                kept = hb > prefix  # decided kept
                if gram:
                    dd = np.multiply(ac, kept, dtype=wide)
                    g += dd @ dd.T
                cand = hb == prefix
                idx = np.flatnonzero(cand.any(axis=0))
                if idx.size:
                    ax = ac[:, idx]
                    caps.append((ax, ax * kept[:, idx]))
                    rows, cols = np.nonzero(cand[:, idx])
                    values.append((rows, np.abs(ax[rows, cols])))
        return g, caps

    for b in range(len(part)):
        res = scan(prepared.tau(b), True)
        if res is None:
            return None
        grams_out.append(res[0])
        captured.append(res[1])
    if part.unmatched:  # they count in the global threshold, not in any Gram
        if scan(prepared.source.task_vectors(part.unmatched), False) is None:
            return None
    rows = np.concatenate([r for r, _ in values]) if values else np.zeros(0, np.int64)
    vals = np.concatenate([v for _, v in values]) if values else np.zeros(0, np.float32)
    thr = sel.finish([vals[rows == i] for i in range(n)])
    prepared._trim_threshold = thr
    t = thr[:, None]
    for g, caps in zip(grams_out, captured):
        for a, dcap in caps:
            x = np.where(np.abs(a) >= t, a, 0.0).astype(np.float64)
            dc = dcap.astype(np.float64)
            g -= dc @ dc.T
            g += x @ x.T
    return np.stack(grams_out)


@functools.partial(jax.jit, static_argnames=("static",))
def _merge_groups(x, members, scales, extra, hp, *, static: Method):
    """``method.merge_group`` over groups ``members: bool[G, n]``, ``scales: f32[G]``."""

    def one(args):
        mb, sc = args
        return static.join({**hp, "scale": sc}).merge_group(x, mb, extra)

    return jax.lax.map(one, (members, scales))


def merge_groups(x: dict, members: np.ndarray, extra, method: Method, scales=None):
    """Merges several groups of one block; pads G to a power of two.

    Args:
      x: ``{name: f32[n, ...]}`` preprocessed task vectors of the block.
      members: ``bool[G, n]`` the groups.
      extra: per-block method state.
      method: the method.
      scales: optional per-group :math:`\\lambda` (``f32[G]``, validation
        tuning); default ``method.scale`` for every group.

    Returns:
      :class:`~.methods.GroupMerge` with a leading group axis ``[G, ...]``.
    """
    g = members.shape[0]
    bucket = 1 << max(0, (g - 1).bit_length())
    padded = np.zeros((bucket, members.shape[1]), bool)
    padded[:g] = members
    padded[g:, 0] = True  # dummy groups: harmless work, discarded below
    sc = np.full((bucket,), method.scale, np.float32)
    if scales is not None:
        sc[:g] = scales
    names = list(x)
    static, hp = method.split()
    out = _merge_groups(canonical(x), jnp.asarray(padded), jnp.asarray(sc), extra, hp, static=static)
    out = jax.tree.map(lambda a: a[:g], out)
    return out._replace(
        vector=named(out.vector, names),
        masks=None if out.masks is None else named(out.masks, names),
    )


@jax.jit
def _add_base(base, v):
    return (base.astype(jnp.float32) + v).astype(base.dtype)


def materialize_block(prepared: Prepared, b: int, groups, scales: dict | None = None):
    """The deployed :class:`~._flexmodel.BlockModel` of block ``b``.

    One vectorised merge over the block's merged groups; tasks in groups
    below the method's merge size keep their fine-tuned parameters.

    Args:
      prepared: the preprocessed source.
      b: block index.
      groups: the block's groups (task tuples).
      scales: ``{group: lambda}`` for groups with a tuned lambda.
    """
    from ._flexmodel import BlockModel

    src, method, n = prepared.source, prepared.method, prepared.n
    block = prepared.partition.blocks[b]
    groups = sorted(tuple(sorted(g)) for g in groups)
    merged = [g for g in groups if len(g) >= method.min_merged]
    base = src.base(block.leaves)
    fts = src.finetuned(block.leaves) if len(merged) < len(groups) else None
    gm = None
    if merged:
        x = prepared.x(b)
        members = np.zeros((len(merged), n), bool)
        for i, g in enumerate(merged):
            members[i, list(g)] = True
        tuned = scales or {}
        sc = np.array([tuned.get(g, method.scale) for g in merged], np.float32)
        gm = merge_groups(x, members, prepared.extra(b, x), method, sc)
    sets, masked, masks = [], [], {}
    routing = np.full((n,), -1, np.int32)
    rescalers = np.ones((n,), np.float32)
    gi = 0
    for g in groups:
        if len(g) >= method.min_merged:
            w = {k: _add_base(jnp.asarray(base[k]), gm.vector[k][gi]) for k in block.leaves}
            sets.append(w)
            masked.append(method.uses_masks)
            routing[list(g)] = len(sets) - 1
            if method.uses_masks:
                resc = np.asarray(gm.rescalers[gi])
                for t in g:
                    masks[t] = {k: gm.masks[k][gi, t] for k in block.leaves}
                    rescalers[t] = resc[t]
            gi += 1
        else:
            for t in g:
                sets.append(fts[t])
                masked.append(False)
                routing[t] = len(sets) - 1
    any_masked = any(masked)
    return BlockModel(
        name=block.name,
        leaves=block.leaves,
        groups=tuple(groups),
        routing=routing,
        sets=sets,
        masked=np.asarray(masked, bool),
        base=base if any_masked else None,
        masks=masks,
        rescalers=rescalers,
    )


def materialize(
    prepared: Prepared,
    groups_per_block: Sequence[Sequence[tuple[int, ...]]],
    *,
    n_models: float,
    step: int | None,
    scales: Sequence[dict] | None = None,
):
    """Builds the :class:`~._flexmodel.FlexModel` of a given partition.

    Args:
      prepared: the preprocessed source.
      groups_per_block: for each block, its groups (sorted task tuples).
      n_models: the size to record (from the schedule's accounting).
      step: the schedule step, or ``None``.
      scales: for each block, ``{group: lambda}`` for groups whose
        :math:`\\lambda` was tuned (others use ``method.scale``).
    """
    from ._flexmodel import FlexModel

    models = [
        materialize_block(prepared, b, groups_per_block[b], None if scales is None else scales[b])
        for b in range(len(prepared.partition))
    ]
    src, n, partition = prepared.source, prepared.n, prepared.partition
    unmatched = (
        src.finetuned(partition.unmatched) if partition.unmatched else [{} for _ in range(n)]
    )
    return FlexModel(
        layout=prepared.layout,
        partition=partition,
        method=prepared.method,
        task_names=src.task_names,
        blocks=models,
        unmatched=unmatched,
        n_models=n_models,
        step=step,
    )
