r"""Order statistics of task vectors: exact radix select, and the TIES trim.

* :func:`kth_smallest` / :class:`RadixSelect` — exact per-task k-th smallest
  value over any number of leaves, by a two-pass radix select (16-bit
  histograms of the float bit patterns) instead of a sort: it streams over
  any number of leaves (or blocks read from disk), only needs per-task
  histograms to be summed, and works on sharded arrays without gathering a
  task vector on one device.
* :func:`ties_trim_thresholds` / :func:`trim` — TIES trimming done **once
  per task over the whole model**: keep fraction ``keep``,
  ``k = d - int(d*keep)``, threshold :math:`t_i` = k-th smallest
  :math:`|\tau_i|`, keep :math:`|\tau_i|\ge t_i` (``int(d*keep)+1`` entries
  absent ties). The host pass that finds the same thresholds in one read
  (fused with the Gram matrices) is :func:`flexmerge_jax.stats.passes.trim_pass`.

PCB's thresholds (:mod:`flexmerge_jax.methods.pcb`) are built on
:func:`kth_smallest`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ..tree import host_resident, trim

__all__ = [
    "kth_smallest",
    "RadixSelect",
    "ties_keep_count",
    "ties_trim_thresholds",
    "trim_traceable",
]

_BINS = 1 << 16
_SIGN = np.uint32(0x80000000)

Leaves = Sequence[jax.Array] | Callable[[], Iterable[jax.Array]]


def leaf_iter(leaves: Leaves) -> Iterable[jax.Array]:
    return leaves() if callable(leaves) else leaves


def _keys(x: jax.Array, signed: bool) -> jax.Array:
    """Order-preserving uint32 keys of float32 values (``[n, d]``)."""
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    if not signed:
        return u  # non-negative floats: bit patterns are ordered
    neg = (u >> 31) == 1
    return jnp.where(neg, ~u, u | jnp.uint32(_SIGN))


def _from_keys(keys: np.ndarray, signed: bool) -> np.ndarray:
    keys = keys.astype(np.uint32)
    if signed:
        pos = (keys & _SIGN) != 0
        keys = np.where(pos, keys & np.uint32(0x7FFFFFFF), ~keys)
    return keys.astype(np.uint32).view(np.float32)


def _local_hist(x, prefix, signed: bool):
    """Per-task histogram of 16-bit key digits of a local (unsharded) block.

    ``prefix is None``: the high 16 bits; else the low 16 bits of the
    entries whose high bits equal ``prefix[task]``.
    """
    n = x.shape[0]
    key = _keys(x.reshape(n, -1), signed)
    offset = (jnp.arange(n, dtype=jnp.int32) * _BINS)[:, None]
    if prefix is None:
        idx = (key >> 16).astype(jnp.int32) + offset
    else:
        match = (key >> 16).astype(jnp.int32) == prefix[:, None]
        low = (key & jnp.uint32(0xFFFF)).astype(jnp.int32)
        idx = jnp.where(match, low + offset, n * _BINS)
    return jnp.bincount(idx.ravel(), length=n * _BINS + 1)[:-1].reshape(n, _BINS)


@functools.partial(jax.jit, static_argnames=("signed",))
def _hist_jit(x, prefix, *, signed):
    return _local_hist(x, prefix, signed)


@functools.lru_cache(maxsize=64)
def _hist_sharded(mesh, spec, signed: bool, with_prefix: bool):
    axes = tuple(a for entry in spec if entry is not None
                 for a in (entry if isinstance(entry, tuple) else (entry,)))

    def local(x, prefix):
        return jax.lax.psum(_local_hist(x, prefix if with_prefix else None, signed), axes)

    f = jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=P())
    return jax.jit(f)


def _hist(x: jax.Array, prefix, signed: bool) -> np.ndarray:
    """Histogram of one leaf; per-shard + all-reduce when ``x`` is sharded."""
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and any(e is not None for e in sh.spec):
        fn = _hist_sharded(sh.mesh, sh.spec, signed, prefix is not None)
        p = jnp.zeros((x.shape[0],), jnp.int32) if prefix is None else prefix
        return np.asarray(fn(x, p), np.int64)
    return np.asarray(_hist_jit(x, prefix, signed=signed), np.int64)


def _high16(a: np.ndarray) -> np.ndarray:
    """High 16 bits (sign, exponent, 7 mantissa bits) of float32 entries, as
    ``uint16`` (a strided view on little-endian machines: no copy)."""
    if sys.byteorder == "little":
        return a.view(np.uint16)[..., 1::2]
    return (a.view(np.uint32) >> 16).astype(np.uint16)


def _low16(a: np.ndarray) -> np.ndarray:
    if sys.byteorder == "little":
        return a.view(np.uint16)[..., 0::2]
    return (a.view(np.uint32) & 0xFFFF).astype(np.uint16)


def _host_magnitude_hist(x, prefix) -> np.ndarray:
    """NumPy twin of ``_hist(|x|, prefix, signed=False)`` for a host array.

    The keys of ``|x|`` are the bit patterns with the sign cleared: the
    first pass counts their high 16 bits (one ``bincount`` for all tasks),
    the second the low 16 bits of the entries whose magnitude lies in the
    bin ``prefix[i]``. ``int64[n, 65536]``.
    """
    a = np.asarray(x)
    n = a.shape[0]
    a = a.reshape(n, -1)
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    out = np.zeros((n, _BINS), np.int64)
    if prefix is None:  # one bincount for all tasks: the task offsets the bin
        half = _BINS // 2
        keys = (a.view(np.uint32) & np.uint32(0x7FFFFFFF)) >> 16
        keys += (np.arange(n, dtype=np.uint32) * half)[:, None]
        out[:, :half] = np.bincount(keys.ravel(), minlength=n * half).reshape(n, half)
        return out
    hi = _high16(a)
    for i in range(n):
        inbin = (hi[i] & 0x7FFF) == prefix[i]
        out[i] = np.bincount(_low16(a[i])[inbin], minlength=_BINS)
    return out


def kth_smallest(
    leaves: Leaves,
    k: Sequence[int] | np.ndarray,
    *,
    signed: bool = True,
    transform: Callable[[jax.Array], jax.Array] | None = None,
    magnitude: bool = False,
) -> np.ndarray:
    """Exact per-task k-th smallest value over many leaves (radix select).

    Args:
      leaves: arrays ``f32[n, ...]`` (task axis first), or a zero-argument
        callable returning a fresh iterable of them (read twice, e.g. block
        by block from disk). Values must be finite.
      k: ``int[n]`` 1-based rank per task (``1`` = minimum).
      signed: values may be negative (``False``: all values are >= 0).
      transform: optional elementwise function applied to each leaf first
        (e.g. ``jnp.abs``), fused into both passes.
      magnitude: select among ``|x|`` (``signed=False, transform=jnp.abs``,
        with a NumPy path for host-resident leaves).

    Returns:
      ``np.float32[n]``, the k-th smallest value of each task (as
      ``torch.kthvalue``), exact (no sort, two passes of 16-bit histograms).
      Sharded leaves are histogrammed shard by shard (``shard_map``) and the
      ``[n, 65536]`` counts all-reduced: nothing is gathered.

    Raises:
      ValueError: if some ``k`` is outside ``[1, number of values]``.
    """
    sel = RadixSelect(k, signed=signed, transform=transform, magnitude=magnitude)
    sel.first_pass(leaf_iter(leaves))
    return sel.second_pass(leaf_iter(leaves))


class RadixSelect:
    """The two passes of :func:`kth_smallest`, usable separately.

    After :meth:`first_pass` (a histogram of the high 16 bits of the keys),
    every value is *decided* relative to the answer except those whose high
    bits equal :attr:`prefix` of their task (the answer's bin); the answer
    then follows from :meth:`second_pass` (a histogram of the low 16 bits of
    that bin, over all values again).
    """

    def __init__(self, k, *, signed: bool = True, transform=None, magnitude: bool = False):
        self.k = np.asarray(k, np.int64)
        self.magnitude = magnitude  # keys are |x| (TIES); host leaves take a NumPy path
        if magnitude:
            signed, transform = False, jnp.abs
        self.signed = signed
        self.tf = transform or (lambda a: a)
        self.prefix = None  # int32[n]: the answer's high-16-bit bin per task
        self.below = None  # int64[n]: number of values in lower bins

    def first_pass(self, leaves) -> None:
        hist = None
        for x in leaves:
            h = self._hist(x, None)
            hist = h if hist is None else hist + h
        if hist is None:
            raise ValueError("kth_smallest needs at least one leaf")
        k = self.k
        total = hist.sum(axis=1)
        if np.any(k < 1) or np.any(k > total):
            raise ValueError(f"rank k={k.tolist()} outside [1, {int(total[0])}]")
        cum = np.cumsum(hist, axis=1)
        hi = np.argmax(cum >= k[:, None], axis=1)
        rows = np.arange(len(k))
        self.below = np.where(hi > 0, cum[rows, np.maximum(hi - 1, 0)], 0)
        self.prefix = hi.astype(np.int32)

    def _hist(self, x, prefix) -> np.ndarray:
        if self.magnitude and host_resident(x):
            return _host_magnitude_hist(x, prefix)
        return _hist(self.tf(x), None if prefix is None else jnp.asarray(prefix), self.signed)

    def second_pass(self, leaves) -> np.ndarray:
        hist2 = None
        for x in leaves:
            h = self._hist(x, self.prefix)
            hist2 = h if hist2 is None else hist2 + h
        cum2 = self.below[:, None] + np.cumsum(hist2, axis=1)
        lo = np.argmax(cum2 >= self.k[:, None], axis=1)
        keys = (self.prefix.astype(np.uint64) << 16) | lo.astype(np.uint64)
        return _from_keys(keys, self.signed)


def ties_keep_count(d: int, keep: float) -> int:
    """The reference's rank ``k = d - int(d*keep)`` (at least 1)."""
    if keep > 1:
        keep = keep / 100
    k = d - int(d * keep)
    return max(k, 1)


def ties_trim_thresholds(leaves: Leaves, keep: float, d: int) -> np.ndarray:
    r"""Per-task TIES thresholds over the whole model.

    Args:
      leaves: every task-vector leaf ``f32[n, ...]`` of the model (all
        parameters, as the reference trims before assigning blocks).
      keep: fraction kept, in (0, 1).
      d: number of parameters of one model (sum of leaf sizes).

    Returns:
      ``f32[n]``: :math:`t_i`, the ``d - int(d*keep)``-th smallest
      :math:`|\tau_i|`; entries with :math:`|\tau_i|\ge t_i` are kept.
    """
    leaves_list = leaves
    n = None
    for x in leaf_iter(leaves_list):
        n = x.shape[0]
        break
    return kth_smallest(leaves_list, np.full((n,), ties_keep_count(d, keep)), magnitude=True)


def trim_traceable(x: dict, keep: float, total: int) -> dict:
    """The global per-task TIES trim of an in-memory model as one traceable
    ``jax.numpy`` function (``jit``/``vmap``/``grad``): the same order
    statistic as :func:`ties_trim_thresholds` (the ``ties_keep_count``-th
    smallest ``|x_i|``), by a sort of every task's magnitudes.

    Args:
      x: ``{name: f32[n, ...]}`` every task-vector leaf of the model.
      keep: fraction kept (static: it fixes the rank).
      total: entries of one model (sum of the leaf sizes).

    Returns:
      ``{name: f32[n, ...]}``, :func:`trim` of each leaf.
    """
    n = next(iter(x.values())).shape[0]
    mags = jnp.concatenate([jnp.abs(v).reshape(n, -1) for v in x.values()], axis=1)
    k = ties_keep_count(total, keep)
    thr = jnp.sort(mags, axis=1)[:, k - 1]
    return {name: trim(v, thr) for name, v in x.items()}
