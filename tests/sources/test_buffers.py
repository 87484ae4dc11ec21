"""The host buffer pool of merged-vector plans (``_source.reuse_buffers``)."""

import contextlib
import gc
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import _plan
from flexmerge_jax.sources import _source
from flexmerge_jax.sources._source import aligned_empty, reuse_buffers

MB = 1 << 20


def _mb(k: float) -> np.ndarray:
    """An ``aligned_empty`` float32 array of ``k`` MiB."""
    return aligned_empty((int(k * MB) // 4,), np.float32)


def test_pool_reuses_a_buffer_only_once_nothing_references_it():
    with reuse_buffers() as pool:
        a = _mb(1)
        addr = a.ctypes.data
        del a
        b = _mb(1)  # a's buffer, idle
        assert b.ctypes.data == addr and b.ctypes.data % 64 == 0
        assert (pool.taken, pool.allocated) == (2, 1)

        c = _mb(1)  # b is held: a new buffer
        assert c.ctypes.data != b.ctypes.data and pool.allocated == 2
        view, c_addr = c[3:7], c.ctypes.data
        del c
        d = _mb(1)  # a view keeps c's buffer in use
        assert d.ctypes.data not in (b.ctypes.data, c_addr) and pool.allocated == 3

        d[:] = 7.0
        j = jax.device_put(d)  # XLA's CPU client aliases the aligned buffer
        assert j.unsafe_buffer_pointer() == d.ctypes.data
        d_addr = d.ctypes.data
        del d, view
        e = _mb(1)  # c's buffer (idle now), never d's while j aliases it
        assert e.ctypes.data == c_addr
        f = _mb(1)
        assert f.ctypes.data != d_addr
        e[:] = 1.0
        f[:] = 2.0
        np.testing.assert_array_equal(np.asarray(j), 7.0)  # untouched
        del j
        gc.collect()  # reading j as NumPy left a reference cycle in JAX
        g = _mb(1)  # d's buffer once the JAX array is gone
        assert g.ctypes.data == d_addr


def test_pool_holds_at_most_slack_times_what_was_in_use_at_once():
    """Random takes and releases of a few sizes: the pool's memory never
    exceeds SLACK times the most the live arrays ever needed at once, and
    it reuses."""
    rng = np.random.default_rng(0)
    live, peak = [], 0
    with reuse_buffers() as pool:
        for _ in range(300):
            if live and rng.random() < 0.5:
                live.pop(int(rng.integers(len(live))))
            else:
                live.append(_mb(float(rng.choice([1, 1.5, 2, 4]))))
            peak = max(peak, sum(a.nbytes + 64 for a in live))
            assert pool.held_bytes <= pool.SLACK * peak
        assert pool.allocated < 0.5 * pool.taken


def test_pool_is_scoped_to_the_outermost_context():
    assert _source._pool is None
    with reuse_buffers() as outer:
        with reuse_buffers() as inner:
            assert inner is outer
        assert _source._pool is outer  # still in the outer context
        a = _mb(1)
        assert outer.taken == 1
    assert _source._pool is None
    b = _mb(1)  # plain allocation again
    assert outer.taken == 1 and b.ctypes.data % 64 == 0
    del a


def test_small_arrays_are_not_pooled(monkeypatch):
    with reuse_buffers() as pool:
        aligned_empty((100,), np.float32)
        assert pool.taken == 0
        monkeypatch.setattr(_source, "POOL_MIN_BYTES", 1)
        aligned_empty((100,), np.float32)
        assert pool.taken == 1


def test_pool_never_hands_a_buffer_to_two_threads():
    errors = []

    def work(k):
        for _ in range(40):
            a = _mb(1)
            a[:] = k
            b = _mb(1)
            b[:] = -k
            if not (np.all(a == k) and np.all(b == -k)):
                errors.append(k)

    with reuse_buffers() as pool:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert pool.allocated < pool.taken / 4


@pytest.mark.parametrize("from_files", [False, True], ids=["memory", "files"])
def test_plan_reuses_host_buffers_and_is_unchanged(tmp_path, monkeypatch, from_files):
    """A merged-vector TIES plan (task vectors trimmed as read, one
    ``[n, ...]`` array per leaf) reuses its buffers, and gives the plan it
    gives without the pool."""
    from safetensors.numpy import save_file

    monkeypatch.setattr(_source, "POOL_MIN_BYTES", 1)
    rng = np.random.default_rng(0)
    shapes = {f"l{i}.{k}": s for i in range(4) for k, s in
              (("attn.w", (16, 12)), ("mlp.w", (12, 20)), ("mlp.b", (20,)))}
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    fts = [{k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in base.items()} for _ in range(5)]
    if from_files:
        save_file(base, str(tmp_path / "base.safetensors"))
        for i, f in enumerate(fts):
            save_file(f, str(tmp_path / f"t{i}.safetensors"))
        base = str(tmp_path / "base.safetensors")
        fts = [str(tmp_path / f"t{i}.safetensors") for i in range(5)]
    kw = dict(blocks=[f"l{i}.{k}" for i in range(4) for k in ("attn", "mlp")],
              method=fm.methods.get("ties", keep=0.3), linkage=None, similarity="cosine")
    pools = []

    @contextlib.contextmanager
    def recording():
        with reuse_buffers() as pool:
            pools.append(pool)
            yield pool

    monkeypatch.setattr(_plan, "reuse_buffers", recording)
    pooled = fm.plan(base, fts, **kw)
    (pool,) = pools
    assert pool.taken > 0 and pool.allocated < pool.taken

    monkeypatch.setattr(_plan, "reuse_buffers", contextlib.nullcontext)
    plain = fm.plan(base, fts, **kw)
    for s, t in zip(pooled.sequences, plain.sequences):
        for u, v in zip(s, t):
            np.testing.assert_array_equal(u, v)


def test_pool_waits_for_xla_to_finish_reading_a_buffer():
    """A buffer passed to a computation that is still running (dispatch is
    asynchronous) is not handed out again, even once Python dropped it."""
    slow = jax.jit(lambda m: jax.lax.fori_loop(0, 150, lambda i, c: jnp.tanh(c @ m), m))
    src = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32) / 30
    want = np.asarray(slow(src.copy()))
    with reuse_buffers():
        a = aligned_empty((512, 512), np.float32)
        a[:] = src
        out = slow(a)  # reads a (aliased) while we go on
        addr = a.ctypes.data
        assert not out.is_ready()  # ~0.4 s of work, dispatched asynchronously
        del a
        b = aligned_empty((512, 512), np.float32)
        b[:] = np.nan  # would poison the running computation if it were a's buffer
        assert b.ctypes.data != addr
        np.testing.assert_array_equal(np.asarray(out), want)
