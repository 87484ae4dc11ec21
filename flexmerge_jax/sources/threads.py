"""Host I/O threads: the one thread pool that reads parameters beside the caller.

Threads here only read files and compute on host (NumPy) arrays; device
programs stay on the main thread, so every process of a multi-host run
issues its collectives in the same order.

* :func:`read_ahead` — results of ``fn(i)`` in order, later ones computed in
  host threads while the consumer works (merged-vector plans).
* :func:`host_map` — per-list work on host inputs in :data:`HOST_THREADS`
  workers (the statistics passes of :mod:`flexmerge_jax.stats.passes`).
* :func:`host_pool` — the pool itself (also used by the one-block read-ahead
  of :meth:`~flexmerge_jax._prepared.Prepared.in_order`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from collections.abc import Sequence

from ._source import Source, host_inputs

# Threads of the host statistics passes (:func:`host_map`): each holds one
# group of parameters of all tasks, so the streaming memory bound grows with
# them; trades that memory for cores (at most two, fewer where fewer cores).
HOST_THREADS = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1))

# Lists :func:`host_map` submits ahead of its consumer when their results
# are small. Blocks come in sizes as uneven as an MLP and a LayerNorm: with
# only HOST_THREADS submitted, a worker done with a small block would idle
# until the large one beside it was consumed. Trades a little memory for
# results (queued lists hold no inputs: each is read when a worker starts it)
# against idle cores.
HOST_QUEUE = 4 * HOST_THREADS


@functools.cache
def host_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that read (and, in :func:`host_map`, compute on) blocks
    beside the caller: the statistics passes' workers and the read-ahead of
    :meth:`~flexmerge_jax._prepared.Prepared.in_order`."""
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
                pending.append((nxt, host_pool().submit(fn, nxt)))
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


def host_map(source: Source, name_lists, task, first=None, ahead: int | None = None):
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
    pool = host_pool()

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
