"""Where parameters come from: a pytree in memory, or checkpoints on disk.

The planner never holds all task vectors at once: it asks a :class:`Source`
for the leaves of one block (base and the n fine-tuned models) at a time, so
a disk-backed source keeps host memory at O(n x largest block).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import sys
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..tree import Layout, check_finetuned, flatten, host_resident, trim

PyTree = Any


class Source(abc.ABC):
    """Base params and n fine-tuned params, readable by parameter name."""

    layout: Layout
    task_names: tuple[str, ...]
    #: Whether :meth:`base` / :meth:`finetuned` may hand out host arrays that
    #: the NumPy streaming paths (:func:`host_inputs`) can use as they are.
    host_capable: bool = True
    #: Whether reads are slow enough (files) that the streaming passes should
    #: read the next block in a background thread while computing on this one.
    prefetch: bool = False
    #: Whether device programs on this source's arrays must all be issued
    #: from the caller's thread: when a mesh spans processes, programs that
    #: carry collectives must be issued in the same order on every process,
    #: which worker threads cannot promise.
    main_thread_only: bool = False

    @property
    def n(self) -> int:
        return len(self.task_names)

    @abc.abstractmethod
    def base(self, names: Sequence[str]) -> dict[str, Any]:
        """``{name: array}`` of the base model (original dtype)."""

    @abc.abstractmethod
    def finetuned(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """For each task, ``{name: array}`` (original dtype)."""

    def finetuned_tasks(self, names: Sequence[str], tasks: Sequence[int]) -> dict[int, dict]:
        """``{task: {name: array}}`` for some tasks only (sources that read
        files read only those tasks' files)."""
        if not len(tasks):
            return {}
        fts = self.finetuned(names)
        return {int(t): fts[t] for t in tasks}

    def describe(self) -> dict:
        """JSON description (used to record where a plan's inputs came from)."""
        return {"kind": type(self).__name__}

    def base_region(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The base entries ``base[name][index]`` (original dtype; ``index``:
        one slice per dimension, as a sharding's shard indices). The default
        reads the parameter whole; file sources read only the region."""
        return np.asarray(self.base([name])[name])[index]

    def finetuned_region(self, name: str, index: tuple[slice, ...],
                         tasks: Sequence[int]) -> list[np.ndarray]:
        """``[finetuned[t][name][index] for t in tasks]`` (see
        :meth:`base_region`)."""
        got = self.finetuned_tasks([name], tasks)
        return [np.asarray(got[int(t)][name])[index] for t in tasks]

    def changed(self) -> list[str]:
        """Inputs that differ from when this source was made (files edited
        or replaced since), each as ``"task 'x' PATH (why)"``; sources
        without files have none."""
        return []

    def sample_runs(self, requests: Sequence[tuple[str, np.ndarray, int]]) -> list[np.ndarray]:
        """Task-vector entries in contiguous runs, for sampling statistics.

        Args:
          requests: ``(name, starts, length)``: the flat entries
            ``[s, s + length)`` of parameter ``name`` for each ``s``.

        Returns:
          per request, ``f32[n, len(starts), length]`` (not checked finite).
          The default reads the requested parameters whole, once; sources
          that can read byte ranges (safetensors files) read only the runs.
        """
        names = [r[0] for r in requests]
        return _runs(self.base(names), self.finetuned(names), requests)

    def task_vectors(self, names: Sequence[str], threshold=None) -> dict[str, Any]:
        """``{name: f32[n, ...]}`` task vectors, checked finite.

        On the CPU backend, host-resident inputs (NumPy, or JAX arrays on the
        CPU) are subtracted by NumPy into NumPy arrays: no copy into XLA
        buffers, which on the CPU costs more than the subtraction itself.
        Otherwise one jitted kernel computes them on the default device. Both
        compute ``f32(theta_i) - f32(theta_0)``, bit for bit the same.

        Args:
          names: the parameters.
          threshold: optional ``f32[n]`` TIES trim thresholds: entries with
            ``|x| < threshold[i]`` are zeroed (:func:`~flexmerge_jax.tree.trim`, bit for
            bit), on the host in the same pass as the subtraction.

        Raises:
          ValueError: naming the first task and parameter with NaN/Inf.
        """
        return self.inputs(names, (), threshold)[2]

    def inputs(self, names: Sequence[str], tasks: Sequence[int], threshold=None,
               task_vectors: bool = True, out: np.ndarray | None = None):
        """One read of the inputs of ``names`` that a cut needs: ``(base,
        {task: params} of the ``tasks`` kept as they are, task vectors)``.

        With ``task_vectors`` they are computed as :meth:`task_vectors`
        computes them, from the same read of every input as the base and the
        ``tasks``' parameters (a block's merged groups need its task vectors,
        its tasks kept as they are their own parameters: nothing is read
        twice for both); without, only the ``tasks``' files are read and the
        base and task vectors are ``None``.

        ``out`` (optional, ``f32[n, P]``, ``P`` at least the entries of
        ``names``): where the NumPy host path applies, the task vectors
        are written into its rows, the parameters end to end in ``names``
        order, and returned as views of it (a flat merge then needs no
        copy, :mod:`flexmerge_jax._flat`); other paths ignore it.
        """
        if not task_vectors:
            return None, self.finetuned_tasks(names, tasks), None
        base = self.base(names)
        fts = self.finetuned(names)
        tau = _task_vectors_of(names, base, fts, self.task_names, threshold, out)
        return base, {int(t): fts[t] for t in tasks}, tau


def _task_vectors_of(names, base: dict, fts: Sequence[dict], task_names, threshold=None,
                     out=None):
    """:meth:`Source.task_vectors` of inputs already read (``out``: see
    :meth:`Source.inputs`)."""
    if _all_host(names, base, fts):
        return host_task_vectors(names, base, fts, task_names, threshold, out)
    tau, oks = {}, []
    thr = None if threshold is None else jnp.asarray(threshold, jnp.float32)
    for name in names:
        tau[name], ok = _task_vector(
            jnp.asarray(base[name]), tuple(jnp.asarray(f[name]) for f in fts), thr
        )
        oks.append(ok)
    _check_finite(names, np.asarray(jnp.stack(oks)) if oks else [], task_names, base)
    return tau


def region_runs(shape: Sequence[int], index: tuple[slice, ...]) -> tuple[np.ndarray, int]:
    """The region ``index`` (one step-1 slice per dimension) of a C-ordered
    array of ``shape`` as contiguous runs of its flat entries: ``(starts
    int64[r], length)``, in the region's C order. A region cut on dimension
    ``d`` only has one run per index of the dimensions before ``d``."""
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
    cut = [d for d, ((a, b), n) in enumerate(zip(bounds, shape)) if (a, b) != (0, n)]
    last = cut[-1] if cut else 0  # dimensions after `last` are whole
    strides = np.cumprod((1, *shape[::-1]))[::-1][1:].astype(np.int64)  # elements
    a, b = bounds[last] if shape else (0, 1)
    length = (b - a) * int(np.prod(shape[last + 1:], dtype=np.int64)) if shape else 1
    starts = np.zeros(1, np.int64) + (a * strides[last] if shape else 0)
    for d in range(last - 1, -1, -1):  # outer dimensions, innermost first
        lo, hi = bounds[d]
        starts = (np.arange(lo, hi, dtype=np.int64)[:, None] * strides[d] + starts).reshape(-1)
    return starts, int(length)


def flat_runs(arr, starts, length) -> np.ndarray:
    idx = np.asarray(starts, np.int64)[:, None] + np.arange(length)
    return np.asarray(arr).reshape(-1)[idx].astype(np.float32)


def _runs(base: dict, fts: Sequence[dict], requests) -> list[np.ndarray]:
    out = []
    for name, starts, length in requests:
        b = flat_runs(base[name], starts, length)
        out.append(np.stack([flat_runs(f[name], starts, length) - b for f in fts]))
    return out


def _all_host(names, base, fts) -> bool:
    return jax.default_backend() == "cpu" and all(
        host_resident(base[k]) and all(host_resident(f[k]) for f in fts) for k in names
    )


def host_inputs(source: Source, names: Sequence[str]):
    """``(base, fts)`` of ``names`` when the NumPy host path applies to them
    (CPU backend, host-resident arrays), else ``None``."""
    if not source.host_capable or jax.default_backend() != "cpu":
        return None
    base, fts = source.base(names), source.finetuned(names)
    return (base, fts) if _all_host(names, base, fts) else None


def tv_chunks(base: dict, fts: Sequence[dict], names: Sequence[str], columns: int):
    """Task vectors in column chunks, never materialized whole.

    Yields ``(name, chunk)`` with ``chunk: f32[n, c]`` (``c <= columns``) the
    next ``c`` flat entries of ``f32(theta_i) - f32(theta_0)`` for every task,
    bit for bit :func:`host_task_vectors`. ``chunk`` is a view of one buffer
    reused for every chunk (cache-sized): consume or copy it before the next.
    Not checked finite: callers detect NaN/Inf in their own statistics.
    """
    n = len(fts)
    buf = np.empty((n, columns), np.float32)
    for name in names:
        b = np.asarray(base[name]).reshape(-1)
        if b.dtype != np.float32:
            b = b.astype(np.float32)
        fs = [np.asarray(f[name]).reshape(-1) for f in fts]
        for j in range(0, b.size, columns):
            c = min(columns, b.size - j)
            t = buf[:, :c]
            bj = b[j:j + c]
            for i, f in enumerate(fs):
                fj = f[j:j + c]
                np.subtract(fj if fj.dtype == np.float32 else fj.astype(np.float32), bj, out=t[i])
            yield name, t


def host_task_vectors(names, base: dict, fts: Sequence[dict], task_names,
                      threshold=None, out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``{name: np.float32[n, ...]}`` computed by NumPy on the host, checked
    finite, trimmed in place if ``threshold`` (``f32[n]``) is given (see
    :meth:`Source.task_vectors`); written into the rows of ``out`` (``f32[n,
    P]``, the parameters end to end) if given."""
    tau, oks, col = {}, [], 0
    for name in names:
        dst = None
        if out is not None:
            shape = np.shape(base[name])
            size = int(np.prod(shape, dtype=np.int64))
            dst = out[:, col:col + size].reshape((len(fts),) + shape)
            col += size
        tau[name], ok = _host_task_vector(base[name], [f[name] for f in fts], threshold, dst)
        oks.append(ok)
    _check_finite(names, oks, task_names, base)
    return tau


def _check_finite(names, oks, task_names, base: dict) -> None:
    """Raises naming the first parameter (in ``names`` order) and task whose
    ``oks[k]: bool[n]`` row has a False (or the base model, where the NaN or
    Inf is its own: every task vector has it then)."""
    for name, ok in zip(names, oks):
        if not np.all(ok):
            if not np.isfinite(np.asarray(base[name], np.float32)).all():
                raise ValueError(f"the base model: parameter {name!r} has NaN or Inf entries")
            i = int(np.argmin(ok))
            raise ValueError(
                f"task {i} ({task_names[i]}): the task vector of parameter "
                f"{name!r} has NaN or Inf entries"
            )




def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` whose data starts on an ``align``-byte boundary.

    XLA's CPU client aliases such host arrays instead of copying them when
    they are passed to jitted functions (``jax.device_put``): for a block of
    task vectors the copy costs more than computing them. The array must
    then not be modified while a JAX array may alias it.

    Inside :func:`reuse_buffers`, large buffers come from its pool.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    pool = _pool
    if pool is not None and nbytes >= POOL_MIN_BYTES:
        return pool.take(nbytes, align).view(dtype).reshape(shape)
    raw = np.empty(nbytes + align, np.uint8)
    off = -raw.ctypes.data % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


#: Buffers from this size up are pooled inside :func:`reuse_buffers` (below,
#: malloc reuses freed memory itself).
POOL_MIN_BYTES = 1 << 20


def _refs(lst: list, i: int) -> int:
    return sys.getrefcount(lst[i])


# What _refs reports for an object only the list holds (calibrated once, so
# that no interpreter detail is assumed).
_IDLE_REFS = _refs([object()], 0)


class _BufferPool:
    """Large host buffers, reused once nothing references them; and XLA's
    own buffers, handed back after a donation (:meth:`hand_back`).

    Every first touch of fresh memory costs a page fault and the kernel's
    zeroing of the page: the task vectors of a streaming pass (a new
    ``[n, ...]`` array per leaf, freed a block later) would pay it at every
    block. A buffer is idle when the pool's list
    holds its only reference (NumPy views, and JAX arrays that alias it,
    keep a reference to it), so a buffer in use is never handed out twice.

    Memory bound: before a new buffer is allocated, idle ones (least
    recently taken first) are freed until the pool holds no more than
    :attr:`SLACK` times the most memory its buffers were ever in use at
    once (with no slack, blocks that alternate buffer sizes, as file reads
    do, evict each other's buffers). It may hold that much while less is
    in use, so the process's peak can still rise where other allocations
    peak at another moment (cuts, whose outputs pile up, do not pool for
    that reason).

    Device arrays that a program took by donation and returned (the
    greedy loop's group-vector slots) cannot come from NumPy memory: the
    caller hands them back under a key of its choosing (:meth:`hand_back`)
    and the next caller with that key takes them (:meth:`take_back`). They
    are held until the pool is dropped, outside the bound above (one set
    per key: per block structure of a plan).
    """

    #: How far above the most it ever had in use at once the pool may hold:
    #: more keeps more idle memory, less evicts buffers still needed.
    SLACK = 1.5

    def __init__(self):
        self._lock = threading.Lock()
        self._bufs: list[np.ndarray] = []  # uint8, least recently taken first
        self._high = 0  # most bytes in use at once so far
        self.taken = self.allocated = 0  # statistics (tests, benchmarks)
        self._handed: dict = {}

    def take(self, nbytes: int, align: int = 64) -> np.ndarray:
        """A ``uint8[nbytes]`` view, ``align``-byte aligned, of a buffer
        that nothing else references (reused if one of that size is idle)."""
        size = nbytes + align
        with self._lock:
            self.taken += 1
            bufs = self._bufs
            idle = [i for i in range(len(bufs)) if _refs(bufs, i) <= _IDLE_REFS]
            hit = next((i for i in idle if bufs[i].nbytes == size), None)
            if hit is not None:
                raw = bufs.pop(hit)
            else:
                held = sum(b.nbytes for b in bufs)
                self._high = max(self._high, held - sum(bufs[i].nbytes for i in idle) + size)
                drop = set()
                for i in idle:  # least recently taken first
                    if held + size <= self.SLACK * self._high:
                        break
                    drop.add(i)
                    held -= bufs[i].nbytes
                bufs[:] = [b for i, b in enumerate(bufs) if i not in drop]
                raw = np.empty(size, np.uint8)
                self.allocated += 1
            bufs.append(raw)  # most recently taken last
            off = -raw.ctypes.data % align
            return raw[off:off + nbytes]

    def hand_back(self, key, arrays) -> None:
        """Keeps ``arrays`` (donated to a program and returned by it) for
        the next :meth:`take_back` of ``key``."""
        with self._lock:
            self._handed[key] = arrays

    def take_back(self, key):
        """The arrays last handed back under ``key`` (then no longer
        kept), or ``None``."""
        with self._lock:
            return self._handed.pop(key, None)

    @property
    def held_bytes(self) -> int:
        """Bytes of every buffer the pool holds (busy or idle)."""
        with self._lock:
            return sum(b.nbytes for b in self._bufs)


_pool: _BufferPool | None = None
_pool_users = 0
_pool_lock = threading.Lock()


def buffer_pool() -> _BufferPool | None:
    """The pool of the open :func:`reuse_buffers` context, if any."""
    return _pool


@contextlib.contextmanager
def reuse_buffers():
    """While this context is open, :func:`aligned_empty` (in any thread)
    reuses large host buffers that nothing references any more (see
    :class:`_BufferPool`); the pool is dropped when the last (possibly
    nested, or concurrent) context exits.

    Yields the pool (its ``taken`` / ``allocated`` counts tell how much was
    reused).
    """
    global _pool, _pool_users
    with _pool_lock:
        if _pool is None:
            _pool = _BufferPool()
        _pool_users += 1
        pool = _pool
    try:
        yield pool
    finally:
        with _pool_lock:
            _pool_users -= 1
            if _pool_users == 0:
                _pool = None


# Entries per chunk of the fused subtract-and-trim (256 KB of float32): the
# chunk's scratch stays in cache between the subtraction and the trim.
_TRIM_COLUMNS = 1 << 16


def _host_task_vector(base, fts, threshold=None, out=None) -> tuple[np.ndarray, np.ndarray]:
    """NumPy twin of :func:`_task_vector` (same float32 arithmetic), in a
    64-byte aligned buffer (see :func:`aligned_empty`) or in ``out``
    (``f32[n, ...]``, each task's row contiguous); with ``threshold``, each
    task's row is trimmed as it is computed (:func:`_trim_into`)."""
    b = np.asarray(base)
    if b.dtype != np.float32:
        b = b.astype(np.float32)
    tv = aligned_empty((len(fts),) + b.shape, np.float32) if out is None else out
    ok = np.empty(len(fts), bool)
    for i, f in enumerate(fts):
        f = np.asarray(f)
        f = f if f.dtype == np.float32 else f.astype(np.float32)
        if threshold is None:
            np.subtract(f, b, out=tv[i])
            ok[i] = np.isfinite(tv[i]).all()
        else:
            ok[i] = _trim_into(tv[i].reshape(-1), f.reshape(-1), b.reshape(-1), threshold[i])
    return tv, ok


# |x| as the bits of a float32 with the sign cleared: monotone in |x| as an
# unsigned integer; keys from INF_BITS up are Inf or NaN.
ABS_BITS = np.uint32(0x7FFFFFFF)
INF_BITS = np.uint32(0x7F800000)


def _trim_into(out: np.ndarray, f: np.ndarray, b: np.ndarray, threshold) -> bool:
    """``out = where(|f - b| >= threshold, f - b, 0)`` (flat float32 arrays),
    chunk by chunk while each chunk is in cache; returns whether every
    ``f - b`` is finite.

    Works on the bits: ``|x|`` with the sign bit cleared is monotone in
    ``|x|`` as an unsigned integer, and a kept entry is ANDed with all ones,
    a dropped one with zero (``+0.0``, as :func:`~flexmerge_jax.tree.trim` writes).
    NaN entries compare above every threshold (kept, and reported).
    """
    thr = np.float32(threshold)
    # |x| >= thr as keys: every entry for thr <= 0, none for a NaN thr.
    key = np.uint32(0) if thr <= 0 else np.uint32(0xFFFFFFFF) if np.isnan(thr) \
        else thr.view(np.uint32)
    bits = out.view(np.uint32)
    tmp = np.empty(min(_TRIM_COLUMNS, out.size), np.uint32)
    top = np.uint32(0)
    for j in range(0, out.size, _TRIM_COLUMNS):
        o, t = out[j:j + _TRIM_COLUMNS], tmp[:min(_TRIM_COLUMNS, out.size - j)]
        np.subtract(f[j:j + _TRIM_COLUMNS], b[j:j + _TRIM_COLUMNS], out=o)
        np.bitwise_and(o.view(np.uint32), ABS_BITS, out=t)
        top = max(top, t.max())
        np.greater_equal(t, key, out=t, casting="unsafe")  # 1: kept, 0: dropped
        np.negative(t, out=t)  # all ones, or zero
        np.bitwise_and(bits[j:j + _TRIM_COLUMNS], t, out=bits[j:j + _TRIM_COLUMNS])
    return bool(top < INF_BITS)


@jax.jit
def _task_vector(base, fts, threshold=None):
    """Task vectors ``f32[n, ...]`` and, fused in the same pass, ``bool[n]``
    whether each task's entries are all finite; trimmed by ``threshold``
    (``f32[n]``, :func:`~flexmerge_jax.tree.trim`) if given."""
    b = base.astype(jnp.float32)
    tv = jnp.stack([f.astype(jnp.float32) for f in fts]) - b[None]
    ok = jnp.all(jnp.isfinite(tv), axis=tuple(range(1, tv.ndim)))
    return (tv if threshold is None else trim(tv, threshold)), ok


def default_task_names(n: int) -> tuple[str, ...]:
    return tuple(f"task{i}" for i in range(n))


class MemorySource(Source):
    """Params pytrees held in memory (numpy or jax arrays)."""

    def __init__(
        self,
        base: PyTree,
        finetuned: Sequence[PyTree],
        task_names: Sequence[str] | None = None,
        verify: str = "fast",
    ):
        self.layout = check_finetuned(base, finetuned)
        names, leaves, _ = flatten(base)
        self._base = dict(zip(names, leaves))
        self._ft = [dict(zip(names, flatten(f)[1])) for f in finetuned]
        self.task_names = check_names(task_names, len(finetuned))
        self._verify = verify
        self._fingerprints = None  # taken when first described

    def describe(self) -> dict:
        if self._fingerprints is None:
            self._fingerprints = {
                "base": tree_fingerprint(self._base, self._verify),
                "finetuned": [tree_fingerprint(f, self._verify) for f in self._ft],
            }
        return {"kind": "MemorySource", "fingerprints": self._fingerprints}

    def base(self, names):
        return {k: self._base[k] for k in names}

    def finetuned(self, names):
        return [{k: f[k] for k in names} for f in self._ft]


# Entries of each in-memory leaf hashed by a "fast" fingerprint: more catches
# more in-place edits of a leaf, for more hashing per saved plan.
_TREE_SAMPLES = 256


def tree_fingerprint(leaves: dict, verify: str = "fast") -> dict:
    """What a plan records of an in-memory model (``{name: array}``).

    ``"fast"``: a BLAKE2b hash of the names, shapes, dtypes and 256 evenly
    spaced entries of each leaf (gathered where the array lives: no copy of
    a device array to the host); ``"full"``: of every entry instead. Arrays
    spanning several processes contribute their names, shapes and dtypes
    only (their values are not all on this host).

    Returns:
      ``{"sample": "blake2b:<hex>"}`` or ``{"full": "blake2b:<hex>"}``.
    """
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(leaves):
        x = leaves[name]
        h.update(f"{name}\0{tuple(x.shape)}\0{np.dtype(x.dtype).name}\0".encode())
        size = int(np.prod(x.shape, dtype=np.int64))
        if not getattr(x, "is_fully_addressable", True):
            continue
        if verify == "full" or size <= _TREE_SAMPLES:
            part = x
        else:
            idx = np.linspace(0, size - 1, _TREE_SAMPLES).astype(np.int64)
            part = (np.asarray(x).reshape(-1)[idx] if host_resident(x)
                    else jax.device_get(jnp.ravel(x)[idx]))
        h.update(np.ascontiguousarray(np.asarray(part)).tobytes())
    return {"full" if verify == "full" else "sample": "blake2b:" + h.hexdigest()}


def check_names(task_names, n: int) -> tuple[str, ...]:
    if task_names is None:
        return default_task_names(n)
    names = tuple(str(t) for t in task_names)
    if len(names) != n:
        raise ValueError(f"{len(names)} task names for {n} fine-tuned models")
    if len(set(names)) != n:
        raise ValueError(f"task names must be distinct, got {list(names)}")
    return names


def read_chunks(names: Sequence[str], sizes: Sequence[int], budget: int = 1 << 24):
    """Groups consecutive parameters into reads of about ``budget`` entries
    (per task; the default, 64 MB of float32, bounds what a whole-model pass
    holds while keeping the number of reads small)."""
    cur, total = [], 0
    for name, size in zip(names, sizes):
        cur.append(name)
        total += size
        if total >= budget:
            yield cur
            cur, total = [], 0
    if cur:
        yield cur
