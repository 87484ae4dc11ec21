"""Streaming passes over a prepared source: per-block Gram matrices and the TIES trim.

:func:`grams` reads every block once and returns ``f64[B, n, n]``; with the
global TIES trim on, :func:`trim_pass` finds the exact per-task thresholds
and the trimmed Grams in the same read (host inputs), otherwise the radix
select of :mod:`.order` runs in XLA. ``prepared`` is a
:class:`~flexmerge_jax._prepared.Prepared`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np

from ..sources._source import ABS_BITS, INF_BITS, host_inputs, read_chunks, tv_chunks
from ..sources.threads import HOST_QUEUE, HOST_THREADS, host_map
from .gram import GRAM_PRECISIONS, GramSum, block_gram, columns, streamed_gram
from .order import RadixSelect, kth_smallest

if TYPE_CHECKING:  # annotations only (Prepared is built on this module)
    from .._prepared import Prepared

__all__ = ["grams", "trim_thresholds", "trim_pass"]


def trim_thresholds(prepared: Prepared) -> np.ndarray:
    """Per-task TIES thresholds ``f32[n]`` over the whole model.

    The exact ``k``-th smallest ``|tau_i|`` over every parameter (blocks or
    not, as the reference trims before assigning blocks), ``k =
    ties_keep_count(d, keep)``. Two back-ends behind this one function: on
    host-resident inputs :func:`trim_pass` (a sampled bracket and one read);
    otherwise the radix select of :func:`~.order.kth_smallest` in XLA (two
    reads; sharded arrays histogrammed shard by shard). The traceable twin
    for in-memory pytrees is :func:`~.order.trim_traceable`.
    """
    res = trim_pass(prepared, want_grams=False)
    if res is not None:
        return res[0]
    return kth_smallest(prepared.all_leaves, prepared.keep_count, magnitude=True)


def grams(prepared: Prepared, *, raw: bool = False, precision: str = "float64") -> np.ndarray:
    """Per-block Gram matrices ``f64[B, n, n]`` in one pass over the blocks.

    On host-resident inputs (CPU backend) task vectors are never
    materialized: each block's Gram is accumulated from cache-sized chunks
    of ``f32(theta_i) - f32(theta_0)`` (:func:`~flexmerge_jax.sources._source.tv_chunks`), and
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
            prepared.trim_threshold, g = fused
            return g
    blocks, n = prepared.partition.blocks, prepared.n

    def task(b):
        return lambda inputs: streamed_gram(inputs, blocks[b].leaves, n, precision)

    out = host_map(prepared.source, [b.leaves for b in blocks], task) \
        if raw or prepared.identity else None
    if out is not None:
        out = list(out)
        for b, g in enumerate(out):
            if not np.isfinite(np.diag(g)).all():
                prepared.tau(b)  # raises on NaN/Inf (float32 products may just overflow)
        return np.stack(out)
    return np.stack([block_gram(tau if raw else prepared.x(b, tau), precision)
                     for b, tau in enumerate(prepared.taus())])


# |x| keys: the bits of a float32 with the sign cleared (sources._source.ABS_BITS),
# monotone in |x|; INF_BITS and above are Inf/NaN.
_NO_KEY = 0x80000000  # above every |x| key, NaN included
# Entries per task sampled to bracket the thresholds: more narrows the bracket
# (fewer undecided entries captured by the pass) for more sampled reads.
_SAMPLE = 1 << 20
# Entries per contiguous run of the sample: longer runs mean fewer byte ranges
# read from files, but correlated entries (a wider bracket for the same size).
_RUN = 256
# Bracket half-width, in standard errors of the sample quantile: wider makes a
# miss (and the exact radix-select fallback) rarer but captures more entries.
_SIGMAS = 5.0
# Memory for the undecided keys captured by a pass; past it the exact radix
# select (two more reads) takes over.
_KEY_BYTES = 1 << 28
# Memory for the undecided columns kept for the Gram correction (at least; see
# _column_budget); past it the Grams take a second pass with known thresholds.
_COLUMN_BYTES = 1 << 28
# Of which the first are kept unpacked: no packing time, 4x the memory at keep 0.2.
_DENSE_BYTES = 1 << 26


def _column_budget(prepared: Prepared) -> int:
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
    host-resident; else ``(thresholds f32[n], Grams f64[B, n, n] or None)``
    (Grams when ``want_grams``).
    """
    part, src, n = prepared.partition, prepared.source, prepared.n
    size = dict(zip(prepared.layout.names, prepared.layout.sizes))
    groups = [(blk.leaves, b) for b, blk in enumerate(part.blocks)]
    groups += [(c, None) for c in read_chunks(part.unmatched, [size[u] for u in part.unmatched])]
    first = [host_inputs(src, groups[0][0])]  # handed over (see host_map)
    if first[0] is None:
        return None
    k = prepared.keep_count
    top = [0]

    def all_chunks():
        for names, _ in groups:
            for _, t in tv_chunks(*host_inputs(src, names), names, columns(n)):
                top[0] = max(top[0], int((t.view(np.uint32) & ABS_BITS).max()))
                yield t

    lo, hi = _sample_bracket(prepared, k)
    res = _bracket_scan(prepared, groups, lo, hi, want_grams, precision, first=first)
    if res is not None:
        thr, g = res
    else:  # the bracket missed or captured too much: exact radix select
        sel = RadixSelect(k, magnitude=True)
        sel.first_pass(all_chunks())
        if top[0] >= INF_BITS:  # histograms cannot tell NaN/Inf: name it
            _raise_nonfinite(prepared)
        thr, g = sel.second_pass(all_chunks()), None
    if not want_grams:
        return thr, None
    if g is None:  # one more pass, with the thresholds known: nothing undecided
        key = thr.view(np.uint32)
        _, g = _bracket_scan(prepared, groups[:len(part)], key, key, True, precision,
                             counts=False)
    return thr, g


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
    byte ranges instead of everything (:meth:`~flexmerge_jax.sources.Source.sample_runs`).
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
    for names in read_chunks(list(layout.names), layout.sizes):
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
            parts += [r.view(np.uint32) & ABS_BITS for r in src.sample_runs(requests)]
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
    cols = columns(n)
    g = GramSum(n, precision) if gram else None
    below = np.zeros(n, np.int64)
    keys, cnts, caps, top = [], [], [], 0
    # Buffers reused by every chunk (no allocation in the loop).
    ub = np.empty((n, cols), np.uint32)
    keptb, geb = np.empty((n, cols), bool), np.empty((n, cols), bool)
    f32b = np.empty((n, cols), np.float32) if gram else None
    for _, t in tv_chunks(*inputs, names, cols):
        c = t.shape[1]
        u, kept = ub[:, :c], keptb[:, :c]
        np.bitwise_and(t.view(np.uint32), ABS_BITS, out=u)
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
        sub = ge.take(idx, axis=1)  # take: a plain gather, no fancy-indexing machinery
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
    for the time it takes to pack and unpack them)."""
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
    host inputs, if already read (a one-element list, see :func:`host_map`).
    The groups are scanned in parallel (:func:`host_map`)."""
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
    with contextlib.closing(host_map(src, [g[0] for g in groups], task, first, ahead)) as results:
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
    if top >= INF_BITS:  # NaN/Inf somewhere: name it
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
        plus, minus = GramSum(n), GramSum(n)  # float64 whatever the precision
        for packed in captured.get(b, ()):
            a = _unpack_columns(*packed)
            key = a.view(np.uint32) & ABS_BITS
            plus.add(a * (key >= tk))
            minus.add(a * (key >= hi_c))
        g += plus.result() - minus.result()
    return thr, np.stack(out)
