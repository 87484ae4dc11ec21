"""The host thread pool's read-ahead (:mod:`flexmerge_jax.sources.threads`):
results in order, the budget of work held ahead, errors when due, early
stops, and the Prepared passes that use it reading in host threads."""

import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax._prepared import Prepared
from flexmerge_jax.sources import _source, files
from flexmerge_jax.sources import threads as host_threads
from flexmerge_jax.sources._source import MemorySource

from conftest import random_case

BLOCKS = ["l1.", "l0."]


def _files(tmp_path):
    """A case of 3 tasks saved as safetensors files: ``(base, fts, paths, source)``."""
    base, fts = random_case(7, n=3)
    files.save_params(tmp_path / "base.safetensors", base)
    paths = [files.save_params(tmp_path / f"t{i}.safetensors", f) for i, f in enumerate(fts)]
    return base, fts, paths, files.path_source(tmp_path / "base.safetensors", paths)


def _prepared_ta(src):
    """``(partition, Prepared)`` of ``src`` in :data:`BLOCKS`, task arithmetic."""
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        part = fm.blocks.resolve(BLOCKS, src.layout.names, src.layout.sizes)
    return part, Prepared(src, part, fm.methods.task_arithmetic(0.5))


def test_read_ahead_holds_at_most_one_largest_result_ahead():
    """``read_ahead`` yields every result in order and computes later ones
    in host threads while the sizes of those held ahead fit the largest size
    (one at least); stopping early cancels the rest; an error is raised when
    its result is due."""
    import threading
    import time

    sizes = [1, 10, 1, 1, 4, 4, 10, 1]
    started, threads = [], {}

    def fn(i):
        started.append(i)
        threads[i] = threading.current_thread().name
        return i * i

    got = []
    for i, r in enumerate(host_threads.read_ahead(fn, sizes)):
        got.append(r)
        time.sleep(0.05)  # the workers start what was submitted
        ahead = sorted(j for j in list(started) if j > i)
        assert ahead == list(range(i + 1, i + 1 + len(ahead)))  # the next ones, in order
        assert len(ahead) <= 1 or sum(sizes[j] for j in ahead) <= max(sizes)
        if i + 1 < len(sizes):
            assert ahead  # the next one at least
    assert got == [i * i for i in range(len(sizes))]
    assert sorted(started) == list(range(len(sizes)))
    assert all(threads[i].startswith("flexmerge-host") for i in range(len(sizes)))
    # [1, 1, 1, 1] ahead of a size-1 item fit a budget of 10 all at once
    started.clear()
    it = host_threads.read_ahead(fn, [1, 1, 1, 1, 10])
    assert next(it) == 0
    time.sleep(0.05)
    assert sorted(started) == [0, 1, 2, 3]  # not 4: 1 + 1 + 1 + 10 > 10
    it.close()  # stopping early: nothing left running, nothing more started
    assert sorted(started) == [0, 1, 2, 3]
    assert list(host_threads.read_ahead(fn, [])) == []

    def failing(i):
        if i == 2:
            raise RuntimeError("block 2")
        return i

    it = host_threads.read_ahead(failing, [1, 1, 1])
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(RuntimeError, match="block 2"):
        next(it)


def test_host_map_reads_and_computes_in_workers_in_order(tmp_path):
    """Worker threads read each list of parameters from the files and
    compute on it: results come in order, ``task(i)`` sees the consumer's
    state as of submission (``ahead`` lists submitted, HOST_QUEUE by
    default, at least HOST_THREADS; at most HOST_THREADS of them read and
    computed on at once), a read error surfaces in the consumer when its
    result is due, naming the parameter, and a consumer that stops early
    leaves no work running."""
    import threading
    import time

    base, fts, paths, src = _files(tmp_path)
    names = [["l0.mlp.w"], ["l1.mlp.w"], ["emb"], ["l0.attn.w"]]
    consumed, seen, threads = [], [], set()

    def task(i):
        seen.append((i, len(consumed)))

        def work(inputs):
            threads.add(threading.current_thread().name)
            b, fs = inputs
            assert list(b) == names[i] and all(list(f) == names[i] for f in fs)
            return i, fs[1][names[i][0]].copy()

        return work

    for ahead, w in [(None, host_threads.HOST_QUEUE), (1, host_threads.HOST_THREADS)]:
        consumed.clear(), seen.clear()
        for i, (j, got) in enumerate(host_threads.host_map(src, names, task, ahead=ahead)):
            assert j == i
            np.testing.assert_array_equal(got, fts[1][names[i][0]])
            consumed.append(i)
        assert seen == [(i, max(0, i - w)) for i in range(len(names))]
    assert threads and all(t.startswith("flexmerge-host") for t in threads)
    probe = [_source.host_inputs(src, names[0])]  # a caller's probe is handed over
    assert [r[0] for r in host_threads.host_map(src, names, task, probe)] == [0, 1, 2, 3]
    assert probe == []

    events, lock = [], threading.Lock()  # +1 when a work starts, -1 when it ends

    def counted(i):
        def work(inputs):
            with lock:
                events.append(1)
            time.sleep(0.05)
            with lock:
                events.append(-1)
            return i
        return work

    assert list(host_threads.host_map(src, names * 3, counted)) == list(range(len(names) * 3))
    running = np.cumsum(events)  # the memory bound: HOST_THREADS lists at once
    assert running.max() == host_threads.HOST_THREADS and running[-1] == 0
    reader = src._ft[2]
    last = max(reader._offsets, key=reader._offsets.get)
    with open(paths[2], "r+b") as f:
        f.truncate(reader._offsets[last] + 4)
    first = [n for n in reader.names if n != last][:1]
    results = host_threads.host_map(src, [first, [last]], lambda i: lambda inputs: i)
    assert next(results) == 0
    with pytest.raises(ValueError, match=f"truncated data for parameter '{last}'"):
        next(results)

    events.clear()
    results = host_threads.host_map(src, names * 3, counted)
    assert next(results) == 0
    results.close()  # cancels what has not started, waits for what has
    assert sum(events) == 0 and 0 < len(events) < 2 * len(names) * 3
    assert host_threads.host_pool()._work_queue.empty()


def test_blocks_read_ahead_in_order(tmp_path):
    import threading

    base, fts, _, src = _files(tmp_path)
    part, p = _prepared_ta(src)
    mem = MemorySource(base, fts)
    reads = []
    real = src.task_vectors

    def recorded(names, threshold=None):
        reads.append(threading.current_thread().name)
        return real(names, threshold)

    src.task_vectors = recorded
    got = list(p.taus())
    assert len(reads) == len(part) and all(t.startswith("flexmerge-host") for t in reads)
    for b, tau in enumerate(got):
        want = mem.task_vectors(part.blocks[b].leaves)
        assert list(tau) == list(want)
        for k in tau:
            np.testing.assert_array_equal(tau[k], want[k])
    taus = p.taus()
    next(taus)
    taus.close()  # a consumer that stops early: the read-ahead is cancelled or waited for
    assert host_threads.host_pool()._work_queue.empty()


def test_a_cut_releases_each_blocks_inputs_before_handing_its_model_over(tmp_path, monkeypatch):
    """While the consumer (a writer) works on block b's model, nothing of the
    read-ahead or the cut still refers to block b's task vectors: a
    streaming cut holds its outputs and what is read ahead, not also the
    inputs of the block being written."""
    import gc
    import weakref

    from flexmerge_jax import _prepared

    base, fts, _, src = _files(tmp_path)
    part, p = _prepared_ta(src)
    refs, real = [], _prepared._block_model

    def spy(prepared, b, groups, inputs, scales):
        refs.append([weakref.ref(v) for v in inputs[2].values()])  # the task vectors
        return real(prepared, b, groups, inputs, scales)

    monkeypatch.setattr(_prepared, "_block_model", spy)
    groups = [[(0, 1), (2,)] for _ in part.blocks]  # a merged group and a task kept as it is
    models = []
    for b, blk in enumerate(_prepared.materialize_blocks(p, groups)):
        gc.collect()
        assert refs[b] and all(r() is None for r in refs[b]), b
        models.append(blk)
    want = MemorySource(base, fts)
    for blk, pb in zip(models, part.blocks):
        tau = want.task_vectors(pb.leaves)
        for k in pb.leaves:  # and the models are right (lambda times the mean)
            np.testing.assert_allclose(blk.sets[0][k], base[k] + 0.5 * (tau[k][0] + tau[k][1]) / 2,
                                       rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(blk.sets[1][k], fts[2][k])
