"""Global preprocessing: exact radix select, TIES trim, PCB thresholds, DARE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmerge_jax.methods.dare import dare_drop
from flexmerge_jax.methods.pcb import pcb_clip_bounds
from flexmerge_jax.stats import order

import reference as ref


def leaves(seed, n=3):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 40, 7)).astype(np.float32)
    a[:, :3] = 0.0  # exact zeros
    a[:, 5] = a[:, 6]  # exact duplicates
    b = (1e-3 * rng.standard_normal((n, 13))).astype(np.float32)
    return [jnp.asarray(a), jnp.asarray(b)], np.concatenate([a.reshape(n, -1), b], 1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_kth_smallest_is_exact(seed, signed):
    ls, flat = leaves(seed)
    tf = None if signed else jnp.abs
    vals = flat if signed else np.abs(flat)
    d = flat.shape[1]
    srt = np.sort(vals, axis=1)
    for k in [1, 2, 3, 4, 50, d // 2, d - 1, d]:
        got = order.kth_smallest(ls, [k] * 3, signed=signed, transform=tf)
        np.testing.assert_array_equal(got, srt[:, k - 1])
    got = order.kth_smallest(ls, [1, d // 3, d], signed=signed, transform=tf)
    np.testing.assert_array_equal(got, [srt[0, 0], srt[1, d // 3 - 1], srt[2, d - 1]])


def test_kth_smallest_streams_from_a_callable():
    ls, flat = leaves(2)
    calls = []

    def again():
        calls.append(1)
        return iter(ls)

    got = order.kth_smallest(again, [10, 10, 10])
    np.testing.assert_array_equal(got, np.sort(flat, 1)[:, 9])
    assert len(calls) == 2  # exactly two passes over the data


def test_kth_smallest_rejects_bad_rank():
    ls, flat = leaves(0)
    with pytest.raises(ValueError, match="outside"):
        order.kth_smallest(ls, [0, 1, 1])
    with pytest.raises(ValueError, match="outside"):
        order.kth_smallest(ls, [flat.shape[1] + 1] * 3)


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.5, 0.999])
def test_ties_trim_matches_reference(keep):
    rng = np.random.default_rng(3)
    tvs = [
        {"a": rng.standard_normal((9, 4)).astype(np.float32),
         "b": (0.1 * rng.standard_normal(17)).astype(np.float32)}
        for _ in range(4)
    ]
    tvs[1]["a"][:2] = 0.5  # ties at the threshold are kept
    exp = ref.ties_trim(tvs, keep)
    stacked = [jnp.asarray(np.stack([t[k] for t in tvs])) for k in ("a", "b")]
    thr = order.ties_trim_thresholds(stacked, keep, 9 * 4 + 17)
    for j, k in enumerate(("a", "b")):
        got = np.asarray(order.trim(stacked[j], jnp.asarray(thr)))
        np.testing.assert_array_equal(got, np.stack([e[k] for e in exp]).astype(np.float32))
    d = 53
    kept = sum(int((np.asarray(order.trim(s, jnp.asarray(thr))) != 0).sum()) for s in stacked)
    assert kept >= 4 * (int(d * keep) + 1) - 4 * 0  # ties only add entries


def test_ties_keep_count_matches_reference_arithmetic():
    assert order.ties_keep_count(7840, 0.2) == 7840 - int(7840 * 0.2)
    assert order.ties_keep_count(10, 1.0) == 1


def test_pcb_clip_bounds_indices():
    ls, flat = leaves(4)
    d = flat.shape[1]
    lo, hi = pcb_clip_bounds(ls, d)
    srt = np.sort(np.abs(flat), 1)
    np.testing.assert_array_equal(lo, srt[:, int(d * 0.0001)])
    np.testing.assert_array_equal(hi, srt[:, int(d * (1 - 0.0001) - 1)])


def test_dare_statistics_and_determinism():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 20000)).astype(np.float32))
    key = jax.random.key(43)
    y = np.asarray(dare_drop(x, key, 0.9, leaf_index=0))
    kept = y != 0
    assert abs(kept.mean() - 0.1) < 0.01  # binomial sd ~ 0.0017
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / np.float32(0.1), rtol=1e-6)
    np.testing.assert_array_equal(y, np.asarray(dare_drop(x, key, 0.9, leaf_index=0)))
    # Different tasks and parameters draw different masks.
    assert (kept[0] != kept[1]).mean() > 0.1
    z = np.asarray(dare_drop(x, key, 0.9, leaf_index=1))
    assert ((z != 0) != kept).mean() > 0.1
    np.testing.assert_array_equal(np.asarray(dare_drop(x, key, 0.0, 0)), np.asarray(x))


def test_dare_is_unbiased():
    x = jnp.full((1, 1000), 2.0, jnp.float32)
    means = [float(dare_drop(x, jax.random.key(s), 0.5, 0).mean()) for s in range(40)]
    assert abs(np.mean(means) - 2.0) < 0.05  # sd of the mean ~ 2/sqrt(40000)


def test_fused_trimmed_grams_equal_the_three_pass_path():
    """TIES Gram matrices with the radix select's second pass fused into the
    Gram pass = thresholds from two full passes, then Grams of trimmed x."""
    import flexmerge_jax as fm
    from flexmerge_jax._prepared import Prepared
    from flexmerge_jax.sources import MemorySource
    from flexmerge_jax.stats.gram import block_gram
    from flexmerge_jax.stats.passes import grams

    from conftest import random_case

    base, fts = random_case(7, n=5)
    fts[2]["emb"] = base["emb"] + np.float32(0.5)  # exact ties at the threshold
    src = MemorySource(base, fts)
    method = fm.methods.ties(keep=0.3)
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        part = fm.blocks.resolve(["l1.", "l0."], src.layout.names, src.layout.sizes)
    fused_prep = Prepared(src, part, method)
    fused = grams(fused_prep)  # fused path: also sets the thresholds
    ref_prep = Prepared(src, part, method)
    thr = order.ties_trim_thresholds(
        [src.task_vectors([k])[k] for k in src.layout.names], 0.3, src.layout.total)
    np.testing.assert_array_equal(fused_prep.trim_threshold, thr)  # exact select
    np.testing.assert_array_equal(ref_prep.trim_threshold, thr)  # two-pass select
    direct = np.stack([block_gram(ref_prep.x(b)) for b in range(len(part))])
    np.testing.assert_allclose(fused, direct, rtol=1e-12, atol=1e-18)


def test_host_magnitude_histograms_equal_the_xla_ones():
    """The NumPy histograms of |x| (CPU fast path) = the jitted ones, both passes,
    with signed zeros, subnormals, extremes and values on both sides of a bin."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 500)) * 10.0 ** rng.integers(-30, 30, (3, 500))).astype(np.float32)
    x[:, :4] = [0.0, -0.0, np.float32(1e-45), -np.finfo(np.float32).max]
    x[:, 4:8] = [1.0, -1.0, np.nextafter(np.float32(1), np.float32(2)), -1.5]
    first = order._host_magnitude_hist(x, None)
    np.testing.assert_array_equal(first, order._hist(jnp.abs(jnp.asarray(x)), None, False))
    prefix = np.array([0, 0x3F80, int(np.argmax(first[2]))], np.int32)  # zeros, 1.0's bin, fullest
    second = order._host_magnitude_hist(x, prefix)
    np.testing.assert_array_equal(
        second, order._hist(jnp.abs(jnp.asarray(x)), jnp.asarray(prefix), False))
    assert second[1].sum() >= 3 and second[0].sum() >= 3  # the chosen bins are populated
