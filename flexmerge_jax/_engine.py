"""Preprocessing, per-block statistics and materialization, block by block.

:class:`Prepared` wraps a :class:`~._source.Source` with one method's global
preprocessing (DARE, the whole-model TIES trim thresholds, PCB thresholds):
it hands out the preprocessed task vectors of one block at a time. The
statistics pass (:func:`grams`) and materialization (:func:`materialize_block`)
both read one block at a time, so peak memory is one block of all tasks (two
when a file source reads the next block in a background thread meanwhile,
when merged-vector plans compute up to one largest block ahead
(:func:`read_ahead`), or when the host statistics passes read and compute
blocks in :data:`HOST_THREADS` worker threads).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg.blas import dgemm, sgemm  # scipy: a dependency of jax

from . import prep
from .blocks import Partition
from .methods import Method
from ._schedule import canonical, named
from ._source import _ABS_BITS, _INF_BITS, Source, _host_resident, host_inputs, tv_chunks


class Prepared:
    """A source of task vectors with a method's global preprocessing applied.

    Global statistics (TIES thresholds, PCB thresholds) are computed in
    streaming passes over all parameters when first needed (TIES: fused
    into the Gram pass when possible, see :func:`trim_pass`); every task
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
        self._ahead, self._in_order, self._cut_groups = None, False, None  # in_order()
        self.prepared = None  # the method's whole-model statistics (method.prepare)
        d = self.layout.total
        if method.trims:
            # Thresholds are computed lazily (trim_threshold, or fused into
            # the Gram pass); that pass reads, and checks, every parameter.
            self.keep_count = np.full((source.n,), prep.ties_keep_count(d, method.trim_keep),
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
        for chunk in _chunks(list(self.layout.names), self.layout.sizes):
            yield from self.source.task_vectors(chunk).values()

    @property
    def n(self) -> int:
        return self.source.n

    @property
    def trim_threshold(self) -> np.ndarray | None:
        """Per-task TIES thresholds ``f32[n]`` (``None`` when not trimming)."""
        if self.method.trims and self._trim_threshold is None:
            res = trim_pass(self, want_grams=False)
            if res is None:  # not host-resident: two radix passes (XLA)
                self._trim_threshold = prep.kth_smallest(
                    self.all_leaves, self.keep_count, magnitude=True)
        return self._trim_threshold

    @property
    def identity(self) -> bool:
        """Whether preprocessing leaves task vectors unchanged."""
        return not self.method.trims and self.method.sparsify is None

    def tau(self, b: int) -> dict[str, jax.Array]:
        """Raw task vectors ``{name: f32[n, ...]}`` of block ``b`` (read
        ahead inside :meth:`in_order`)."""
        return self._read(b, trimmed=False)

    def _read(self, b: int, trimmed: bool) -> dict[str, jax.Array]:
        return self._in_turn((b, trimmed), self._task_vectors, (b + 1, trimmed))

    def _in_turn(self, key: tuple, compute, nxt: tuple | None):
        """``compute(*key)`` (``key[0]``: a block), taken from the read-ahead
        if that was ``key``; inside :meth:`in_order`, then submits
        ``compute(*nxt)`` ahead (none past the last block)."""
        pending, self._ahead = self._ahead, None
        if pending is not None and pending[0] == key:
            out = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            out = compute(*key)
        if self._in_order and nxt is not None and nxt[0] < len(self.partition):
            self._ahead = (nxt, _host_pool().submit(compute, *nxt))
        return out

    def _task_vectors(self, b: int, trimmed: bool) -> dict[str, jax.Array]:
        leaves = self.partition.blocks[b].leaves
        return self.source.task_vectors(leaves, self.trim_threshold if trimmed else None)

    def cut_inputs(self, b: int, groups) -> tuple:
        """What a cut needs of block ``b`` with these ``groups``, each input
        read once (:meth:`~._source.Source.inputs`): ``(base, {task:
        params} of the tasks kept as they are, preprocessed task vectors)``,
        base and task vectors ``None`` when no group is merged. Read ahead
        inside :meth:`in_order` given the cut's groups."""
        key = (b, *self._cut_needs(groups))
        cut = self._cut_groups
        nxt = (b + 1, *self._cut_needs(cut[b + 1])) if cut is not None and b + 1 < len(cut) \
            else None
        base, fts, tau = self._in_turn(key, self._cut_read, nxt)
        if tau is not None and self.trim_threshold is None:
            tau = self.preprocess(tau)  # (trimmed vectors were trimmed as read)
        return base, fts, tau

    def _cut_needs(self, groups) -> tuple[tuple[int, ...], bool]:
        """``(tasks kept as they are, whether some group is merged)``."""
        m = self.method.min_merged
        return (tuple(sorted(t for g in groups if len(g) < m for t in g)),
                any(len(g) >= m for g in groups))

    def _cut_read(self, b: int, tasks, merged: bool):
        leaves = self.partition.blocks[b].leaves
        thr = self.trim_threshold if merged else None  # computed in the caller's thread
        return self.source.inputs(leaves, tasks, thr, task_vectors=merged)

    @contextlib.contextmanager
    def in_order(self, cut=None):
        """Declares that the blocks are about to be read in increasing order:
        sources that read files (``source.prefetch``) then compute block
        ``b + 1``'s task vectors (raw or trimmed, as block ``b``'s were
        asked for; for a cut (``cut``: every block's groups), its
        :meth:`cut_inputs`) in a background thread while the caller works on
        block ``b`` (one block ahead at most; a block read out of turn drops
        it, and so does leaving the context). Merged-vector plans read ahead
        with :func:`read_ahead` instead, from memory too.

        A cut's trim thresholds are computed here, in the caller's thread,
        if any of its groups is merged.
        """
        if cut is not None and any(self._cut_needs(g)[1] for g in cut):
            self.trim_threshold  # noqa: B018
        self._in_order, self._cut_groups = self.source.prefetch, cut
        try:
            yield self
        finally:
            self._in_order, self._cut_groups = False, None
            if self._ahead is not None:
                self._ahead[1].cancel()
                self._ahead = None

    def x(self, b: int, tau: dict | None = None) -> dict[str, jax.Array]:
        """Preprocessed task vectors of block ``b`` (what merges and similarity
        use), from its raw task vectors ``tau`` if given. Without ``tau``,
        TIES-trimmed vectors are trimmed as they are computed (on the host:
        in the same pass, no second array), and read ahead like :meth:`tau`."""
        if tau is None and self.trim_threshold is not None:
            return self._read(b, trimmed=True)
        return self.preprocess(self.tau(b) if tau is None else tau)

    def preprocess(self, tau: dict[str, jax.Array]) -> dict[str, jax.Array]:
        m = self.method
        if self.trim_threshold is not None:
            thr = jnp.asarray(self.trim_threshold)
            return {k: prep.trim(v, thr) for k, v in tau.items()}
        if m.sparsify is not None:
            return {
                k: prep.dare(v, self.key, m.sparsify.drop, self._index[k]) for k, v in tau.items()
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
        cols = _columns(n)

        def chunks():
            for v in leaves:
                a = np.asarray(v).reshape(n, -1).astype(np.float32, copy=False)
                for j in range(0, a.shape[1], cols):
                    yield a[:, j:j + cols]

        return _chunked_gram(chunks(), n, precision)
    if precision == "float32":
        return np.asarray(_gram32(leaves), np.float64)
    with jax.enable_x64(True):
        return np.asarray(_gram(leaves), np.float64)


def grams(prepared: Prepared, *, raw: bool = False, precision: str = "float64") -> np.ndarray:
    """Per-block Gram matrices ``f64[B, n, n]`` in one pass over the blocks.

    On host-resident inputs (CPU backend) task vectors are never
    materialized: each block's Gram is accumulated from cache-sized chunks
    of ``f32(theta_i) - f32(theta_0)`` (:func:`~._source.tv_chunks`), and
    TIES thresholds are found in the same pass (:func:`trim_pass`).

    Args:
      prepared: the preprocessed source.
      raw: use the raw task vectors instead of the preprocessed ones.
      precision: see :func:`block_gram`.
    """
    if precision not in GRAM_PRECISIONS:
        raise ValueError(f"gram precision must be one of {GRAM_PRECISIONS}, got {precision!r}")
    if not raw and prepared.method.trims:
        fused = trim_pass(prepared, want_grams=True, precision=precision)
        if fused is not None:
            return fused
    blocks, n = prepared.partition.blocks, prepared.n

    def task(b):
        return lambda inputs: _streamed_gram(inputs, blocks[b].leaves, n, precision)

    out = _host_map(prepared.source, [b.leaves for b in blocks], task) \
        if raw or prepared.identity else None
    if out is not None:
        out = list(out)
        for b, g in enumerate(out):
            if not np.isfinite(np.diag(g)).all():
                prepared.tau(b)  # raises on NaN/Inf (float32 products may just overflow)
        return np.stack(out)
    out = []
    with prepared.in_order():
        for b in range(len(blocks)):
            tau = prepared.tau(b)
            out.append(block_gram(tau if raw else prepared.x(b, tau), precision))
    return np.stack(out)


# Threads of the host statistics passes (:func:`_host_map`): each holds one
# group of parameters of all tasks, so the streaming memory bound grows with
# them; two cover this project's 2-core reference machine.
HOST_THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1))

# Lists :func:`_host_map` submits ahead of its consumer when their results
# are small. Blocks come in sizes as uneven as an MLP and a LayerNorm: with
# only HOST_THREADS submitted, a worker done with a LayerNorm idled until
# the MLP beside it was consumed (a ViT-B/32 TIES thresholds pass used 1.4
# of its 2 cores; side by side, median of eight, 0.82 -> 0.77 s in memory,
# 1.09 -> 0.97 s from files). Queued lists hold no inputs: each is read
# when a worker starts it.
HOST_QUEUE = 4 * HOST_THREADS


@functools.cache
def _host_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that read (and, in :func:`_host_map`, compute on) blocks
    beside the caller: the statistics passes' workers and the read-ahead of
    :meth:`Prepared.in_order`."""
    return concurrent.futures.ThreadPoolExecutor(HOST_THREADS, "flexmerge-host")


def read_ahead(fn, sizes: Sequence[int], threads: bool = True):
    """Yields ``fn(0), ..., fn(len(sizes) - 1)`` in order, computing later
    ones in host threads while the consumer works (``fn(0)`` runs in the
    caller's thread; with ``threads=False`` every call does, in turn: for
    ``fn`` that issue device programs with collectives across processes).

    Results are computed ahead while their ``sizes`` sum to at most the
    largest size (one result ahead at least): a run of small blocks does not
    leave the next large one to be computed while the consumer waits, and
    what is held ahead stays within one largest block. A consumer that
    stops early cancels what has not started and waits for the rest; an
    error in ``fn`` is raised when its result is due.
    """
    if not threads:
        yield from map(fn, range(len(sizes)))
        return
    count, budget = len(sizes), max(sizes, default=0)
    pending, nxt = collections.deque(), 1
    try:
        if count == 0:
            return
        current = fn(0)
        for _ in range(count):
            held = sum(sizes[j] for j, _ in pending)
            while nxt < count and (not pending or held + sizes[nxt] <= budget):
                pending.append((nxt, _host_pool().submit(fn, nxt)))
                held += sizes[nxt]
                nxt += 1
            yield current
            current = None  # the consumer's reference only, while the next is awaited
            if pending:
                current = pending.popleft()[1].result()
    finally:
        for _, f in pending:
            f.cancel()
        concurrent.futures.wait([f for _, f in pending])


def _host_map(source: Source, name_lists, task, first=None, ahead: int | None = None):
    """Results of ``task(i)(inputs_i)`` for each list of names in turn, with
    ``inputs_i`` its host inputs (:func:`~._source.host_inputs`), or
    ``None`` if the host path does not apply (the first list's read is the
    probe, so nothing is read twice; ``first``: a one-element list holding
    that read if the caller probed already, emptied here so that the caller
    holds no reference to it while the pass runs).

    :data:`HOST_THREADS` worker threads each read a list and compute on it
    (file reads and NumPy release the GIL), so reading and computing overlap
    and the computing uses every core; at most that many lists are read and
    computed on at once. Up to ``ahead`` lists (default :data:`HOST_QUEUE`,
    at least HOST_THREADS) are submitted ahead of the consumer (a list is
    read only when a worker starts it): a worker done with a small list
    starts the next while the other is still on a large one, instead of
    waiting for the in-order consumer, and finished results wait their turn.
    ``task(i)`` is called in the consumer's thread when list ``i`` is
    submitted, after the results of lists ``< i - ahead`` were consumed (it
    may read state the consumer updates). Results come in order; a worker's
    error is raised when its result is due. A consumer that stops early
    cancels what has not started and waits for the rest.
    """
    first = host_inputs(source, name_lists[0]) if first is None else first.pop()
    if first is None:
        return None
    pool = _host_pool()

    def run(fn, names):
        return fn(host_inputs(source, names))

    def results():
        nonlocal first
        pending, nxt = collections.deque(), 0

        def submit():
            nonlocal first, nxt
            fn, i = task(nxt), nxt
            nxt += 1
            if i == 0:
                inputs, first = first, None
                pending.append(pool.submit(fn, inputs))
            else:
                pending.append(pool.submit(run, fn, name_lists[i]))

        try:
            depth = max(HOST_QUEUE if ahead is None else ahead, HOST_THREADS)
            while nxt < min(depth, len(name_lists)):
                submit()
            while pending:
                out = pending.popleft().result()
                if nxt < len(name_lists):
                    submit()
                yield out
        finally:
            for f in pending:
                f.cancel()
            concurrent.futures.wait(pending)

    return results()


def _columns(n: int) -> int:
    return max(4096, (1 << 18) // n)  # ~1 MB of float32 per chunk (cache-sized)


def _streamed_gram(inputs, names, n: int, precision: str) -> np.ndarray:
    """Gram ``f64[n, n]`` of the raw task vectors of ``names`` from host
    inputs, chunk by chunk.

    NaN/Inf anywhere in a task vector makes its diagonal entry non-finite
    (squares summed in float64 cannot overflow); callers then read the block
    the checked way, which raises naming the parameter.
    """
    return _chunked_gram((t for _, t in tv_chunks(*inputs, names, _columns(n))), n, precision)


class _GramSum:
    """Accumulates ``sum a a^T`` over chunks ``a [n, c]`` (host arrays).

    Each chunk is cut into pieces of at most :attr:`width` columns, copied
    (and widened to float64 for ``precision="float64"``) into one reused
    contiguous buffer of ~256 KB, and multiplied there with BLAS ``gemm``:
    OpenBLAS's ``syrk`` and its ``gemm`` on operands larger than the L2
    cache are 3x slower for this ``[n, big] x [big, n]`` shape. Products
    are float64 (``"float64"``) or float32 (``"float32"``), sums across
    pieces float64; the result is mirrored from the upper triangle, so it
    is exactly symmetric.
    """

    def __init__(self, n: int, precision: str = "float64"):
        self._sum = np.zeros((n, n), np.float64)
        self._wide = precision == "float64"
        self.width = max(256, (1 << 15) // n)
        self._buf = np.empty(n * self.width, np.float64 if self._wide else np.float32)

    def add(self, a: np.ndarray) -> None:
        """Adds ``a a^T`` (``a [n, c]``)."""
        n, c = a.shape
        gemm = dgemm if self._wide else sgemm
        for j in range(0, c, self.width):
            w = min(self.width, c - j)
            s = self._buf[:n * w].reshape(n, w)
            s[...] = a[:, j:j + w]
            self._sum += gemm(1.0, s.T, s.T, trans_a=1)  # s.T: Fortran order, no copy

    def result(self) -> np.ndarray:
        """The symmetric ``f64[n, n]`` sum."""
        u = np.triu(self._sum)
        return u + np.triu(u, 1).T


def _chunked_gram(chunks, n: int, precision: str) -> np.ndarray:
    """``sum c c^T`` over float32 chunks ``[n, c]`` (see :class:`_GramSum`)."""
    g = _GramSum(n, precision)
    for t in chunks:
        g.add(t)
    return g.result()


# |x| keys: the bits of a float32 with the sign cleared (_source._ABS_BITS),
# monotone in |x|; _INF_BITS and above are Inf/NaN.
_NO_KEY = 0x80000000  # above every |x| key, NaN included
_SAMPLE = 1 << 20  # entries per task in the sample that brackets the thresholds
_RUN = 256  # entries per contiguous run of the sample
_SIGMAS = 5.0  # bracket half-width, in standard errors of the sample quantile
_KEY_BYTES = 1 << 28  # budget for the undecided keys captured by a pass
_COLUMN_BYTES = 1 << 28  # budget for the undecided columns kept for the Gram correction
_DENSE_BYTES = 1 << 26  # of which the first are kept unpacked (see _pack_columns)


def _column_budget(prepared: "Prepared") -> int:
    """Bytes the captured columns of one pass may take (see
    :func:`_pack_columns`): one model's float32 size (the "one model" of the
    streaming memory bound), at least :data:`_COLUMN_BYTES`, plus the
    :data:`_DENSE_BYTES` kept unpacked."""
    return max(_COLUMN_BYTES, 4 * prepared.layout.total) + _DENSE_BYTES


def trim_pass(prepared: Prepared, *, want_grams: bool, precision: str = "float64"):
    """TIES thresholds (and, if asked, trimmed Gram matrices) on host inputs.

    The thresholds are exact order statistics (the ``k``-th smallest
    ``|tau_i|`` over the whole model, ``k = d - int(d * keep)``), found
    without a global sort or histogram in the common case:

    1. a random sample of about ``2^20`` entries per task (runs of 256,
       read as byte ranges from safetensors files) brackets each threshold
       in keys ``[lo_i, hi_i)`` (``|x|`` bit patterns, monotone in ``|x|``),
       five standard errors of the sample quantile either side;
    2. one pass over all parameters counts the entries below ``lo_i``,
       captures those inside the bracket (a fraction of a percent) and, for
       Grams, accumulates ``G_D`` over the entries above ``hi_i`` (kept
       whatever the exact threshold) while capturing every column where
       some task is undecided (a share ``1 - (1 - w)^n`` of the columns for
       brackets holding a share ``w`` of each task's entries; only their
       possibly nonzero entries are kept, see :func:`_pack_columns`);
    3. the exact threshold is the right captured value, and
       ``G = G_D - D_C D_C^T + X_C X_C^T`` over the captured columns ``C``
       completes the trimmed Grams exactly.

    If a bracket misses (the count below ``lo_i`` is not below ``k``, or
    the bracket does not reach ``k``) or too much is captured (ties, odd
    distributions), exact radix-select passes (histograms of the ``|x|``
    bits) take over; if the captured columns exceed their budget
    (:func:`_column_budget`: one model), a second pass with known
    thresholds computes the Grams. Results never depend on
    the sample, only the time does.

    Returns ``None`` (callers take the XLA path) when the inputs are not
    host-resident; else the Grams ``f64[B, n, n]`` (``want_grams``) or the
    thresholds ``f32[n]``, which are also stored on ``prepared``.
    """
    part, src, n = prepared.partition, prepared.source, prepared.n
    size = dict(zip(prepared.layout.names, prepared.layout.sizes))
    groups = [(blk.leaves, b) for b, blk in enumerate(part.blocks)]
    groups += [(c, None) for c in _chunks(part.unmatched, [size[u] for u in part.unmatched])]
    first = [host_inputs(src, groups[0][0])]  # handed over (see _host_map)
    if first[0] is None:
        return None
    k = prepared.keep_count
    top = [0]

    def all_chunks():
        for names, _ in groups:
            for _, t in tv_chunks(*host_inputs(src, names), names, _columns(n)):
                top[0] = max(top[0], int((t.view(np.uint32) & _ABS_BITS).max()))
                yield t

    lo, hi = _sample_bracket(prepared, k)
    res = _bracket_scan(prepared, groups, lo, hi, want_grams, precision, first=first)
    if res is not None:
        thr, g = res
    else:  # the bracket missed or captured too much: exact radix select
        sel = prep.RadixSelect(k, magnitude=True)
        sel.first_pass(all_chunks())
        if top[0] >= _INF_BITS:  # histograms cannot tell NaN/Inf: name it
            _raise_nonfinite(prepared)
        thr, g = sel.second_pass(all_chunks()), None
    prepared._trim_threshold = thr
    if not want_grams:
        return thr
    if g is None:  # one more pass, with the thresholds known: nothing undecided
        key = thr.view(np.uint32)
        _, g = _bracket_scan(prepared, groups[:len(part)], key, key, True, precision,
                             counts=False)
    return g


def _raise_nonfinite(prepared: Prepared) -> None:
    """Reads every parameter the checked way (raises naming the first
    task vector with NaN/Inf, in layout order)."""
    for _ in prepared.all_leaves():
        pass


def _sample_bracket(prepared: Prepared, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys ``uint32[n]`` ``lo``, ``hi`` likely to bracket each task's
    ``k``-th smallest ``|x|`` key.

    The sample is about ``2^20`` entries per task in contiguous runs of
    :data:`_RUN` entries at random places, the same share of every
    parameter (stochastic rounding), so that sources on disk read a few
    byte ranges instead of everything (:meth:`~._source.Source.sample_runs`).
    The bracket is the sample quantile ``q = k / d`` plus or minus
    :data:`_SIGMAS` standard errors of the estimated CDF at that quantile,
    runs treated as clusters (entries of a run are correlated: a row of a
    weight matrix), never tighter than for independent entries.
    """
    src, layout, n = prepared.source, prepared.layout, prepared.n
    d = layout.total
    rate = _SAMPLE / d
    rng = np.random.default_rng(0)
    parts = []  # uint32[n, m, L] per parameter
    size_of = dict(zip(layout.names, layout.sizes))
    for names in _chunks(list(layout.names), layout.sizes):
        requests = []
        for name in names:
            size = size_of[name]
            if rate >= 1:  # small model: every entry, runs of one
                starts, length = np.arange(size), 1
            else:
                length = min(_RUN, size)
                m = int(np.floor(size * rate / length + rng.random()))
                starts = rng.integers(0, size - length + 1, m)
            if len(starts):
                requests.append((name, starts, length))
        if requests:
            parts += [r.view(np.uint32) & _ABS_BITS for r in src.sample_runs(requests)]
    lo, hi = np.zeros(n, np.uint32), np.full(n, _NO_KEY, np.uint32)
    if not parts:  # nothing sampled: the widest bracket (the pass falls back)
        return lo, hi
    flat = np.concatenate([p.reshape(n, -1) for p in parts], axis=1)
    s = flat.shape[1]
    q = k / d
    # The standard error is estimated at the quantile of every 16th sampled
    # entry (a cheap partition); only the bracket's two ends need the sample's.
    sub = flat[:, ::16]
    mid_r = np.clip(np.floor(q * sub.shape[1]).astype(np.int64), 0, sub.shape[1] - 1)
    runs = sum(p.shape[1] for p in parts)
    for i in range(n):
        mid = np.partition(sub[i], mid_r[i])[mid_r[i]]
        # Cluster standard error of the sample CDF at `mid` (ratio estimator).
        below = np.concatenate([(p[i] < mid).sum(axis=1) for p in parts]).astype(np.float64)
        sizes = np.concatenate([np.full(p.shape[1], p.shape[2], np.float64) for p in parts])
        f = below.sum() / s
        var = runs / max(runs - 1, 1) * np.sum((below - f * sizes) ** 2) / s**2
        se = max(np.sqrt(var), np.sqrt(q[i] * (1 - q[i]) / s))
        lo_r = int(np.floor((q[i] - _SIGMAS * se) * s)) - 2
        hi_r = int(np.ceil((q[i] + _SIGMAS * se) * s)) + 1
        at = [j for j in (lo_r, hi_r) if 0 <= j < s]
        part = np.partition(flat[i], at) if at else flat[i]
        if lo_r >= 0:
            lo[i] = part[lo_r]
        if hi_r < s:
            hi[i] = int(part[hi_r]) + 1
    return lo, hi


def _scan_group(inputs, names, lo_c, hi_c, precision: str, *, counts: bool, gram: bool,
                dense: int = 0) -> dict:
    """The work of :func:`_bracket_scan` on one group of parameters
    (``dense``: bytes of captured columns that may still be kept unpacked)."""
    n = lo_c.shape[0]
    cols = _columns(n)
    g = _GramSum(n, precision) if gram else None
    below = np.zeros(n, np.int64)
    keys, cnts, caps, top = [], [], [], 0
    # Buffers reused by every chunk (no allocation in the loop).
    ub = np.empty((n, cols), np.uint32)
    keptb, geb = np.empty((n, cols), bool), np.empty((n, cols), bool)
    f32b = np.empty((n, cols), np.float32) if gram else None
    for _, t in tv_chunks(*inputs, names, cols):
        c = t.shape[1]
        u, kept = ub[:, :c], keptb[:, :c]
        np.bitwise_and(t.view(np.uint32), _ABS_BITS, out=u)
        top = max(top, int(u.max()))
        np.greater_equal(u, hi_c, out=kept)
        if gram:
            g.add(np.multiply(t, kept, out=f32b[:, :c]))
        if not counts:
            continue
        ge = np.greater_equal(u, lo_c, out=geb[:, :c])
        for i in range(n):
            below[i] += c - np.count_nonzero(ge[i])
        np.logical_xor(ge, kept, out=ge)  # now: undecided
        idx = np.flatnonzero(np.logical_or.reduce(ge, axis=0))
        if not idx.size:
            continue
        sub = ge.take(idx, axis=1)  # take: ~2x faster than fancy indexing here
        keys.append(u.take(idx, axis=1)[sub])  # grouped by task
        cnts.append(np.count_nonzero(sub, axis=1))
        if gram:
            caps.append(_pack_columns(t.take(idx, axis=1), sub | kept.take(idx, axis=1), dense))
            dense -= _captured_bytes(caps[-1])
    return {"gram": g.result() if gram else None, "below": below, "keys": keys,
            "counts": cnts, "caps": caps, "top": top}


def _pack_columns(a: np.ndarray, live: np.ndarray, dense: int = 0) -> tuple:
    """Captured columns ``a f32[n, m]`` reduced to the entries that may be
    nonzero after trimming (``live``: kept or undecided; about ``keep`` of
    them): ``a`` zeroed elsewhere while it fits in ``dense`` bytes, else
    packed (a bit mask and the live entries: ~4x smaller for ``keep = 0.2``,
    at ~5 ns per entry to pack and unpack)."""
    if a.nbytes <= dense:
        return (np.multiply(a, live, out=a),)
    return live.shape, np.packbits(live, axis=None), a[live]


def _captured_bytes(packed: tuple) -> int:
    return sum(x.nbytes for x in packed if isinstance(x, np.ndarray))


def _unpack_columns(*packed) -> np.ndarray:
    """Inverse of :func:`_pack_columns`, zeros where nothing was kept."""
    if len(packed) == 1:
        return packed[0]
    shape, bits, vals = packed
    live = np.unpackbits(bits, count=shape[0] * shape[1]).view(bool).reshape(shape)
    a = np.zeros(shape, np.float32)
    a[live] = vals
    return a


def _bracket_scan(prepared: Prepared, groups, lo, hi, want_grams: bool, precision: str,
                  counts: bool = True, first=None):
    """One pass over ``groups`` (``(names, block index or None)``) that
    classifies every ``|x|`` key against ``[lo_i, hi_i)``; see
    :func:`trim_pass`. Returns ``(thresholds, grams or None)``, or ``None``
    if a bracket missed or the captured keys exceed the budget.

    ``counts=False``: ``lo == hi`` are the exact threshold keys; only the
    Grams of the kept entries are computed. ``first``: the first group's
    host inputs, if already read (a one-element list, see :func:`_host_map`).
    The groups are scanned in parallel (:func:`_host_map`)."""
    src, n = prepared.source, prepared.n
    lo_c, hi_c = lo.astype(np.uint32)[:, None], hi.astype(np.uint32)[:, None]
    below = np.zeros(n, np.int64)
    cand_keys, cand_counts, captured, out = [], [], {}, []
    key_bytes, col_bytes, top = 0, 0, 0
    columns_ok = want_grams  # False once the captured columns exceed the budget
    budget = _column_budget(prepared)

    def task(i):  # the state read here is the consumer's at submission
        names, b = groups[i]
        gram, dense = b is not None and columns_ok, max(_DENSE_BYTES - col_bytes, 0)
        return lambda inputs: _scan_group(inputs, names, lo_c, hi_c, precision, counts=counts,
                                          gram=gram, dense=dense)

    # Scans that capture columns for Grams submit no more groups than run at
    # once: their results are large, and their budgets are checked as they
    # are consumed.
    ahead = HOST_THREADS if want_grams else HOST_QUEUE
    with contextlib.closing(_host_map(src, [g[0] for g in groups], task, first, ahead)) as results:
        for (_, b), r in zip(groups, results):
            top = max(top, r["top"])
            if counts:
                below += r["below"]
                cand_keys += r["keys"]
                cand_counts += r["counts"]
                key_bytes += sum(4 * k.size for k in r["keys"])
                if key_bytes > _KEY_BYTES:
                    return None
            if b is None or not columns_ok:
                continue
            out.append(r["gram"])
            captured[b] = r["caps"]
            col_bytes += sum(map(_captured_bytes, r["caps"]))
            if col_bytes > budget:  # keep counting; Grams in a second pass
                columns_ok = False
                captured.clear()
                out.clear()
    if top >= _INF_BITS:  # NaN/Inf somewhere: name it
        _raise_nonfinite(prepared)
    if not counts:
        return lo.view(np.float32), np.stack(out)
    k = prepared.keep_count
    cnt = np.sum(cand_counts, axis=0) if cand_counts else np.zeros(n, np.int64)
    if np.any(below >= k) or np.any(below + cnt < k):
        return None
    allk = np.concatenate(cand_keys) if cand_keys else np.zeros(0, np.uint32)
    task = np.concatenate([np.repeat(np.arange(n, dtype=np.int32), c) for c in cand_counts]) \
        if cand_counts else np.zeros(0, np.int32)
    tkey = np.empty(n, np.uint32)
    for i in range(n):
        r = int(k[i] - below[i] - 1)
        tkey[i] = np.partition(allk[task == i], r)[r]
    thr = tkey.view(np.float32)
    if not columns_ok:
        return thr, None
    tk = tkey[:, None]
    for b, g in enumerate(out):
        plus, minus = _GramSum(n), _GramSum(n)  # float64 whatever the precision
        for packed in captured.get(b, ()):
            a = _unpack_columns(*packed)
            key = a.view(np.uint32) & _ABS_BITS
            plus.add(a * (key >= tk))
            minus.add(a * (key >= hi_c))
        g += plus.result() - minus.result()
    return thr, np.stack(out)


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
    out = _merge_groups(canonical(x), jnp.asarray(padded), jnp.asarray(sc), extra, hp, static=static)
    if g < bucket:
        out = jax.tree.map(lambda a: a[:g], out)
    return out._replace(
        vector=named(out.vector, names),
        masks=None if out.masks is None else named(out.masks, names),
    )


@jax.jit
def _add_base(base: dict, v: dict, i) -> dict:
    """``{k: base[k] + v[k][i]}`` in the base's dtype (one dispatch per group
    for the whole block, not a slice and an add per leaf)."""
    return {k: (b.astype(jnp.float32) + v[k][i]).astype(b.dtype) for k, b in base.items()}


def _as_input_dtypes(merged: dict, base: dict, block: str) -> dict:
    """A merged parameter set in the inputs' dtypes, as the per-task sets
    beside it: float64 inputs (which JAX computes and returns as float32
    unless ``jax_enable_x64``) as float64 host arrays; float16 results
    checked for overflow (float16's range is 65504; bfloat16 has float32's)."""
    out = dict(merged)
    for k, v in merged.items():
        want = np.dtype(base[k].dtype)
        if want == np.float64 and v.dtype != want:
            out[k] = np.asarray(v).astype(want)
        elif want == np.float16 and not np.isfinite(np.asarray(v)).all():
            warnings.warn(
                f"block {block!r}: the merged parameter {k!r} overflows float16 (Inf entries; "
                "the largest float16 is 65504): merge float32 copies of the inputs instead",
                stacklevel=3)
    return out


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

    method, n = prepared.method, prepared.n
    block = prepared.partition.blocks[b]
    groups = sorted(tuple(sorted(g)) for g in groups)
    merged = [g for g in groups if len(g) >= method.min_merged]
    base, fts, x = prepared.cut_inputs(b, groups)
    gm = None
    if merged:
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
    if merged:  # on the device once, not once per group
        base_dev = canonical({k: jnp.asarray(base[k]) for k in block.leaves})
        vec = canonical({k: gm.vector[k] for k in block.leaves})
    for g in groups:
        if len(g) >= method.min_merged:
            sets.append(_as_input_dtypes(named(_add_base(base_dev, vec, np.int32(gi)),
                                               block.leaves), base, block.name))
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

    with prepared.in_order(cut=groups_per_block):
        models = [
            materialize_block(prepared, b, groups_per_block[b],
                              None if scales is None else scales[b])
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
        source=src.describe(),
    )
