"""The methods beyond the reference, wired into Method / merge / plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax.methods.breadcrumbs import breadcrumbs_merge
from flexmerge_jax.methods.iso import iso_c_merge, iso_cts_merge
from flexmerge_jax.methods.magmax import magmax_merge
from flexmerge_jax.methods.model_stock import model_stock_merge
from flexmerge_jax.methods.slerp import slerp_merge
from flexmerge_jax.methods.task_arithmetic import task_arithmetic_sum
from flexmerge_jax.methods.ties import ties_disjoint_merge
from flexmerge_jax.methods.tsv import tsv_merge
from flexmerge_jax.schedule.greedy import linear_sequences, materialized_sequence
from flexmerge_jax.stats.gram import block_gram

from conftest import random_case

SHAPES = {"a.w": (6, 5), "a.b": (5,), "b.w": (5, 7), "c": (4,)}
BLOCKS = ["a.", "b.", "c"]


def case(n=4, seed=0):
    return random_case(seed, n=n, shapes=SHAPES)


def taus(base, fts, names):
    return {k: jnp.asarray(np.stack([f[k] for f in fts]) - base[k][None]) for k in names}


DIRECT = [
    (fm.methods.tsv(1.0), lambda x: tsv_merge(x, scale=1.0)),
    (fm.methods.tsv(0.7, k=1), lambda x: tsv_merge(x, scale=0.7, k=1)),
    (fm.methods.iso_c(1.3), lambda x: iso_c_merge(x, scale=1.3)),
    (fm.methods.iso_cts(1.0, 0.5), lambda x: iso_cts_merge(x, scale=1.0, common_fraction=0.5)),
    (fm.methods.breadcrumbs(0.5, top=0.05, bottom=0.5),
     lambda x: breadcrumbs_merge(x, top=0.05, bottom=0.5, scale=0.5)),
    (fm.methods.magmax(0.5), lambda x: magmax_merge(x, scale=0.5)),
    (fm.methods.model_stock(), lambda x: model_stock_merge(x)),
    (fm.methods.task_arithmetic(0.3, convention="sum"),
     lambda x: task_arithmetic_sum(x, scale=0.3)),
    (fm.methods.ties(0.4, merge_func="sum"),
     lambda x: ties_disjoint_merge(x, scale=0.4, merge_func="sum")),
    (fm.methods.ties(1.0, merge_func="max"),
     lambda x: ties_disjoint_merge(x, scale=1.0, merge_func="max")),
]


@pytest.mark.parametrize("method,kernel", DIRECT,
                         ids=lambda v: getattr(v, "describe", lambda: "")())
def test_merge_equals_direct_kernel(method, kernel):
    base, fts = case()
    got = fm.merge(base, fts, method, blocks=BLOCKS)
    part = fm.blocks.resolve(BLOCKS, list(base), [int(np.prod(s)) for s in SHAPES.values()])
    for blk in part.blocks:
        exp = kernel(taus(base, fts, blk.leaves))
        for k in blk.leaves:
            np.testing.assert_allclose(np.asarray(got[k]), base[k] + np.asarray(exp[k]),
                                       rtol=1e-6, atol=1e-7)


def test_della_keys_differ_per_block_and_are_deterministic():
    # Two blocks with identical task vectors: DELLA's draws are keyed per
    # block, so they must be pruned differently; a seed fixes everything.
    shapes = {"x1": (64,), "x2": (64,)}
    base, fts = random_case(1, n=4, shapes=shapes)
    base["x2"] = base["x1"].copy()
    for f in fts:
        f["x2"] = f["x1"].copy()
    m = fm.methods.della(1.0, density=0.5, epsilon=0.1, seed=3)
    a = fm.merge(base, fts, m)
    b = fm.merge(base, fts, m)
    for k in base:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert not np.array_equal(np.asarray(a["x1"]), np.asarray(a["x2"]))
    c = fm.merge(base, fts, fm.methods.della(1.0, density=0.5, epsilon=0.1, seed=4))
    assert not np.array_equal(np.asarray(a["x1"]), np.asarray(c["x1"]))


SHARED = [fm.methods.tsv(0.8),
          pytest.param(fm.methods.tsv(1.0, k=1), marks=pytest.mark.slow),  # tsv's state again
          fm.methods.breadcrumbs(0.5, top=0.05, bottom=0.5),
          pytest.param(fm.methods.della(1.0, density=0.6, epsilon=0.1, seed=2),
                       marks=pytest.mark.slow)]  # per-block random state, as breadcrumbs' masks


@pytest.mark.parametrize("method", SHARED, ids=lambda m: m.describe())
def test_shared_state_gives_the_groups_merges_and_the_plans(method, monkeypatch):
    # The state computed once per block (SVDs, masks, pruned vectors) must
    # give every group exactly what the kernel computes on its own.
    from flexmerge_jax.tree import canonical

    base, fts = case(n=5, seed=4)
    x = canonical(taus(base, fts, ["a.w", "a.b"]))
    key = jax.random.key(7)
    own = {"key": key} if method.name == "della" else None
    shared = {**(own or {}), **method.shared_state(x, key)}
    for members in ([1, 1, 0, 0, 0], [0, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 0]):
        mb = jnp.asarray(members, bool)
        got = method.merge_group(x, mb, shared).vector
        exp = method.merge_group(x, mb, own).vector
        for k in x:
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(exp[k]), rtol=2e-6, atol=1e-7)
    # Whole plans (merged-vector similarity: one group vector per merge) and
    # their cuts, with and without the shared state.
    runs = []
    for disable in (False, True):
        if disable:
            monkeypatch.setattr(fm.methods.Method, "shared_state",
                                lambda self, x, key=None, **kw: {})
        p = fm.plan(base, fts, blocks=BLOCKS, method=method, linkage=None, similarity="cosine")
        cut = p.at_size(2.0)
        runs.append((p, [cut.params_for_task(t) for t in range(5)]))
    (p1, m1), (p2, m2) = runs
    assert [(e.block, e.members_a, e.members_b) for e in p1.events] == \
        [(e.block, e.members_a, e.members_b) for e in p2.events]
    np.testing.assert_allclose([e.similarity for e in p1.events],
                               [e.similarity for e in p2.events], rtol=1e-6)
    for a, b in zip(m1, m2):
        for k in base:
            np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=2e-6, atol=1e-7)


def test_sum_convention_gram_path_equals_materialized_path():
    base, fts = case(n=5, seed=2)
    m = fm.methods.task_arithmetic(0.3, convention="sum")
    x = taus(base, fts, ["a.w", "a.b"])
    numel = 35
    gram = block_gram(x)[None]
    fast = linear_sequences(gram, np.array([numel]), "euclidean", m.group_scale, m.min_merged,
                            m.sums)[0]
    slow = materialized_sequence(x, x, None, "euclidean", m, numel)
    np.testing.assert_array_equal(fast.a, slow.a)
    np.testing.assert_array_equal(fast.b, slow.b)
    # The materialized path merges in float32 (the Gram path is exact float64).
    np.testing.assert_allclose(fast.sim, slow.sim, rtol=1e-6)
    p = fm.plan(base, fts, blocks=BLOCKS, method=m, linkage=None, similarity="euclidean")
    end = p.at_step(p.num_steps).params_for_task(0)
    direct = fm.merge(base, fts, m, blocks=BLOCKS)
    for k in base:
        np.testing.assert_allclose(np.asarray(end[k]), np.asarray(direct[k]), rtol=1e-6, atol=1e-7)


def test_slerp_is_two_tasks_only():
    base, fts = case()
    out = fm.merge(base, fts[:2], fm.methods.slerp(0.25), blocks=BLOCKS)
    x = taus(base, fts[:2], ["b.w"])
    np.testing.assert_allclose(np.asarray(out["b.w"]),
                               base["b.w"] + np.asarray(slerp_merge(x, t=0.25)["b.w"]),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="exactly two"):
        fm.plan(base, fts, method=fm.methods.slerp())


def test_options_roundtrip_and_validation():
    for m in [fm.methods.tsv(k=3), fm.methods.della(seed=5), fm.methods.iso_cts(1.0, 0.6),
              fm.methods.task_arithmetic(0.3, "sum"), fm.methods.ties(1.0, 0.2, "max"),
              fm.methods.breadcrumbs(), fm.methods.slerp(0.2), fm.methods.model_stock()]:
        assert fm.methods.from_json(m.to_json()) == m
        assert m.hyperparameters()["name"] == m.name
    bad = [
        (lambda: fm.methods.task_arithmetic(1.0, "median"), "convention"),
        (lambda: fm.methods.ties(merge_func="min"), "merge_func"),
        (lambda: fm.methods.tsv(k=0), "k must be"),
        (lambda: fm.methods.iso_cts(common_fraction=1.5), "common_fraction"),
        (lambda: fm.methods.breadcrumbs(top=0.5, bottom=0.6), "top \\+ bottom"),
        (lambda: fm.methods.della(density=0.1, epsilon=0.2), "density - epsilon"),
        (lambda: fm.methods.slerp(t=2.0), "t must be"),
    ]
    for make, match in bad:
        with pytest.raises(ValueError, match=match):
            make()
    assert fm.methods.get("tsv", k=2) == fm.methods.tsv(k=2)


def test_explicit_default_conventions_merge_as_the_reference():
    """Options spelling out the defaults (e.g. read back from JSON) keep the mean kernels,
    the ones the planner's Gram path assumes."""
    import jax.numpy as jnp


    x = {"w": jnp.asarray(np.arange(6, dtype=np.float32).reshape(3, 2) - 2.0)}
    for plain, opt in ((fm.methods.task_arithmetic(1.5), ("convention", "mean")),
                       (fm.methods.ties(1.5, keep=1.0), ("merge_func", "mean"))):
        spelled = fm.methods.from_json({**plain.to_json(), "options": [list(opt)]})
        assert not spelled.sums
        np.testing.assert_array_equal(np.asarray(spelled.merge_group(x).vector["w"]),
                                      np.asarray(plain.merge_group(x).vector["w"]))
