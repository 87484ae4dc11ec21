"""Host I/O threads: the one thread pool that reads parameters beside the caller.

Threads here only read files and compute on host (NumPy) arrays; device
programs stay on the main thread, so every process of a multi-host run
issues its collectives in the same order.

* :func:`ordered` — the read-ahead: results of jobs in order, later ones
  computed in the pool while the consumer works, within a budget.
* :func:`read_ahead` — ``ordered`` over ``fn(i)`` with at most one largest
  block held ahead (merged-vector plans, cuts, Gram passes on device).
* :func:`host_map` — ``ordered`` over per-list work on host inputs, a few
  lists ahead (the statistics passes of :mod:`flexmerge_jax.stats.passes`).
* :func:`host_pool` — the pool itself (:data:`HOST_THREADS` workers).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

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
    """The threads that read (and compute on) blocks beside the caller
    (:func:`ordered`)."""
    return concurrent.futures.ThreadPoolExecutor(HOST_THREADS, "flexmerge-host")


def ordered(jobs: Iterable[Callable[[], Any]], costs: Sequence[float], budget: float,
            threads: bool = True) -> Iterator[Any]:
    """Yields the results of ``jobs`` (thunks) in order, running later ones
    in the host pool while the consumer works on earlier ones: the one
    read-ahead of the package (:func:`read_ahead` and :func:`host_map` are
    this with their budgets).

    Jobs are submitted in order while the ``costs`` of those submitted and
    not yet handed to the consumer sum to at most ``budget`` (one at least;
    the result the consumer holds is not counted); a job is
    taken from ``jobs`` only when it is submitted, in the consumer's thread,
    so it may capture state the consumer has updated by then. With
    ``threads=False`` each job runs in the consumer's thread when due (for
    jobs that issue device programs with collectives across processes,
    which stay on the main thread). A consumer that stops early cancels
    what has not started and waits for the rest; a job's error is raised
    when its result is due.
    """
    jobs = iter(jobs)
    if not threads:
        for job in jobs:
            yield job()
        return
    pending: collections.deque = collections.deque()  # (cost, future), in order
    held, nxt = 0.0, 0

    def top_up():
        nonlocal held, nxt
        while nxt < len(costs) and (not pending or held + costs[nxt] <= budget):
            job = next(jobs, None)
            if job is None:
                return
            pending.append((costs[nxt], host_pool().submit(job)))
            held += costs[nxt]
            nxt += 1

    try:
        top_up()
        while pending:
            cost, future = pending.popleft()
            future.result()  # waits (and raises the job's error)
            held -= cost
            top_up()  # before the consumer takes it: the workers stay busy meanwhile
            handed = [future]
            del future
            # Nothing here refers to the result while the consumer works on it.
            yield handed.pop().result()
    finally:
        for _, f in pending:
            f.cancel()
        concurrent.futures.wait([f for _, f in pending])


def read_ahead(fn: Callable[[int], Any], sizes: Sequence[int], threads: bool = True):
    """Yields ``fn(0), ..., fn(len(sizes) - 1)`` in order (:func:`ordered`),
    computing later ones in host threads while their ``sizes`` sum to at
    most the largest size (one result ahead at least): a run of small
    blocks does not leave the next large one to be computed while the
    consumer waits, and what is held ahead stays within one largest block.
    """
    return ordered((functools.partial(fn, i) for i in range(len(sizes))), sizes,
                   max(sizes, default=0), threads)


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

    handed = [first]  # to the first job: the caller keeps no reference to it
    del first

    def jobs():
        for i, names in enumerate(name_lists):
            fn = task(i)  # at submission, in the consumer's thread
            yield functools.partial(fn, handed.pop()) if i == 0 else \
                functools.partial(_run, fn, source, names)

    depth = max(HOST_QUEUE if ahead is None else ahead, HOST_THREADS)
    return ordered(jobs(), [1] * len(name_lists), depth)


def _run(fn, source: Source, names):
    return fn(host_inputs(source, names))
