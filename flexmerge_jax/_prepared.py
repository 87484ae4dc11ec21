"""Per-block method inputs, group merges and materialization.

:class:`Prepared` wraps a :class:`~flexmerge_jax.sources.Source` with one
method's global preprocessing (DARE, the whole-model TIES trim thresholds,
PCB thresholds): it hands out the preprocessed task vectors of one block at
a time. :func:`merge_groups` merges several groups of one block in one
program; :func:`materialize_blocks` / :func:`materialize` build the deployed
:class:`~flexmerge_jax.FlexModel`. Everything reads one block at a time, so
peak memory is one block of all tasks (two when a file source reads the next
block in a host thread meanwhile, see :mod:`flexmerge_jax.sources.threads`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _flat
from ._flexmodel import BlockModel, FlexModel
from .blocks import Partition
from .methods import Method
from .methods.dare import dare_drop
from .sources._source import Source, read_chunks, reuse_buffers
from .sources.threads import read_ahead
from .stats.order import ties_keep_count
from .stats.passes import trim_thresholds
from .tree import canonical, named, trim


class Prepared:
    """A source of task vectors with a method's global preprocessing applied.

    Global statistics (TIES thresholds, PCB thresholds) are computed in
    streaming passes over all parameters when first needed (TIES: fused
    into the Gram pass when possible, see :func:`~flexmerge_jax.stats.passes.trim_pass`); every task
    vector is checked for NaN/Inf whenever it is read (materialized ones in
    the same pass that computes them; the streamed passes detect NaN/Inf in
    their own statistics, then read again the checked way to name the
    parameter), and parameters outside the blocks are checked too, so
    nothing that is deployed goes unchecked.
    """

    def __init__(self, source: Source, partition: Partition, method: Method):
        self.source = source
        self.partition = partition
        self.method = method
        self.layout = source.layout
        self._index = self.layout.index()
        self._extra: dict[int, dict] = {}
        self._trim_threshold = None
        self.prepared = None  # the method's whole-model statistics (method.prepare)
        d = self.layout.total
        if method.trims:
            # Thresholds are computed lazily (trim_threshold, or fused into
            # the Gram pass); that pass reads, and checks, every parameter.
            self.keep_count = np.full((source.n,), ties_keep_count(d, method.trim_keep),
                                      np.int64)
        elif method.prepare is not None:  # reads, and checks, every parameter
            self.prepared = method.prepare(self.all_leaves, d, **dict(method.static))
        elif partition.unmatched:
            # Blocks are checked when read; unmatched parameters are deployed
            # as they are, so check them now.
            self.source.task_vectors(partition.unmatched)
        sp = method.sparsify
        self.key = jax.random.key(int(sp.seed)) if sp is not None else None

    def all_leaves(self):
        """Every task-vector leaf (including unmatched parameters: the
        reference trims, and computes PCB thresholds, before assigning
        blocks), read in chunks of about 2^24 entries per task."""
        for chunk in read_chunks(list(self.layout.names), self.layout.sizes):
            yield from self.source.task_vectors(chunk).values()

    @property
    def n(self) -> int:
        return self.source.n

    @property
    def trim_threshold(self) -> np.ndarray | None:
        """Per-task TIES thresholds ``f32[n]`` (``None`` when not trimming)."""
        if self.method.trims and self._trim_threshold is None:
            self._trim_threshold = trim_thresholds(self)
        return self._trim_threshold

    @trim_threshold.setter
    def trim_threshold(self, thresholds: np.ndarray) -> None:
        """Thresholds found by a pass that computed them with other
        statistics (:func:`~flexmerge_jax.stats.passes.grams`)."""
        self._trim_threshold = thresholds

    @property
    def identity(self) -> bool:
        """Whether preprocessing leaves task vectors unchanged."""
        return not self.method.trims and self.method.sparsify is None

    def tau(self, b: int) -> dict[str, jax.Array]:
        """Raw task vectors ``{name: f32[n, ...]}`` of block ``b``."""
        return self._task_vectors(b, trimmed=False)

    def taus(self) -> Iterator[dict[str, jax.Array]]:
        """:meth:`tau` of every block in order, later blocks read ahead in a
        host thread from files (:func:`~.sources.threads.read_ahead`)."""
        return read_ahead(self.tau, self.partition.numels, threads=self.source.prefetch)

    def _task_vectors(self, b: int, trimmed: bool) -> dict[str, jax.Array]:
        leaves = self.partition.blocks[b].leaves
        return self.source.task_vectors(leaves, self.trim_threshold if trimmed else None)

    def cut_inputs(self, groups_per_block) -> Iterator[tuple]:
        """What a cut with these groups (a list per block) needs of each
        block in turn, each input read once (:meth:`~.sources.Source.inputs`):
        ``(base, {task: params} of the tasks kept as they are, preprocessed
        task vectors, rows)``, base and task vectors ``None`` when no group
        is merged; ``rows``: the ``f32[n, P]`` array the task vectors are
        views of (:mod:`._flat`: elementwise methods, host path), else
        ``None``. Later blocks are read ahead in host threads from files
        (:func:`~.sources.threads.read_ahead`); trim thresholds, if some
        group is merged, are computed first, in the caller's thread."""
        needs = [self._cut_needs(g) for g in groups_per_block]
        if any(merged for _, merged in needs):
            self.trim_threshold  # noqa: B018
        # The flat rows (:mod:`._flat`) are dropped block by block: reusing
        # them spares the page faults of fresh memory.
        with reuse_buffers():
            reads = read_ahead(lambda b: self._cut_read(b, *needs[b]), self.partition.numels,
                               threads=self.source.prefetch)
            for _ in needs:  # no name holds a block's inputs while the caller works on them
                yield self._preprocessed(*next(reads))

    def _preprocessed(self, base, fts, tau, rows) -> tuple:
        if tau is not None and self.trim_threshold is None and not self.identity:
            tau, rows = self.preprocess(tau), None  # (trimmed ones were trimmed as read)
        return base, fts, tau, rows

    def _cut_needs(self, groups) -> tuple[tuple[int, ...], bool]:
        """``(tasks kept as they are, whether some group is merged)``."""
        m = self.method.min_merged
        return (tuple(sorted(t for g in groups if len(g) < m for t in g)),
                any(len(g) >= m for g in groups))

    def _cut_read(self, b: int, tasks, merged: bool):
        block = self.partition.blocks[b]
        thr = self.trim_threshold if merged else None  # computed in the caller's thread
        rows = _flat.rows(self.method, self.n, block.numel) if merged else None
        return (*self.source.inputs(block.leaves, tasks, thr, task_vectors=merged, out=rows),
                rows)

    def x(self, b: int, tau: dict | None = None) -> dict[str, jax.Array]:
        """Preprocessed task vectors of block ``b`` (what merges and similarity
        use), from its raw task vectors ``tau`` if given. Without ``tau``,
        TIES-trimmed vectors are trimmed as they are computed (on the host:
        in the same pass, no second array)."""
        if tau is None and self.trim_threshold is not None:
            return self._task_vectors(b, trimmed=True)
        return self.preprocess(self.tau(b) if tau is None else tau)

    def preprocess(self, tau: dict[str, jax.Array]) -> dict[str, jax.Array]:
        m = self.method
        if self.trim_threshold is not None:
            thr = jnp.asarray(self.trim_threshold)
            return {k: trim(v, thr) for k, v in tau.items()}
        if m.sparsify is not None:
            return {
                k: dare_drop(v, self.key, m.sparsify.drop, self._index[k]) for k, v in tau.items()
            }
        return tau

    def extra(self, b: int, x: dict | None = None) -> dict | None:
        """Per-block method state (:meth:`~.methods.Method.shared_state`:
        TSV's SVDs, Breadcrumbs' masks, DELLA's pruned vectors, PCB's clip
        bounds and thresholds), with the block's PRNG key as ``"key"`` for
        methods with a ``seed``. Kept per block where the method declares it
        small (``traits.keep_block_state``), else computed at each call from
        ``x`` (callers ask once per block)."""
        m = self.method
        if m.block_state is None:
            return None
        if b in self._extra:
            return self._extra[b]
        x = self.x(b) if x is None else x
        key = None if m.seed is None else jax.random.fold_in(jax.random.key(int(m.seed)), b)
        state = m.shared_state(canonical(x), key, numel=self.partition.blocks[b].numel,
                               prepared=self.prepared)
        out = {**({} if key is None else {"key": key}), **state}
        if m.traits.keep_block_state:
            self._extra[b] = out
        return out


@functools.partial(jax.jit, static_argnames=("static",))
def _merge_groups(x, members, scales, extra, hp, *, static: Method):
    """``method.merge_group`` over groups ``members: bool[G, n]``, ``scales: f32[G]``
    (each group's ``scale``, for methods with one)."""

    def one(args):
        mb, sc = args
        return static.join({**hp, "scale": sc} if "scale" in hp else hp).merge_group(x, mb, extra)

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
    # device_put, not jnp.asarray: that compiles a program per shape
    out = _merge_groups(canonical(x), jax.device_put(padded), jax.device_put(sc), extra, hp,
                        static=static)
    if g < bucket:
        out = jax.tree.map(lambda a: a[:g], out)
    return out._replace(
        vector=named(out.vector, names),
        masks=None if out.masks is None else named(out.masks, names),
    )


@jax.jit
def add_base(base: dict, v: dict, i) -> dict:
    """``{k: base[k] + v[k][i]}`` in the base's dtype (one dispatch per group
    for the whole block, not a slice and an add per leaf)."""
    return {k: (b.astype(jnp.float32) + v[k][i]).astype(b.dtype) for k, b in base.items()}


def _as_input_dtypes(merged: dict, base: dict, block: str) -> dict:
    """A merged parameter set in the inputs' dtypes, as the per-task sets
    beside it: float64 inputs (which JAX computes and returns as float32
    unless ``jax_enable_x64``), and parameters of a flat row computed in
    another dtype than theirs (:func:`~._flat.row_dtype`), cast on the host;
    float16 results checked for overflow (float16's range is 65504;
    bfloat16 has float32's)."""
    out = dict(merged)
    for k, v in merged.items():
        want = np.dtype(base[k].dtype)
        if v.dtype != want:
            with np.errstate(over="ignore"):  # an overflow is reported below, by name
                out[k] = v = np.asarray(v).astype(want)
        if want == np.float16 and not np.isfinite(np.asarray(v)).all():
            warnings.warn(
                f"block {block!r}: the merged parameter {k!r} overflows float16 (Inf entries; "
                "the largest float16 is 65504): merge float32 copies of the inputs instead",
                stacklevel=3)
    return out


def _group_merges(prepared: Prepared, b: int, x: dict, rows, base: dict, merged, scales):
    """Yields, for each merged group of block ``b`` in turn, ``(parameters
    {name: [...]} with the base added, masks {name: bool[n, ...]} or None,
    rescalers f32[n] or None)``: for elementwise methods on the host, one
    flat-row program call per group (:mod:`._flat`); else one vectorised
    merge over all the groups (:func:`merge_groups`)."""
    method, n = prepared.method, prepared.n
    leaves = prepared.partition.blocks[b].leaves
    members = np.zeros((len(merged), n), bool)
    for i, g in enumerate(merged):
        members[i, list(g)] = True
    if _flat.applies(method, x):
        layout = _flat.Layout.of(leaves, [np.shape(base[k]) for k in leaves])
        xf = layout.pack(x, (n,), rows)
        bf = layout.pack(base, ())
        dtype = _flat.row_dtype([base[k].dtype for k in leaves])
        for mb, sc in zip(members, scales):
            params, masks, resc = _flat.merge(xf, bf, mb, method, sc, dtype)
            yield layout.views(params), None if masks is None else layout.views(masks), resc
        return
    gm = merge_groups(x, members, prepared.extra(b, x), method, scales)
    # Host arrays onto the device once; arrays already placed (sharded over
    # a mesh, maybe over several processes) stay where they are.
    base_dev = canonical({k: base[k] if isinstance(base[k], jax.Array) else jax.device_put(base[k])
                          for k in leaves})
    vec = canonical({k: gm.vector[k] for k in leaves})
    for gi in range(len(merged)):
        masks = None if gm.masks is None else {k: gm.masks[k][gi] for k in leaves}
        resc = None if gm.rescalers is None else np.asarray(gm.rescalers[gi])
        yield named(add_base(base_dev, vec, np.int32(gi)), leaves), masks, resc


def materialize_blocks(prepared: Prepared, groups_per_block, scales=None) -> Iterator[BlockModel]:
    """The deployed :class:`~._flexmodel.BlockModel` of every block in turn
    (each built, then handed over: a caller that writes and drops them holds
    one block at a time).

    A block's merged groups are merged (:func:`_group_merges`); tasks in
    groups below the method's merge size keep their fine-tuned parameters.

    Args:
      prepared: the preprocessed source.
      groups_per_block: for each block, its groups (task tuples).
      scales: ``None``, or for each block ``{group: lambda}`` for groups
        with a tuned lambda.
    """
    groups_per_block = [sorted(tuple(sorted(g)) for g in gs) for gs in groups_per_block]
    inputs = prepared.cut_inputs(groups_per_block)
    for b, groups in enumerate(groups_per_block):  # (no name holds block b's inputs meanwhile)
        yield _block_model(prepared, b, groups, next(inputs),
                           None if scales is None else scales[b])


def _block_model(prepared: Prepared, b: int, groups, inputs: tuple, scales: dict | None):
    method, n = prepared.method, prepared.n
    block = prepared.partition.blocks[b]
    merged = [g for g in groups if len(g) >= method.min_merged]
    base, fts, x, rows = inputs
    tuned = scales or {}
    merges = _group_merges(prepared, b, x, rows, base, merged,
                           np.array([tuned.get(g, method.scale) for g in merged], np.float32)) \
        if merged else iter(())
    sets, masked, masks = [], [], {}
    routing = np.full((n,), -1, np.int32)
    rescalers = np.ones((n,), np.float32)
    for g in groups:
        if len(g) >= method.min_merged:
            params, group_masks, resc = next(merges)
            sets.append(_as_input_dtypes(params, base, block.name))
            masked.append(method.uses_masks)
            routing[list(g)] = len(sets) - 1
            if method.uses_masks:
                for t in g:
                    masks[t] = {k: group_masks[k][t] for k in block.leaves}
                    rescalers[t] = resc[t]
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
    models = list(materialize_blocks(prepared, groups_per_block, scales))
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
        source=src.describe(),
    )
