"""The kernels of :mod:`flexmerge_jax.methods` beyond the reference against float64 NumPy
transcriptions of the papers (tests/reference_extra.py), their properties, and FusionBench's /
mergekit's implementations.

Tolerances (``max|got - exp| <= tol * max|exp|`` per parameter, data of scale 1e-2):

* element-wise methods (sums, masks, selections: TA-sum, TIES, Breadcrumbs, DELLA, MagMax):
  ``1e-6`` -- a few float32 ulps of sums over <= 6 tasks; masks/selections are compared exactly
  through the values they produce (random data has no ties at the cut-offs; tie rules are tested
  on hand-made data).
* Model Stock: ``1e-4`` -- ``arccos`` amplifies the float32 rounding of the cosine
  (d arccos/dc = -1/sin) and t = m c / (1 + (m-1) c) is ill-conditioned where the denominator
  is small (small tensors with negative cosines); measured <= 1e-5 against float64 and
  <= 1.7e-5 against FusionBench (which also loses digits forming theta_0 + tau in float32).
* SVD-based methods (TSV-M, Iso-C, Iso-CTS): ``1e-4`` -- float32 singular vectors are accurate to
  ~eps/gap; measured <= 1.5e-5 (TSV-M), 1.4e-5 (Iso-CTS), 4e-6 (Iso-C) against float64 and
  <= 1.5e-5 against FusionBench (which is itself 5e-6 from float64).
* SLERP: ``1e-5`` on task vectors (one arccos/sin of a float32 dot product; measured 2.4e-7);
  ``2e-4`` on full weights (theta_0 ~ 1 added then subtracted: float32 cancellation, x100 on
  tau ~ 1e-2; measured 4.9e-5).

Speed: kernels are jitted once per (kernel, static switches) with members and hyperparameters
traced (:func:`run`), so the many parametrized cases reuse one compilation; eager execution is
checked once per kernel on a small block (``test_jit_equals_eager``).

FusionBench/mergekit comparisons run the installed libraries in torch float32 on the same numpy
data; they are skipped, with the reason, when torch / fusion-bench / mergekit are not installed
(CI has none). Same tolerances (both sides are float32).
"""

from __future__ import annotations

import functools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmerge_jax.methods._common import floor_count
from flexmerge_jax.methods.breadcrumbs import breadcrumbs_masks, breadcrumbs_merge
from flexmerge_jax.methods.della import della_merge, della_noise, magprune
from flexmerge_jax.methods.iso import iso_c_merge, iso_cts_merge
from flexmerge_jax.methods.magmax import magmax_merge
from flexmerge_jax.methods.model_stock import model_stock_merge, model_stock_ratio
from flexmerge_jax.methods.slerp import slerp_merge
from flexmerge_jax.methods.task_arithmetic import task_arithmetic_merge, task_arithmetic_sum
from flexmerge_jax.methods.ties import ties_disjoint_merge, ties_merge
from flexmerge_jax.methods.tsv import task_svd, tsv_merge

import fusionbench_utils as fbu
import reference_extra as ref

SHAPES = {"w": (12, 10), "v": (8, 14), "b": (10,), "s": (), "k": (2, 3, 4)}
SMALL = {"w": (6, 5), "b": (5,), "s": ()}
N = 6
MEMBER_SETS = [
    np.array([1, 1, 1, 1, 1, 1], bool),
    np.array([1, 0, 1, 0, 0, 1], bool),
    np.array([0, 1, 0, 0, 1, 0], bool),
    np.array([0, 0, 0, 1, 0, 0], bool),
    np.array([1, 1, 1, 1, 0, 1], bool),
]
ELEM, STOCK, SVD, SLERP, SLERP_BASE_TOL = 1e-6, 1e-4, 1e-4, 1e-5, 2e-4


def block(seed, n=N, scale=1e-2, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    common = {k: rng.standard_normal(s) for k, s in shapes.items()}
    return {
        k: np.array(scale * (0.6 * common[k][None] + rng.standard_normal((n, *s))), np.float32)
        for k, s in shapes.items()
    }


def jx(x):
    return {k: jnp.asarray(v) for k, v in x.items()}


def rows(x, members):
    """Gathered group for the references: member dicts in task order, float64."""
    return [{k: np.float64(v[i]) for k, v in x.items()} for i in np.flatnonzero(members)]


def drop(x, *names):
    return {k: v for k, v in x.items() if k not in names}


def as64(d):
    return {k: np.asarray(v, np.float64) for k, v in d.items()}


def max_rel_err(got, exp) -> float:
    worst = 0.0
    for k in exp:
        g = np.asarray(got[k], np.float64)
        e = np.asarray(exp[k], np.float64)
        assert g.shape == e.shape, k
        scale = np.max(np.abs(e), initial=0.0) + 1e-30
        worst = max(worst, float(np.max(np.abs(g - e), initial=0.0) / scale))
    return worst


def assert_close(got, exp, tol):
    assert set(got) == set(exp)
    err = max_rel_err(got, exp)
    assert err <= tol, f"max error {err:.3g} x max|exp| > {tol}"


# ----------------------------------------------------------------------------- jitted kernels

TRACES: Counter = Counter()


@functools.cache
def _jitted(fn, static: tuple):
    kw = dict(static)

    def f(x, members, hp):
        TRACES[(fn, static)] += 1
        return fn(x, members, **kw, **hp)

    return jax.jit(f)


def run(fn, x, members, static=None, **hp):
    """``fn(x, members, **static, **hp)`` jitted once per (fn, static); members and
    hyperparameters traced (Python floats -> f32, ints -> i32)."""
    hp = {
        k: jnp.float32(v) if isinstance(v, float) else jnp.int32(v) if isinstance(v, int) else v
        for k, v in hp.items()
    }
    static = tuple(sorted((static or {}).items()))
    return _jitted(fn, static)(jx(x), jnp.asarray(members, bool), hp)


_noise = jax.jit(della_noise)


# ============================================================================ vs the papers


@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_tsv_matches_reference(seed, mi):
    x, members = block(seed), MEMBER_SETS[mi]
    assert_close(run(tsv_merge, x, members, scale=1.3), ref.tsv_m_ref(rows(x, members), 1.3), SVD)


@pytest.mark.parametrize("k", [1, 2, 7])
def test_tsv_explicit_k_and_exclude(k):
    x, members = block(3), MEMBER_SETS[1]
    got = run(tsv_merge, x, members, {"exclude": ("v",)}, k=k)
    assert_close(got, ref.tsv_m_ref(rows(x, members), 1.0, k=k, exclude=("v",)), SVD)
    if k == 7:  # clipped to floor(r/m): r = 10, m = 3 -> 3, the default
        assert_close(got, as64(run(tsv_merge, x, members, {"exclude": ("v",)})), 1e-6)


def test_tsv_precomputed_svd_is_the_same():
    x, members = block(4), MEMBER_SETS[4]
    a = run(tsv_merge, x, members)
    b = run(tsv_merge, x, members, svd=jax.jit(task_svd)(jx(x)))
    assert_close(b, as64(a), 1e-6)


def test_tsv_rank_below_group_size_gives_zero():
    # r = 2 < m = 3: every member keeps floor(2/3) = 0 triplets (as FusionBench).
    x = block(5, shapes={"w": (2, 5)})
    np.testing.assert_array_equal(np.asarray(run(tsv_merge, x, MEMBER_SETS[1])["w"]), 0.0)


@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_iso_c_matches_reference(seed, mi):
    x, members = block(seed), MEMBER_SETS[mi]
    assert_close(run(iso_c_merge, x, members, scale=1.3), ref.iso_c_ref(rows(x, members), 1.3), SVD)


@pytest.mark.parametrize("frac", [0.8, 0.5, 0.0, 1.0])
@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
def test_iso_cts_matches_reference(mi, frac):
    x, members = block(mi), MEMBER_SETS[mi]
    got = run(iso_cts_merge, x, members, scale=0.9, common_fraction=frac)
    assert_close(got, ref.iso_cts_ref(rows(x, members), frac, 0.9), SVD)


def test_iso_cts_sizes_follow_the_authors_rounding():
    assert ref.iso_cts_sizes(10, 3, 0.8) == (7, 1)  # c0 = 8, round(2/3) = 1 -> c = 7
    assert ref.iso_cts_sizes(10, 4, 0.8) == (10, 0)  # round(0.5) = 0 (half to even)
    assert ref.iso_cts_sizes(5, 3, 0.0) == (2, 1)  # FusionBench would crash (s = 2, c = -1)
    # The clipped case through the kernel (r = 5 < m s = 6 in FusionBench's rounding).
    x = block(7, shapes={"w": (5, 9)})
    got = run(iso_cts_merge, x, MEMBER_SETS[1], common_fraction=0.0)
    assert_close(got, ref.iso_cts_ref(rows(x, MEMBER_SETS[1]), 0.0), SVD)


@pytest.mark.parametrize("granularity", ["tensor", "node"])
@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
def test_breadcrumbs_matches_reference(mi, granularity):
    x, members = block(mi + 10), MEMBER_SETS[mi]
    got = run(breadcrumbs_merge, x, members, {"granularity": granularity},
              top=0.1, bottom=0.55, scale=0.7)
    assert_close(got, ref.breadcrumbs_ref(rows(x, members), 0.1, 0.55, 0.7, granularity), ELEM)


def test_breadcrumbs_masks_counts():
    x = jx(block(2))
    bm = jax.jit(breadcrumbs_masks, static_argnames="granularity")
    masks = bm(x, top=0.05, bottom=0.7)
    # "w": 120 entries -> drop int(6.0)=6 largest and int(84.0)=84 smallest -> 30 kept per task.
    np.testing.assert_array_equal(np.asarray(masks["w"]).reshape(N, -1).sum(1), 30)
    node = bm(x, top=0.25, bottom=0.5, granularity="node")
    # per output unit of "w" (12 entries): 3 largest and 6 smallest dropped -> 3 kept.
    np.testing.assert_array_equal(np.asarray(node["w"]).sum(1), 3)
    assert np.asarray(masks["s"]).all()  # a scalar (N = 1) is never dropped


@pytest.mark.parametrize("granularity", ["node", "tensor"])
@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
def test_della_matches_reference(mi, granularity):
    x, members = block(mi + 20), MEMBER_SETS[mi]
    noise = _noise(jx(x), jax.random.key(mi))
    got = run(della_merge, x, members, {"granularity": granularity},
              noise=noise, density=0.6, epsilon=0.2, scale=1.1)
    us = rows({k: np.asarray(v) for k, v in noise.items()}, members)
    assert_close(got, ref.della_ref(rows(x, members), us, 0.6, 0.2, 1.1, True, granularity), ELEM)


def test_della_unscaled_matches_reference():
    x, members = block(25), MEMBER_SETS[1]
    noise = _noise(jx(x), jax.random.key(9))
    got = run(della_merge, x, members, {"rescale": False}, noise=noise, density=0.5, epsilon=0.1)
    us = rows({k: np.asarray(v) for k, v in noise.items()}, members)
    assert_close(got, ref.della_ref(rows(x, members), us, 0.5, 0.1, 1.0, False, "node"), ELEM)


def test_della_key_path_and_magprune_statistics():
    x = jx(block(30, n=4, shapes={"w": (64, 48)}))
    key = jax.random.key(3)
    a = jax.jit(lambda x, k: della_merge(x, None, key=k, density=0.4, epsilon=0.1))(x, key)
    b = jax.jit(lambda x, u: della_merge(x, None, noise=u, density=0.4, epsilon=0.1))(
        x, _noise(x, key))
    assert_close(a, as64(b), 0.0)
    pruned = jax.jit(lambda x, k: magprune(x, key=k, density=0.4, epsilon=0.1))(x, key)
    pruned = np.asarray(pruned["w"])
    kept = pruned != 0
    assert abs(kept.mean() - 0.4) < 0.02  # mean keep probability = density
    # larger magnitudes are kept more often (rank-linear probabilities 0.3 .. 0.5 per node)
    mag = np.abs(np.asarray(x["w"]))
    hi = mag >= np.median(mag, axis=1, keepdims=True)
    assert kept[hi].mean() > kept[~hi].mean() + 0.05
    # unbiased: E[pruned] = tau (rescale 1/p), checked on the mean over many entries
    ratio = (pruned * np.sign(np.asarray(x["w"]))).sum() / mag.sum()
    assert abs(ratio - 1.0) < 0.05
    with pytest.raises(ValueError, match="PRNG key"):
        della_merge(x)


@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
def test_magmax_matches_reference(mi):
    x, members = block(mi + 40), MEMBER_SETS[mi]
    assert_close(run(magmax_merge, x, members, scale=0.5),
                 ref.magmax_ref(rows(x, members), 0.5), ELEM)


def test_magmax_ties_go_to_the_later_task():
    x = {"a": jnp.asarray([[1.0, -2.0, 0.0], [-1.0, 2.0, 0.0], [0.5, -2.0, -0.0]], jnp.float32)}
    np.testing.assert_array_equal(np.asarray(magmax_merge(x)["a"]), [-1.0, -2.0, 0.0])
    np.testing.assert_array_equal(np.asarray(magmax_merge(x, np.array([1, 1, 0], bool))["a"]),
                                  [-1.0, 2.0, 0.0])


@pytest.mark.parametrize("angle_average", ["angle", "cosine"])
@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
def test_model_stock_matches_reference(mi, angle_average):
    # 1-element tensors have cos = +-1 (t singular for m = 2): not a Model Stock case.
    x, members = drop(block(mi + 50), "s"), MEMBER_SETS[mi]
    static = {"angle_average": angle_average}
    exp, ts = ref.model_stock_ref(rows(x, members), angle_average)
    assert_close(run(model_stock_merge, x, members, static), exp, STOCK)
    ratio = run(model_stock_ratio, x, members, static)
    for k in ts:
        np.testing.assert_allclose(float(ratio[k]), ts[k], rtol=STOCK, atol=STOCK)


def test_model_stock_zero_task_vector():
    x = {"a": jnp.asarray([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0]], jnp.float32)}
    t = float(model_stock_ratio(x, np.array([1, 1, 0], bool))["a"])
    assert abs(t) < 1e-6  # cos = 0 with a zero vector (FusionBench: 0 / (0 + eps)) -> theta_0


SLERP_BASE = {k: np.array(np.random.default_rng(1).standard_normal(s), np.float32)
              for k, s in SHAPES.items()}


@pytest.mark.parametrize("use_base", [False, True])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_reference(t, use_base):
    x = block(60)
    members = np.array([0, 1, 0, 0, 1, 0], bool)
    hp = {"base": jx(SLERP_BASE)} if use_base else {}
    got = run(slerp_merge, x, members, t=t, **hp)
    a, b = rows(x, members)
    assert_close(got, ref.slerp_ref(a, b, t, SLERP_BASE if use_base else None),
                 SLERP_BASE_TOL if use_base else SLERP)


def test_slerp_colinear_uses_lerp_and_orientation():
    v = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    x = {"a": jnp.asarray(np.stack([v, 2.0 * v]))}
    np.testing.assert_allclose(np.asarray(slerp_merge(x, t=0.25)["a"]), 1.25 * v, rtol=1e-6)
    y = block(61, n=2, shapes={"a": (3, 5)})  # t -> 1 - t with the members swapped
    a = run(slerp_merge, y, [True, True], t=0.3)
    b = run(slerp_merge, {k: v[::-1] for k, v in y.items()}, [True, True], t=0.7)
    assert_close(a, as64(b), SLERP)


def test_slerp_group_size_errors_and_traced_groups():
    x = block(62)
    with pytest.raises(ValueError, match="exactly 2"):
        slerp_merge(jx(x))  # n = 6, members=None
    with pytest.raises(ValueError, match="has 3"):
        slerp_merge(jx(x), np.array([1, 1, 1, 0, 0, 0], bool))
    with pytest.raises(ValueError, match="has 1"):
        slerp_merge(jx(x), [False, True, False, False, False, False])
    one = run(slerp_merge, x, MEMBER_SETS[3])  # traced singleton: itself
    assert_close(one, {k: np.float64(v[3]) for k, v in x.items()}, 1e-6)
    three = run(slerp_merge, x, MEMBER_SETS[1])  # traced group of 3: NaN
    assert all(np.isnan(np.asarray(v)).all() for v in three.values())


@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
def test_ta_sum_matches_reference(mi):
    x, members = block(mi + 70), MEMBER_SETS[mi]
    got = run(task_arithmetic_sum, x, members, scale=0.3)
    assert_close(got, ref.ta_sum_ref(rows(x, members), 0.3), ELEM)
    m = int(members.sum())
    lam = run(task_arithmetic_merge, x, members, scale=0.3 * m)  # alpha = lambda / m
    assert_close(got, as64(lam), 1e-6)


@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
def test_ties_disjoint_merge_matches_reference(mi, merge_func):
    x, members = block(mi + 80), MEMBER_SETS[mi]
    x["w"][:, 0, 0] = 0.0  # zero column: block-majority fallback
    x["b"][:, 1] = 0.0
    got = run(ties_disjoint_merge, x, members, {"merge_func": merge_func}, scale=1.2)
    assert_close(got, ref.ties_merge_func_ref(rows(x, members), 1.2, merge_func), ELEM)
    if merge_func == "mean":
        assert_close(got, as64(run(ties_merge, x, members, scale=1.2)), 0.0)


def test_bad_static_switches_raise():
    x = jx(block(0, shapes=SMALL))
    with pytest.raises(ValueError, match="merge_func"):
        ties_disjoint_merge(x, merge_func="median")
    with pytest.raises(ValueError, match="granularity"):
        breadcrumbs_merge(x, granularity="row")
    with pytest.raises(ValueError, match="angle_average"):
        model_stock_merge(x, angle_average="mean")
    with pytest.raises(ValueError, match="exclude"):
        tsv_merge(x, exclude="w")


def test_traced_fraction_counts_match_python_counts():
    # 0.7 is 0.69999999 in float32: the guarded float32 floor still gives int(10 * 0.7) = 7.
    floor = jax.jit(floor_count, static_argnums=0)
    for total, frac in [(10, 0.7), (10, 0.8), (120, 0.05), (12, 0.25), (5, 0.0), (7, 1.0)]:
        assert int(floor(total, jnp.float32(frac))) == int(total * frac)
        assert int(floor_count(total, frac)) == int(total * frac)
    # The documented difference: float64 100 * 0.29 = 28.999999999999996, int() -> 28 (what
    # Python/FusionBench/mergekit compute, and the static path); the traced path gives 29.
    assert int(floor_count(100, 0.29)) == 28 and int(floor(100, jnp.float32(0.29))) == 29


# ============================================================================ properties

# name -> (kernel, static switches, traced hyperparameters, tolerance)
KERNELS = {
    "tsv": (tsv_merge, {}, {"scale": 1.1}, SVD),
    "iso_c": (iso_c_merge, {}, {"scale": 1.1}, SVD),
    "iso_cts": (iso_cts_merge, {}, {"scale": 1.1, "common_fraction": 0.6}, SVD),
    "breadcrumbs": (breadcrumbs_merge, {}, {"top": 0.05, "bottom": 0.6, "scale": 0.5}, ELEM),
    "della": (della_merge, {}, {"density": 0.6, "epsilon": 0.2}, ELEM),  # + noise
    "magmax": (magmax_merge, {}, {"scale": 0.5}, ELEM),
    "model_stock": (model_stock_merge, {}, {}, STOCK),  # on blocks without the scalar
    "ta_sum": (task_arithmetic_sum, {}, {"scale": 0.3}, ELEM),
    "ties_sum": (ties_disjoint_merge, {"merge_func": "sum"}, {"scale": 0.7}, ELEM),
    "ties_max": (ties_disjoint_merge, {"merge_func": "max"}, {"scale": 0.7}, ELEM),
}


def _prop_case(name, x, idx=None):
    """(kernel input, extra traced args) for the property tests; della gets explicit noise
    (gathered along with x when idx is given), model_stock drops the scalar."""
    fn, static, hp, tol = KERNELS[name]
    hp = dict(hp)
    if name == "model_stock":
        x = drop(x, "s")
    if name == "della":
        u = _noise(jx(x), jax.random.key(1))
        hp["noise"] = u if idx is None else {k: v[idx] for k, v in u.items()}
    if idx is not None:
        x = {k: v[idx] for k, v in x.items()}
    return fn, static, x, hp, tol


@pytest.mark.parametrize("name", list(KERNELS))
def test_permutation_invariance(name):
    members = np.array([1, 1, 0, 1, 0, 1], bool)
    perm = np.array([4, 2, 5, 0, 3, 1])
    fn, static, x, hp, tol = _prop_case(name, block(90))
    a = run(fn, x, members, static, **hp)
    if "noise" in hp:
        hp["noise"] = {k: v[perm] for k, v in hp["noise"].items()}
    b = run(fn, {k: v[perm] for k, v in x.items()}, members[perm], static, **hp)
    assert_close(b, as64(a), tol)


@pytest.mark.parametrize("name", list(KERNELS))
def test_masked_group_equals_gathered_group(name):
    # two different groups of 3: one extra compilation (n = 3) per kernel
    for seed, members in enumerate([MEMBER_SETS[1], np.array([0, 1, 1, 0, 1, 0], bool)]):
        idx = np.flatnonzero(members)
        fn, static, x, hp, tol = _prop_case(name, block(100 + seed))
        a = run(fn, x, members, static, **hp)
        fn, static, xg, hpg, tol = _prop_case(name, block(100 + seed), idx)
        b = run(fn, xg, np.ones(len(idx), bool), static, **hpg)
        assert_close(a, as64(b), tol)


SINGLE = {  # kernels whose definition returns (a multiple of) a single task vector
    "tsv": (tsv_merge, {}, {}, 1.0, SVD),  # k = r: the full SVD
    "breadcrumbs": (breadcrumbs_merge, {}, {"top": 0.0, "bottom": 0.0, "scale": 0.8}, 0.8, ELEM),
    "della": (della_merge, {}, {"density": 1.0, "epsilon": 0.0}, 1.0, ELEM),  # + noise: p = 1
    "magmax": (magmax_merge, {}, {"scale": 0.5}, 0.5, ELEM),
    "model_stock": (model_stock_merge, {}, {}, 1.0, ELEM),
    "ta_sum": (task_arithmetic_sum, {}, {"scale": 0.3}, 0.3, ELEM),
    "ties_mean": (ties_disjoint_merge, {"merge_func": "mean"}, {}, 1.0, ELEM),
    "ties_sum": (ties_disjoint_merge, {"merge_func": "sum"}, {}, 1.0, ELEM),
    "ties_max": (ties_disjoint_merge, {"merge_func": "max"}, {}, 1.0, ELEM),
    "slerp": (slerp_merge, {}, {}, 1.0, ELEM),
}


@pytest.mark.parametrize("name", list(SINGLE))
def test_single_task_returns_itself(name):
    fn, static, hp, factor, tol = SINGLE[name]
    x = block(110)
    if name == "della":
        hp = {**hp, "noise": _noise(jx(x), jax.random.key(0))}
    out = run(fn, x, MEMBER_SETS[3], static, **hp)  # task 3 alone
    assert_close(out, {k: factor * np.float64(x[k][3]) for k in out}, tol)


EAGER = {  # kernel, static, Python-number hyperparameters (the exact count path), reference
    "tsv": (tsv_merge, {}, {"scale": 1.1}, lambda xs: ref.tsv_m_ref(xs, 1.1)),
    "iso_c": (iso_c_merge, {}, {"scale": 1.1}, lambda xs: ref.iso_c_ref(xs, 1.1)),
    "iso_cts": (iso_cts_merge, {}, {"common_fraction": 0.7}, lambda xs: ref.iso_cts_ref(xs, 0.7)),
    "breadcrumbs": (breadcrumbs_merge, {}, {"top": 0.1, "bottom": 0.7},
                    lambda xs: ref.breadcrumbs_ref(xs, 0.1, 0.7, 1.0)),
    "magmax": (magmax_merge, {}, {}, lambda xs: ref.magmax_ref(xs, 1.0)),
    "model_stock": (model_stock_merge, {"angle_average": "cosine"}, {}, None),
    "ta_sum": (task_arithmetic_sum, {}, {"scale": 0.3}, lambda xs: ref.ta_sum_ref(xs, 0.3)),
    "ties_max": (ties_disjoint_merge, {"merge_func": "max"}, {},
                 lambda xs: ref.ties_merge_func_ref(xs, 1.0, "max")),
    "della": (della_merge, {}, {"density": 0.5, "epsilon": 0.1}, None),  # + noise
    "slerp": (slerp_merge, {}, {"t": 0.4}, None),
}


@pytest.mark.parametrize("name", list(EAGER))
def test_jit_equals_eager(name):
    fn, static, hp, reference = EAGER[name]
    x = block(120, shapes=SMALL)
    members = np.array([1, 0, 1, 0, 0, 0], bool) if name == "slerp" else MEMBER_SETS[1]
    if name == "model_stock":
        x = drop(x, "s")
    if name == "della":
        hp = {**hp, "noise": _noise(jx(x), jax.random.key(4))}
    eager = fn(jx(x), members, **static, **hp)
    jitted = jax.jit(lambda a, m: fn(a, m, **static, **hp))(jx(x), jnp.asarray(members))
    assert_close(jitted, as64(eager), 1e-6)
    if reference is not None:
        assert_close(eager, reference(rows(x, members)),
                     SVD if name in ("tsv", "iso_c", "iso_cts") else ELEM)


@pytest.mark.parametrize("name", ["tsv", "iso_cts", "breadcrumbs", "della", "model_stock"])
def test_vmap_over_groups(name):
    fn, static, x, hp, tol = _prop_case(name, block(130))
    groups = jnp.asarray(np.stack(MEMBER_SETS))
    batched = jax.jit(jax.vmap(lambda a, m: fn(a, m, **static, **hp), in_axes=(None, 0)))(
        jx(x), groups)
    for g, members in enumerate(MEMBER_SETS):
        assert_close({k: v[g] for k, v in batched.items()},
                     as64(run(fn, x, members, static, **hp)), tol)


def test_compile_once_across_groups_and_hyperparameters():
    """Every kernel: all member sets and two values of every hyperparameter, one trace."""
    x = block(140)
    cases = {
        tsv_merge: [{"scale": 0.5, "k": 1}, {"scale": 1.5, "k": 3}],
        iso_c_merge: [{"scale": 0.5}, {"scale": 1.5}],
        iso_cts_merge: [{"scale": 0.5, "common_fraction": 0.4},
                        {"scale": 1.5, "common_fraction": 0.9}],
        breadcrumbs_merge: [{"top": 0.01, "bottom": 0.5, "scale": 0.3},
                            {"top": 0.1, "bottom": 0.7, "scale": 1.0}],
        della_merge: [
            {"noise": _noise(jx(x), jax.random.key(0)),
             "density": 0.4, "epsilon": 0.1, "scale": 0.5},
            {"noise": _noise(jx(x), jax.random.key(1)),
             "density": 0.7, "epsilon": 0.2, "scale": 1.0},
        ],
        magmax_merge: [{"scale": 0.5}, {"scale": 1.0}],
        task_arithmetic_sum: [{"scale": 0.3}, {"scale": 1.0}],
        slerp_merge: [{"t": 0.2}, {"t": 0.9}],
    }
    for fn, hps in cases.items():
        groups = MEMBER_SETS if fn is not slerp_merge else [
            np.array([1, 1, 0, 0, 0, 0], bool), np.array([0, 0, 1, 0, 0, 1], bool)]
        before = TRACES[(fn, ())]
        for members in groups:
            for hp in hps:
                out = run(fn, x, members, **hp)
                assert all(np.isfinite(np.asarray(v)).all() for v in out.values()), fn.__name__
        assert TRACES[(fn, ())] - before <= 1, fn.__name__


# ============================================================================ vs FusionBench

_FB_SKIP = fbu.missing_reason()
needs_fb = pytest.mark.skipif(_FB_SKIP is not None, reason=f"FusionBench comparison: {_FB_SKIP}")
_MK_SKIP = None if fbu.have("torch") and fbu.have("mergekit") else (
    "torch or mergekit not installed (pip install --no-deps mergekit)"
)
needs_mk = pytest.mark.skipif(_MK_SKIP is not None, reason=f"mergekit comparison: {_MK_SKIP}")

FB_GROUPS = [MEMBER_SETS[0], MEMBER_SETS[1], MEMBER_SETS[4], np.array([0, 1, 0, 0, 1, 0], bool)]


def _torch_tvs(x, members):
    import torch

    return [{k: torch.from_numpy(np.array(v[i])) for k, v in x.items()}
            for i in np.flatnonzero(members)]


def _np(d):
    return {k: v.detach().numpy().astype(np.float64) for k, v in d.items()}


@pytest.fixture(scope="module")
def fb():
    import torch

    torch.set_num_threads(1)
    return {
        "tsv": fbu.load_fusion_bench("method/task_singular_vector/utils/TSVM_utils.py"),
        "iso": fbu.load_fusion_bench("method/isotropic_merging/iso_utils.py"),
        "magmax": fbu.load_fusion_bench("method/magmax/magmax.py"),
        "stock": fbu.load_fusion_bench("method/model_stock/model_stock.py"),
        "slerp": fbu.load_fusion_bench("method/slerp/slerp_utils.py"),
        "ties": fbu.load_fusion_bench("method/ties_merging/ties_merging_utils.py"),
        "ta": fbu.load_fusion_bench("method/task_arithmetic/task_arithmetic.py"),
    }


@needs_fb
@pytest.mark.parametrize("gi", range(len(FB_GROUPS)))
def test_fusionbench_tsv(fb, gi):
    x, members = block(200 + gi), FB_GROUPS[gi]
    exp = fb["tsv"].compute_and_sum_svd_mem_reduction(_torch_tvs(x, members), exclude_keys=["v"],
                                                      accelerator="cpu")
    got = run(tsv_merge, x, members, {"exclude": ("v",)})
    assert_close(got, _np(exp), SVD)


@needs_fb
@pytest.mark.parametrize("gi", range(len(FB_GROUPS)))
def test_fusionbench_iso(fb, gi):
    x, members = block(210 + gi), FB_GROUPS[gi]
    exp = fb["iso"].iso_c(_torch_tvs(x, members), accelerator="cpu")
    assert_close(run(iso_c_merge, x, members), _np(exp), SVD)
    for frac in (0.8, 0.5):
        exp = fb["iso"].iso_cts(_torch_tvs(x, members), common_space_fraction=frac,
                                accelerator="cpu")
        assert_close(run(iso_cts_merge, x, members, common_fraction=frac), _np(exp), SVD)


@needs_fb
@pytest.mark.parametrize("gi", range(len(FB_GROUPS)))
def test_fusionbench_magmax(fb, gi):
    x, members = block(220 + gi), FB_GROUPS[gi]
    exp = fb["magmax"]._magmax_select(_torch_tvs(x, members))
    assert_close(run(magmax_merge, x, members, scale=1.0), _np(exp), 0.0)


@needs_fb
@pytest.mark.parametrize("gi", range(len(FB_GROUPS)))
def test_fusionbench_model_stock(fb, gi):
    """FusionBench's ModelStock.run on full weights (its loop, with its compute_angle /
    compute_ratio / merge_weights), minus theta_0, against the task-vector kernel."""
    import torch

    ms = fb["stock"]
    x, members = drop(block(230 + gi, scale=0.1), "s"), FB_GROUPS[gi]
    rng = np.random.default_rng(gi)
    base = {k: rng.standard_normal(v.shape[1:]).astype(np.float32) for k, v in x.items()}
    b_t = {k: torch.from_numpy(v) for k, v in base.items()}
    sds = [{k: b_t[k] + tv[k] for k in tv} for tv in _torch_tvs(x, members)]
    K = len(sds)
    if K == 2:
        ratio = ms.compute_ratio(ms.compute_angle(sds[0], sds[1], b_t), k=2)
        merged = ms.merge_weights(sds[0], sds[1], b_t, ratio)
    else:
        sums = {}
        for i in range(K):
            for j in range(i + 1, K):
                for key, ang in ms.compute_angle(sds[i], sds[j], b_t).items():
                    sums[key] = sums.get(key, 0.0) + ang
        ratio = ms.compute_ratio({key: a / (K * (K - 1) / 2) for key, a in sums.items()}, k=K)
        avg = {key: sum(sd[key] for sd in sds) / K for key in b_t}
        merged = {key: avg[key] * r + b_t[key] * (1.0 - r) for key, r in ratio.items()}
    exp = {k: merged[k].numpy().astype(np.float64) - base[k] for k in base}
    got = run(model_stock_merge, x, members)
    # theta_0 ~ 1 and tau ~ 0.1: FusionBench's float32 weights lose ~1e-7 * 10 relative.
    assert_close(got, exp, STOCK)
    kr = run(model_stock_ratio, x, members)
    for k in ratio:
        np.testing.assert_allclose(float(kr[k]), ratio[k], rtol=STOCK)


@needs_fb
@pytest.mark.parametrize("t", [0.3, 0.5, 0.9])
def test_fusionbench_slerp(fb, t):
    import torch

    x = block(240)
    members = np.array([0, 0, 1, 0, 0, 1], bool)
    base = {k: np.random.default_rng(3).standard_normal(s).astype(np.float32)
            for k, s in SHAPES.items()}
    a, b = _torch_tvs(x, members)
    tv = {k: fb["slerp"].slerp(t, a[k], b[k]) for k in a}
    assert_close(run(slerp_merge, x, members, t=t), _np(tv), SLERP)
    full = {k: fb["slerp"].slerp(t, torch.from_numpy(base[k]) + a[k],
                                 torch.from_numpy(base[k]) + b[k]) for k in a}
    exp = {k: full[k].numpy().astype(np.float64) - base[k] for k in a}
    assert_close(run(slerp_merge, x, members, t=t, base=jx(base)), exp, SLERP_BASE_TOL)


@needs_fb
@pytest.mark.parametrize("gi", range(len(FB_GROUPS)))
def test_fusionbench_task_arithmetic_sum(fb, gi):
    """TaskArithmeticAlgorithm.run's state-dict arithmetic (state_dict_sub / add / mul on full
    weights). (Its module-level task_arithmetic_merge raises a TypeError for > 1 model in
    fusion-bench 0.2.33: keep_vars=True Parameters vs Tensors.)"""
    import torch

    sda = fb["ta"].state_dict_sub, fb["ta"].state_dict_add, fb["ta"].state_dict_mul
    x, members = block(250 + gi), FB_GROUPS[gi]
    rng = np.random.default_rng(gi)
    base = {k: np.array(0.1 * rng.standard_normal(v.shape[1:]), np.float32) for k, v in x.items()}
    pre = {k: torch.from_numpy(v) for k, v in base.items()}
    tv = None
    for i in np.flatnonzero(members):
        ft = {k: torch.from_numpy(np.array(base[k] + x[k][i], np.float32)) for k in x}
        d = sda[0](ft, pre)
        tv = d if tv is None else sda[1](tv, d)
    merged = sda[1](pre, sda[2](tv, 0.3))
    exp = {k: v.numpy().astype(np.float64) - base[k] for k, v in merged.items()}
    # FusionBench forms theta_i - theta_0 in float32 (|theta_0| ~ 0.1): ~1e-8 absolute per entry.
    got = run(task_arithmetic_sum, x, members, scale=0.3)
    assert_close(got, exp, 5e-5)


@needs_fb
@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
@pytest.mark.parametrize("gi", range(len(FB_GROUPS)))
def test_fusionbench_ties_disjoint_merge(fb, gi, merge_func):
    """FusionBench's resolve_sign + disjoint_merge on the block flattened in sorted-key order
    (its state_dict_to_vector), on untrimmed task vectors."""
    import torch

    x, members = block(260 + gi), FB_GROUPS[gi]
    x["w"][:, 0, 0] = 0.0  # zero column: both fall back to the (non-zero) majority sign
    keys = sorted(x)
    flat = torch.from_numpy(
        np.stack([np.concatenate([x[k][i].ravel() for k in keys]) for i in np.flatnonzero(members)])
    )
    signs = fb["ties"].resolve_sign(flat)
    assert (signs != 0).all()
    merged = fb["ties"].disjoint_merge(flat, merge_func, signs).numpy().astype(np.float64)
    exp, off = {}, 0
    for k in keys:
        size = int(np.prod(x[k].shape[1:]))
        exp[k] = merged[off : off + size].reshape(x[k].shape[1:])
        off += size
    got = run(ties_disjoint_merge, x, members, {"merge_func": merge_func})
    assert_close(got, exp, ELEM)


@needs_mk
@pytest.mark.parametrize("granularity", ["node", "tensor"])
def test_mergekit_della_magprune(granularity, monkeypatch):
    """mergekit's della_magprune (rescale_norm=None) with torch.bernoulli replaced by u < p using
    our uniforms: same masks; the kept values times 1/p (ours) equal its kept values."""
    import torch

    sp = fbu.load_mergekit("sparsify.py")
    x = block(270, shapes={"w": (9, 7), "b": (7,)})
    u = della_noise(jx(x), jax.random.key(5))
    got_masked = magprune(jx(x), noise=u, density=0.5, epsilon=0.2, rescale=False,
                          granularity=granularity)
    got = magprune(jx(x), noise=u, density=0.5, epsilon=0.2, granularity=granularity)
    node = granularity == "node"

    def to_mk(a):  # mergekit ranks each row of a torch [out, in] weight; 1-D: one row
        return a.T if (node and a.ndim == 2) else a.reshape(1, -1)

    def from_mk(a, shape):
        return a.T if (node and len(shape) == 2) else a.reshape(shape)

    for k in x:
        for i in range(N):
            tau, ui = x[k][i], np.asarray(u[k][i])
            seen = []

            def bern(p, ui=ui, seen=seen):
                seen.append(p.clone())
                return (torch.from_numpy(np.array(to_mk(ui))) < p).to(p.dtype)

            monkeypatch.setattr(sp.torch, "bernoulli", bern)
            res = sp.della_magprune(torch.from_numpy(np.array(to_mk(tau))), 0.5, 0.2, None)
            kept = from_mk(res.numpy(), tau.shape)
            p = from_mk(seen[0].numpy(), tau.shape)
            np.testing.assert_array_equal(np.asarray(got_masked[k][i]), kept)
            np.testing.assert_allclose(np.asarray(got[k][i]), np.where(kept != 0, kept / p, 0.0),
                                       rtol=1e-6)


@needs_mk
@pytest.mark.parametrize("density, gamma", [(0.3, 0.05), (0.1, 0.01), (0.5, 0.2)])
def test_mergekit_breadcrumbs_masks(density, gamma):
    """mergekit's magnitude_outliers (its breadcrumbs sparsifier, whole tensor) keeps the same
    entries as breadcrumbs_masks(top=gamma, bottom chosen to leave int(density N))."""
    import torch

    sp = fbu.load_mergekit("sparsify.py")
    x = block(280)
    for k in ("w", "v", "b", "k"):
        total = int(np.prod(x[k].shape[1:]))
        n_top, target = int(gamma * total), int(density * total)
        n_bot = max(0, total - target - n_top)
        bottom = (n_bot + 0.5) / total  # int(bottom * total) == n_bot
        masks = breadcrumbs_masks({k: jnp.asarray(x[k])}, top=gamma, bottom=bottom)[k]
        for i in range(N):
            res = sp.magnitude_outliers(torch.from_numpy(x[k][i]), density, None, gamma).numpy()
            np.testing.assert_array_equal(np.asarray(masks[i]), res != 0)
