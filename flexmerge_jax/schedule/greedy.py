"""The FlexMerge schedule: per-block merge sequences and their interleaving.

Why per block: a block's groups change only when that block is selected, and
then the greedy merges that block's current best pair. So each block's
sequence of merges (which pair, with which similarity) is fixed whatever
the interleaving; the reference's global greedy loop (spec §4) is the
interleaving that repeatedly takes the block whose *next* merge has the
highest similarity (ties: first block in list order). This module computes

1. per-block sequences, in one ``lax.scan`` of n-1 steps per block with
   fixed shapes (roots indexed by task id, masks for live groups), in three
   flavours: constituent linkage from the cosine matrix (spec §10.2),
   merged-vector similarity of linear operators from the Gram matrix (§10.3)
   and merged-vector similarity with materialized group vectors (§10.4);
2. the interleaving, another ``lax.scan`` over (n-1)·B steps.

For constituent linkage the per-block similarities are non-increasing, so
the interleaving is a sort by (-similarity, block, sequence) (§10.2); the
scan gives the same order without relying on it.

Exact reference tie rules: pairs are enumerated in the order of
``list(set(roots))`` (emulated by :mod:`.pyset`), ``A`` before ``B``,
strict ``>`` (first pair wins); union by rank (ranks start at 1; equal ranks:
``A`` survives and its rank grows). NaN similarities (e.g. a block that
trimming made all-zero) rank below every real one and such pairs are merged
last, first pair in enumeration order (the reference crashes there).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..sources._source import buffer_pool
from ..stats.gram import block_gram, gram_dot
from ..tree import canonical, host_resident
from .pyset import set_positions

LINKAGES = ("min", "mean", "max")
LINKAGE_ALIASES = {"single": "min", "average": "mean", "complete": "max"}
SIMILARITIES = ("cosine", "euclidean", "sign")


class BlockSequence(NamedTuple):
    """The n-1 merges of one block, in order (numpy arrays, leading [n-1]).

    ``a``/``b`` are the root ids (task indices) of the two merged groups, ``a``
    being listed first by the reference; ``root`` is the surviving root;
    ``members_a``/``members_b`` are ``bool[n-1, n]`` memberships before the
    merge; ``sim`` the similarity (NaN allowed).
    """

    a: np.ndarray
    b: np.ndarray
    root: np.ndarray
    sim: np.ndarray
    members_a: np.ndarray
    members_b: np.ndarray


class _Core(NamedTuple):
    root_of: jax.Array  # int32[n]
    rank: jax.Array  # int32[n]
    alive: jax.Array  # bool[n]
    size: jax.Array  # int32[n]


def _init_core(n: int) -> _Core:
    return _Core(
        jnp.arange(n, dtype=jnp.int32),
        jnp.ones((n,), jnp.int32),
        jnp.ones((n,), bool),
        jnp.ones((n,), jnp.int32),
    )


def _select(core: _Core, sim: jax.Array):
    """Best pair (A, B) among live roots with the reference's tie rules."""
    n = core.root_of.shape[0]
    if n <= 8:
        # All roots are below the 8-slot table size, which only grows:
        # CPython iterates them in ascending order (no collisions).
        pos = jnp.cumsum(core.alive.astype(jnp.int32)) - 1
    else:
        pos = set_positions(core.root_of)
    valid = core.alive[:, None] & core.alive[None, :] & (pos[:, None] < pos[None, :])
    key = jnp.where(jnp.isnan(sim), -jnp.inf, sim)
    best = jnp.max(jnp.where(valid, key, -jnp.inf))
    cand = valid & (key == best)
    order = pos[:, None] * n + pos[None, :]
    idx = jnp.argmin(jnp.where(cand, order, n * n + 1))
    a, b = idx // n, idx % n
    return a.astype(jnp.int32), b.astype(jnp.int32), sim[a, b]


def _union(core: _Core, a, b):
    ra, rb = core.rank[a], core.rank[b]
    root = jnp.where(ra >= rb, a, b)
    loser = jnp.where(ra >= rb, b, a)
    rank = core.rank.at[a].add(jnp.where(ra == rb, 1, 0))
    root_of = jnp.where(core.root_of == loser, root, core.root_of)
    size = core.size.at[root].set(core.size[a] + core.size[b]).at[loser].set(0)
    alive = core.alive.at[loser].set(False)
    return _Core(root_of, rank, alive, size), root, loser


def _set_row(sim, r, row):
    return sim.at[r, :].set(row).at[:, r].set(row)


class Flavour:
    """Similarity bookkeeping for one kind of per-block sequence."""

    def init(self, inputs) -> tuple[object, jax.Array]:  # (state, sim [n, n])
        raise NotImplementedError

    def update(self, state, inputs, core: _Core, a, b, root, members):
        """Returns (state, new similarity row of ``root`` against all roots)."""
        raise NotImplementedError


def _run(flavour: Flavour, inputs, n: int, final_state: bool = False):
    state, sim = flavour.init(inputs)
    core = _init_core(n)

    def step(carry, _):
        core, state, sim = carry
        a, b, s = _select(core, sim)
        ma, mb = core.root_of == a, core.root_of == b
        core, root, _ = _union(core, a, b)
        state, row = flavour.update(state, inputs, core, a, b, root, ma | mb)
        sim = _set_row(sim, root, row)
        return (core, state, sim), (a, b, root, s, ma, mb)

    (_, state, _), out = jax.lax.scan(step, (core, state, sim), None, length=n - 1)
    return (out, state) if final_state else out


# ----------------------------------------------------------------------------
# Flavour 1: constituent linkage on the cosine matrix (spec §4.2 (a), §10.2).


def cosine_from_gram(g: jax.Array) -> jax.Array:
    """The reference's constituent cosine ``<xi,xj>/(|xi||xj| + 1e-8)``."""
    nrm = jnp.sqrt(jnp.clip(jnp.diagonal(g, axis1=-2, axis2=-1), 0, None))
    return g / (nrm[..., :, None] * nrm[..., None, :] + 1e-8)


class _MeanLinkage(Flavour):
    """UPGMA on similarities: state holds the sum of pair cosines per group pair."""

    def init(self, c):
        return c, c

    def update(self, total, c, core, a, b, root, members):
        row_sum = total[a] + total[b]
        total = _set_row(total, root, row_sum)
        return total, row_sum / (core.size[root] * core.size).astype(row_sum.dtype)


@dataclasses.dataclass(frozen=True)
class _MinMax(Flavour):
    """Min (reference ``single``) or max (``complete``) pair cosine."""

    fn: Callable

    def init(self, c):
        return c, c

    def update(self, state, c, core, a, b, root, members):
        row = self.fn(state[a], state[b])
        return _set_row(state, root, row), row


def _linkage_flavour(linkage: str) -> Flavour:
    if linkage == "min":
        return _MinMax(jnp.minimum)
    if linkage == "max":
        return _MinMax(jnp.maximum)
    return _MeanLinkage()


@functools.partial(jax.jit, static_argnames=("linkage",))
def _linkage_sequences(gram: jax.Array, *, linkage: str):
    n = gram.shape[-1]
    flavour = _linkage_flavour(linkage)
    c = cosine_from_gram(gram)
    return jax.vmap(lambda cb: _run(flavour, cb, n))(c)


# ----------------------------------------------------------------------------
# Flavour 2: merged-vector similarity of linear operators, Gram only (§10.3).


def _gram_sims(similarity: str, q, qr, qs, numel):
    """Similarities from inner products ``q = <v_r, v_s>`` and squared norms."""
    if similarity == "cosine":
        return q / (jnp.sqrt(qr) * jnp.sqrt(qs))  # no eps: 0/0 -> NaN (ref)
    return -jnp.sqrt(jnp.clip(qr - 2 * q + qs, 0, None)) / jnp.sqrt(numel)


@dataclasses.dataclass(frozen=True)
class _LinearMerged(Flavour):
    """Group vectors ``w_r^T X`` kept as weight rows ``w`` over tasks."""

    similarity: str  # cosine | euclidean
    min_merged: int  # smaller groups keep their root's own vector
    sums: bool = False  # merged vector = scale * SUM (else scale * mean)

    def init(self, inp):
        g, numel, _ = inp
        dg = jnp.diagonal(g)
        w = jnp.eye(g.shape[-1], dtype=g.dtype)
        return w, _gram_sims(self.similarity, g, dg[:, None], dg[None, :], numel)

    def update(self, w, inp, core, a, b, root, members):
        g, numel, scale = inp  # scale: factor of merged groups (lambda)
        size = core.size[root]
        per = scale if self.sums else scale / size.astype(g.dtype)
        merged = members.astype(g.dtype) * per
        new = jnp.where(size >= self.min_merged, merged, w[root])
        w = w.at[root].set(new)
        gn = g @ new
        q = w @ gn
        qd = jnp.einsum("rn,nm,rm->r", w, g, w)
        return w, _gram_sims(self.similarity, q, new @ gn, qd, numel)


@functools.partial(jax.jit, static_argnames=("similarity", "min_merged", "sums"))
def _linear_sequences(gram, numel, scale, *, similarity, min_merged, sums):
    n = gram.shape[-1]
    flavour = _LinearMerged(similarity, min_merged, sums)
    return jax.vmap(lambda g, d: _run(flavour, (g, d, scale), n))(gram, numel)


# ----------------------------------------------------------------------------
# Flavour 3: merged-vector similarity with materialized group vectors (§10.4).


def _sign_sims(v: dict, numel: int) -> jax.Array:
    """Sign agreement between all rows of the group vectors ``v`` (f64)."""

    agree = 0
    for x in v.values():
        s = jnp.sign(x)
        for val in (-1.0, 0.0, 1.0):
            ind = (s == val).astype(jnp.float64)
            agree = agree + gram_dot(ind, ind)
    return agree / numel


def _pair(similarity: str, row: dict, new: dict, precision: str) -> jax.Array:
    """What similarity ``similarity`` needs of one group vector ``row``
    against the new one (f64 scalar): their dot product (cosine), squared
    distance (euclidean) or number of equal signs (sign).

    ``precision="float64"``: float32 products (differences, for euclidean),
    each rounded once as float32 arithmetic rounds it, summed in float64.
    A dot product is then within ``2^-24 sum|a_j b_j| <= 2^-24 |a| |b|`` of
    the exact one (a cosine, whose squared norms are such sums too, within
    ~``2^-23`` = 1.2e-7; squared distances within ``2^-23`` relative), and
    the float64 sums make the result independent of the order of summation
    to ~1e-16: shards, devices and XLA's reassociations give the same
    similarities, hence the same plan. (Exact float64 products cost 2.5x as
    much on XLA's CPU backend, where each float32 operand is widened in a
    separate pass; the Gram matrices, one BLAS product per block, stay
    exact.) ``"float32"``: products and sums in float32 per leaf (no
    matmul, so no reduced-precision passes on GPU/TPU; relative error
    ~1e-7, the reference's arithmetic), leaves then summed in float64. Sign
    counts are exact either way.
    """
    f = lambda x: x.astype(jnp.float64)
    if similarity == "sign":
        return sum(f(jnp.sum(jnp.sign(new[k]) == jnp.sign(x))) for k, x in row.items())

    def leaf(x, y):
        t = x * y if similarity == "cosine" else x - y  # float32, rounded once
        if precision == "float64":
            t = f(t)  # widened before any sum (and, for euclidean, the square)
        return f(jnp.sum(t if similarity == "cosine" else t * t))

    return sum(leaf(x, new[k]) for k, x in row.items())


def _finish_sims(similarity: str, val, r, norms2, numel: int):
    """Similarities of row ``r`` from its comparisons ``val f64[n]`` (dots
    for cosine, with ``val[r]`` its squared norm; squared distances; equal
    signs). Returns ``(f64[n] similarities, updated norms2)``."""
    if similarity == "sign":
        return val / numel, norms2
    if similarity == "cosine":
        norms2 = norms2.at[r].set(val[r])
        return _gram_sims("cosine", val, val[r], norms2, numel), norms2
    return -jnp.sqrt(val) / jnp.sqrt(jnp.float64(numel)), norms2


@dataclasses.dataclass(frozen=True)
class _Materialized(Flavour):
    """Group vectors materialized by the method, compared on full tensors.

    A group's vector lies in one of two places: a singleton (or a group
    below ``min_merged``, which keeps its root's vector) reads its task's
    row of the input ``rows`` (never copied: on the host they alias the
    caller's arrays); a merged group's vector is in one of ``n // 2``
    *slots*, enough since live merged groups are disjoint and have two
    tasks at least. Every place is a separate buffer (XLA's CPU code
    reduces a whole buffer at its best speed, while reductions over part
    of an ``[n, ...]`` array run several times slower), and only the live
    places are read, each behind a ``lax.cond``: a new vector costs one
    comparison per live group. State: ``(slots, slot_of int32[n] (-1: the
    input row), squared norms f64[n])``; the slots come in as an input
    (donated on the host, see :func:`materialized_sequence`) or, if
    ``None``, start as zeros (never read before written either way).
    """

    similarity: str
    method: object  # static part of a Method (see Method.split)
    min_merged: int
    numel: int
    precision: str = "float64"  # of the group-vector comparisons (see _pair)

    def init(self, inp):
        x, singles, rows, slots, g, extra, hp = inp
        n = len(rows)
        if slots is None:
            slots = tuple({k: jnp.zeros_like(v) for k, v in rows[0].items()}
                          for _ in range(max(1, n // 2)))
        slot_of = jnp.full((n,), -1, jnp.int32)
        if self.similarity == "sign":
            sims = _sign_sims(singles, self.numel)
            return (slots, slot_of, jnp.zeros(sims.shape[:1], jnp.float64)), sims
        dg = jnp.diagonal(g)  # squared norms, carried for cosine
        return (slots, slot_of, dg), _gram_sims(
            self.similarity, g, dg[:, None], dg[None, :], jnp.float64(self.numel))

    def update(self, state, inp, core, a, b, root, members):
        # After the last merge nothing is left to compare: its group vector
        # (a merge of every task) is never computed.
        n = core.alive.shape[0]
        loser = a + b - root
        return jax.lax.cond(
            jnp.sum(core.alive) > 1,
            lambda state: self._update(state, inp, core, root, loser, members),
            lambda state: (state, jnp.zeros((n,), jnp.float64)),
            state,
        )

    def _update(self, state, inp, core, root, loser, members):
        slots, slot_of, norms2 = state
        x, _, rows, _, _, extra, hp = inp
        n, nslots = len(rows), len(slots)
        merged = core.size[root] >= self.min_merged

        def vector():
            return self.method.join(hp).group_vector(x, members, extra)

        def own():  # below min_merged: the root's own row, where it lies
            return jax.lax.switch(root, [lambda k=k: rows[k] for k in range(n)])

        # (Groups always reach min_merged <= 2: no cond, no copy.)
        new = vector() if self.min_merged <= 2 else jax.lax.cond(merged, vector, own)
        # A merged vector goes to a slot no other live group holds (the
        # root's own included). Only that slot's buffer is written: the
        # others pass through their conds in place.
        others = core.alive & (jnp.arange(n) != root)
        held = jnp.any(others[None, :] & (slot_of[None, :] == jnp.arange(nslots)[:, None]),
                       axis=1)
        s = jnp.argmin(held).astype(jnp.int32)
        slots = tuple(jax.lax.cond(merged & (s == j), lambda sl: new, lambda sl: sl, sl)
                      for j, sl in enumerate(slots))
        slot_of = jnp.where(merged, slot_of.at[loser].set(-1).at[root].set(s), slot_of)
        pair = lambda v: _pair(self.similarity, v, new, self.precision)
        zero = lambda v: jnp.zeros((), jnp.float64)
        in_row = core.alive & (slot_of < 0)
        val = jnp.stack([jax.lax.cond(in_row[k], pair, zero, rows[k]) for k in range(n)])
        for j, sl in enumerate(slots):
            owner = core.alive & (slot_of == j)
            v = jax.lax.cond(jnp.any(owner), pair, zero, sl)
            val = val + jnp.where(owner, v, 0.0)
        row, norms2 = _finish_sims(self.similarity, val, root, norms2, self.numel)
        return (slots, slot_of, norms2), row


@functools.partial(
    jax.jit, static_argnames=("similarity", "method", "min_merged", "numel", "precision"),
    donate_argnames=("slots",),
)
def _materialized_sequence(x, singles, rows, slots, gram, extra, hp, *, similarity, method,
                           min_merged, numel, precision):
    n = next(iter(x.values())).shape[0]
    if rows is None:  # device arrays: one buffer per row, sliced here
        rows = tuple({k: t[i] for k, t in singles.items()} for i in range(n))
    flavour = _Materialized(similarity, method, min_merged, numel, precision)
    out, state = _run(flavour, (x, singles, rows, slots, gram, extra, hp), n, final_state=True)
    return out, state[0]


def _host_rows(singles: dict):
    """Per-task rows of host-resident ``singles`` as NumPy views (jit
    arguments that alias them when 64-byte aligned), else ``None``."""

    leaves = list(singles.values())
    if not leaves or not all(host_resident(v) for v in leaves):
        return None
    arrays = {k: np.asarray(v) for k, v in singles.items()}
    n = leaves[0].shape[0]
    return tuple({k: v[i] for k, v in arrays.items()} for i in range(n))


# ----------------------------------------------------------------------------
# Public-in-package entry points.






def _to_sequences(out) -> list[BlockSequence]:
    a, b, root, s, ma, mb = (np.asarray(t) for t in out)
    if a.ndim == 1:
        return [BlockSequence(a, b, root, s.astype(np.float64), ma, mb)]
    return [
        BlockSequence(a[i], b[i], root[i], s[i].astype(np.float64), ma[i], mb[i])
        for i in range(a.shape[0])
    ]


def linkage_sequences(grams: np.ndarray, linkage: str) -> list[BlockSequence]:
    """Per-block sequences for constituent linkage (``grams: f64[B, n, n]``)."""
    with jax.enable_x64(True):
        return _to_sequences(
            _linkage_sequences(jnp.asarray(grams, jnp.float64), linkage=linkage)
        )


def linear_sequences(
    grams: np.ndarray, numels: np.ndarray, similarity: str, scale: float, min_merged: int,
    sums: bool = False,
) -> list[BlockSequence]:
    """Per-block sequences for merged-vector similarity of linear operators."""
    with jax.enable_x64(True):
        out = _linear_sequences(
            jnp.asarray(grams, jnp.float64),
            jnp.asarray(numels, jnp.float64),
            jnp.float64(scale),
            similarity=similarity,
            min_merged=int(min_merged),
            sums=bool(sums),
        )
        return _to_sequences(out)


def materialized_sequence(
    x: dict, singles: dict, extra, similarity: str, method, numel: int,
    gram: np.ndarray | None = None, precision: str = "float64",
) -> BlockSequence:
    """Per-block sequence with materialized group vectors (one block).

    Args:
      x: ``{name: f32[n, ...]}`` preprocessed task vectors (merge inputs).
      singles: the vectors singletons are compared with (``x``, or the raw
        task vectors for structured orders).
      extra: per-block method state (PCB), or ``None``.
      similarity: ``cosine`` | ``euclidean`` | ``sign``.
      method: the :class:`~flexmerge_jax.methods.Method`.
      numel: the block's number of entries.
      gram: ``f64[n, n]`` Gram matrix of ``singles`` if already known
        (cosine and euclidean start from it).
      precision: ``"float64"`` or ``"float32"``: of the Gram computed here
        if not given (see :func:`~flexmerge_jax.stats.gram.block_gram`) and of every group
        vector comparison (see :func:`_pair`).
    """

    x, singles = canonical(x), canonical(singles)
    static, hp = method.split()
    if similarity != "sign" and gram is None:
        gram = block_gram(singles, precision)
    rows = _host_rows(singles)
    slots = pool = None  # device arrays: made in the jitted code (no page faults there)
    if rows is not None:
        # On the host, XLA's fresh buffers cost a page fault per 4 KB: the
        # slot buffers are donated, and inside reuse_buffers handed back to
        # its pool for the next block of the same shapes.
        key = (__name__, len(rows), tuple((k, v.shape, v.dtype) for k, v in rows[0].items()))
        pool = buffer_pool()
        slots = None if pool is None else pool.take_back(key)
        if slots is None:
            slots = tuple({k: jnp.zeros(v.shape, v.dtype) for k, v in rows[0].items()}
                          for _ in range(max(1, len(rows) // 2)))
    with jax.enable_x64(True):
        out, slots = _materialized_sequence(
            x, singles, rows, slots,
            None if gram is None else jnp.asarray(gram, jnp.float64), extra, hp,
            similarity=similarity, method=static,
            min_merged=int(method.min_merged), numel=int(numel), precision=precision,
        )
        if pool is not None:
            pool.hand_back(key, slots)
        return _to_sequences(out)[0]


def replay(a, b, root, n: int) -> BlockSequence:
    """Rebuilds a block's sequence (memberships) from its merges alone."""
    root_of = np.arange(n)
    ma, mb = [], []
    for x, y, r in zip(a, b, root):
        ma.append(root_of == x)
        mb.append(root_of == y)
        loser = y if r == x else x
        root_of = np.where(root_of == loser, r, root_of)
    shape = (len(ma), n)
    return BlockSequence(
        np.asarray(a, np.int32), np.asarray(b, np.int32), np.asarray(root, np.int32),
        np.zeros(len(ma)), np.stack(ma) if ma else np.zeros(shape, bool),
        np.stack(mb) if mb else np.zeros(shape, bool),
    )


def interleave(seqs: list[BlockSequence]) -> tuple[np.ndarray, np.ndarray]:
    """Global greedy order: ``(block index, within-block index)`` per step.

    Each step takes the next event of the block whose next event is the
    most similar (NaN similarities after every number; ties to the lowest
    block index): a merge of the blocks' sequences by their heads, on the
    host (a few hundred comparisons; as an XLA loop it cost a compilation
    of its own in every new process).
    """
    sims = [np.asarray(s.sim, np.float64) for s in seqs]

    def head(b: int, i: int):  # heapq pops the smallest
        v = float(sims[b][i])
        return (1, 0.0, b, i) if math.isnan(v) else (0, -v, b, i)

    heap = [head(b, 0) for b in range(len(sims)) if len(sims[b])]
    heapq.heapify(heap)
    blk, seq = [], []
    while heap:
        _, _, b, i = heapq.heappop(heap)
        blk.append(b)
        seq.append(i)
        if i + 1 < len(sims[b]):
            heapq.heappush(heap, head(b, i + 1))
    return np.asarray(blk, np.int32), np.asarray(seq, np.int32)
