"""Cluster-merge and channel-merge baselines on the FlexMerge size axis."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import baselines
from flexmerge_jax.methods.ties import ties_merge

from conftest import random_case


def brute_force(dist, linkage, k):
    """Partition into k clusters, recomputing linkage distances from scratch."""
    clusters = [[i] for i in range(len(dist))]
    agg = {"single": np.min, "complete": np.max, "average": np.mean}[linkage]
    while len(clusters) > k:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = agg(dist[np.ix_(clusters[a], clusters[b])])
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return sorted(clusters)


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_agglomerative_matches_brute_force_and_sklearn(linkage):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 5))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    merges = baselines.agglomerative(dist, linkage)
    for k in range(1, 10):
        got = sorted(sorted(c) for c in baselines._clusters(merges, 9, k))
        assert got == brute_force(dist, linkage, k)
        if importlib.util.find_spec("sklearn") is not None:
            from sklearn.cluster import AgglomerativeClustering

            if k < 9:
                lab = AgglomerativeClustering(metric="precomputed", linkage=linkage,
                                              n_clusters=k).fit_predict(dist)
                sk = sorted(sorted(np.flatnonzero(lab == c).tolist()) for c in set(lab))
                assert got == sk


def test_cluster_merge_models():
    base, fts = random_case(1, n=5)
    bp = fm.baselines.cluster_merge(base, fts, fm.methods.task_arithmetic(1.5))
    np.testing.assert_array_equal(bp.sizes, [5, 4, 3, 2, 1])
    for step in range(5):
        model = bp.at_step(step)
        groups = model.groups("model")
        assert len(groups) == 5 - step and model.n_models == 5 - step
        for g in groups:
            for i in g:
                got = model.params_for_task(i)
                for k in base:
                    if len(g) == 1:
                        exp = fts[i][k]
                    else:  # closed form: base + lambda * mean of the cluster's task vectors
                        exp = base[k] + 1.5 * np.mean([fts[j][k] - base[k] for j in g], axis=0)
                    np.testing.assert_allclose(np.asarray(got[k]), exp, rtol=1e-5, atol=1e-6)
    # Whole-model TIES: the zero-sign fallback spans the whole model (one block).
    tp = fm.baselines.cluster_merge(base, fts, fm.methods.ties(1.0), linkage="single",
                                    layerwise=True)
    m1 = tp.at_size(1)
    x = {k: jnp.asarray(np.stack([f[k] for f in fts]) - base[k][None]) for k in base}
    exp = ties_merge(x)
    for k in base:
        np.testing.assert_allclose(np.asarray(m1.params_for_task(0)[k]),
                                   base[k] + np.asarray(exp[k]), rtol=1e-6, atol=1e-7)


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    rng = np.random.default_rng(2)
    dirs = rng.standard_normal((3, 50))
    x = np.stack([dirs[i % 3] + 0.05 * rng.standard_normal(50) for i in range(9)])
    g = x @ x.T
    labels = baselines._kmeans_cosine(g, 3, np.random.default_rng(0))
    groups = sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in set(labels))
    assert groups == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    again = baselines._kmeans_cosine(g, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(labels, again)


def test_channel_merge_ends_and_sweep():
    base, fts = random_case(3, n=4)
    bp = fm.baselines.channel_merge(base, fts, "avg", seed=1)
    top = bp.at_size(4)
    for i in range(4):
        for k, v in top.params_for_task(i).items():
            np.testing.assert_array_equal(np.asarray(v), fts[i][k])
    one = bp.at_size(1)
    merged = fm.merge(base, fts, "avg")
    for k in base:
        np.testing.assert_allclose(np.asarray(one.params_for_task(2)[k]), np.asarray(merged[k]),
                                   rtol=1e-6)
    score = lambda params, i: -float(sum(np.sum((np.asarray(params[k]) - fts[i][k]) ** 2)
                                         for k in base))
    res = fm.sweep([bp, fm.plan(base, fts, method="avg")], score, sizes=[1, 2, 4], progress=False)
    assert set(res.methods) == {"channel-merge:avg", "avg"}
    with pytest.raises(ValueError, match="mask methods"):
        fm.baselines.cluster_merge(base, fts, "emr")
    with pytest.raises(ValueError, match="DARE"):
        fm.baselines.channel_merge(base, fts, fm.methods.dare(fm.methods.average()))


def test_layerwise_distance_with_a_frozen_tensor():
    """A tensor one task leaves unchanged (zero per-tensor vector) counts as cosine 0
    (the reference's eps) instead of making the whole distance undefined."""
    rng = np.random.default_rng(4)
    base = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
    fts = [{"w": base["w"] + rng.standard_normal((4, 3)).astype(np.float32),
            "b": base["b"] + (0 if i == 1 else rng.standard_normal(3).astype(np.float32))}
           for i in range(4)]
    bp = fm.baselines.cluster_merge(base, fts, "ta", linkage="average", layerwise=True)
    cos = 0.0
    for k in base:  # float64 NumPy transcription of 1 - mean per-tensor cosine
        x = np.stack([f[k].astype(np.float64) - base[k] for f in fts]).reshape(4, -1)
        nrm = np.linalg.norm(x, axis=1)
        cos = cos + (x @ x.T) / (nrm[:, None] * nrm[None, :] + 1e-8)
    dist = 1.0 - cos / 2
    np.fill_diagonal(dist, 0.0)
    merges = fm.baselines.agglomerative(dist, "average")
    for k in (3, 2):
        expect = sorted(sorted(g) for g in fm.baselines._clusters(merges, 4, k))
        assert sorted(sorted(g) for g in bp.at_size(k).groups("model")) == expect
