"""Merge kernels against the float64 NumPy transcription of the spec (tests/reference.py).

Tolerances: kernels run in float32 on O(1e-2) task vectors summed over <= 8
tasks, so each output is within a few float32 ulps of the float64 value:
``rtol=1e-5, atol=1e-8`` (atol ~ 1e-6 of the data scale). Boolean masks are
compared exactly except entries within 1e-5 (relative) of their strict
inequality boundary, where float32 and float64 may legitimately disagree.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexmerge_jax import methods
from flexmerge_jax.methods._common import group_mean, task_sum
from flexmerge_jax.methods.emr import emr_merge
from flexmerge_jax.methods.pcb import pcb_clip_bounds, pcb_merge, pcb_thresholds
from flexmerge_jax.methods.task_arithmetic import task_arithmetic_merge
from flexmerge_jax.methods.ties import ties_merge

import reference as ref

TOL = dict(rtol=1e-5, atol=1e-8)
SHAPES = {"w": (5, 3), "b": (3,), "s": (4,)}


def block(seed, n=6, scale=1e-2):
    rng = np.random.default_rng(seed)
    common = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    return {
        k: (scale * (0.6 * common[k][None] + rng.standard_normal((n, *s)))).astype(np.float32)
        for k, s in SHAPES.items()
    }


def rows(x, members):
    """Reference input: list of member dicts (float64), ascending task order."""
    return [{k: np.float64(v[i]) for k, v in x.items()} for i in np.flatnonzero(members)]


def as_np(d):
    return {k: np.asarray(v, np.float64) for k, v in d.items()}


def assert_close(got, exp, **tol):
    tol = tol or TOL
    assert set(got) == set(exp)
    for k in exp:
        np.testing.assert_allclose(np.asarray(got[k], np.float64), exp[k], err_msg=k, **tol)


MEMBER_SETS = [
    np.array([1, 1, 1, 1, 1, 1], bool),
    np.array([1, 0, 1, 0, 0, 1], bool),
    np.array([0, 1, 0, 0, 1, 0], bool),
    np.array([0, 0, 0, 1, 0, 0], bool),
]


@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_linear_kernels_match_reference(seed, mi, maybe_jit):
    x = block(seed)
    members = MEMBER_SETS[mi]
    xj = {k: jnp.asarray(v) for k, v in x.items()}
    avg = maybe_jit(group_mean)(xj, members)
    assert_close(avg, ref.avg_ref(rows(x, members)))
    ta = maybe_jit(lambda a, m: task_arithmetic_merge(a, m, scale=1.5))(xj, members)
    assert_close(ta, ref.ta_ref(rows(x, members), 1.5))


@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_matches_reference(seed, mi, maybe_jit):
    x = block(seed)
    # Exact zeros and cancelling columns exercise the zero-sign fallback.
    x["w"][:, 0, 0] = 0.0
    x["b"][:, 1] = 0.0
    x["s"][0, 2], x["s"][2, 2] = 0.01, -0.01
    members = MEMBER_SETS[mi]
    got = maybe_jit(lambda a, m: ties_merge(a, m, scale=1.2))(
        {k: jnp.asarray(v) for k, v in x.items()}, members
    )
    assert_close(got, ref.ties_ref(rows(x, members), 1.2))


def test_ties_zero_sign_fallback_is_block_majority():
    # Column 0 sums to exactly zero; the block has more negative than positive
    # elected signs, so column 0 takes -1 and keeps only the negative entry.
    x = {"a": jnp.asarray([[1.0, -1.0, -2.0], [-1.0, -3.0, -1.0]], jnp.float32)}
    got = np.asarray(ties_merge(x)["a"])
    np.testing.assert_array_equal(got, [-1.0, -2.0, -1.5])
    # Majority 0 -> +1.
    x = {"a": jnp.asarray([[1.0, 2.0, -2.0], [-1.0, 1.0, -3.0]], jnp.float32)}
    got = np.asarray(ties_merge(x)["a"])
    np.testing.assert_array_equal(got, [1.0, 1.5, -2.5])


@pytest.mark.parametrize("mi", range(len(MEMBER_SETS)))
@pytest.mark.parametrize("seed", [0, 1])
def test_pcb_matches_reference(seed, mi):
    x = block(seed)
    members = MEMBER_SETS[mi]
    n = 6
    # Global thresholds over a "model" made of this block plus another one.
    other = block(seed + 10)
    model = [{**{k: x[k][i] for k in x}, **{"o" + k: other[k][i] for k in other}} for i in range(n)]
    lohi = ref.pcb_thresholds(model, 0.2)
    leaves = [jnp.asarray(v) for v in x.values()] + [jnp.asarray(v) for v in other.values()]
    lo, hi = pcb_thresholds(leaves, 0.2, sum(np.prod(s) for s in SHAPES.values()) * 2)
    np.testing.assert_allclose(lo, [a for a, _ in lohi], rtol=1e-5)
    np.testing.assert_allclose(hi, [b for _, b in lohi], rtol=1e-5)
    d = sum(int(np.prod(s)) for s in SHAPES.values())
    clo, chi = pcb_clip_bounds([jnp.asarray(v) for v in x.values()], d)
    got = pcb_merge(
        {k: jnp.asarray(v) for k, v in x.items()}, members, scale=1.0,
        clip_lo=jnp.asarray(clo), clip_hi=jnp.asarray(chi), lo=jnp.asarray(lo), hi=jnp.asarray(hi),
    )
    exp = ref.pcb_ref(rows(x, members), [lohi[i] for i in np.flatnonzero(members)], 1.0)
    # exp(m*self) reaches e^6 and the min-max normalisation divides by a
    # difference of such values: 5e-5 relative covers float32 rounding there.
    assert_close(got, exp, rtol=5e-5, atol=1e-8)


def _mask_mismatch(got, exp, margin):
    """Mask entries that differ, outside the rounding band ``margin``."""
    bad = 0
    for k in exp:
        diff = np.asarray(got[k]) != (np.asarray(exp[k]) > 0)
        bad += int(np.sum(diff & ~margin[k]))
    return bad


@pytest.mark.parametrize("method", ["ta", "ties"])
@pytest.mark.parametrize("mi", [0, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_consensus_masks_match_reference(method, mi, seed):
    x = block(seed)
    members = MEMBER_SETS[mi]
    m = methods.consensus_ta(1.2, 0.4) if method == "ta" else methods.consensus_ties(1.2, 0.4)
    out = m.merge_group({k: jnp.asarray(v) for k, v in x.items()}, members)
    xs = rows(x, members)
    v = ref.ta_ref(xs, 1.2) if method == "ta" else ref.ties_ref(xs, 1.2)
    assert_close(out.vector, v)
    exp = ref.consensus_masks_ref(xs, v, 0.4)
    idx = np.flatnonzero(members)
    for k in x:
        assert out.masks[k].dtype == jnp.bool_
        assert not np.asarray(out.masks[k])[~members].any()
    got = {k: np.asarray(out.masks[k])[idx] for k in x}
    exp_s = {k: np.stack([e[k] for e in exp]) for k in x}
    margin = {
        k: np.abs(np.abs(x[k][idx]) - 0.4 * np.abs(v[k][None] - x[k][idx]))
        <= 1e-5 * np.abs(x[k][idx]) + 1e-12
        for k in x
    }
    assert _mask_mismatch(got, exp_s, margin) == 0


@pytest.mark.parametrize("mi", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emr_matches_reference(seed, mi, maybe_jit):
    x = block(seed)
    x["w"][:, 1, 1] = 0.0  # mu == 0 -> flag -1
    members = MEMBER_SETS[mi]
    out = maybe_jit(emr_merge)({k: jnp.asarray(v) for k, v in x.items()}, members)
    uni, masks, resc = ref.emr_ref(rows(x, members))
    assert_close(out.unified, uni)
    idx = np.flatnonzero(members)
    np.testing.assert_allclose(np.asarray(out.rescalers)[idx], resc, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.rescalers)[~members], 1.0)
    for k in x:
        np.testing.assert_array_equal(
            np.asarray(out.masks[k])[idx], np.stack([m[k] for m in masks]) > 0
        )


def test_emr_zero_task_vector_gets_unit_rescaler():
    # Reference: 0/0 -> NaN rescaler and NaN parameters; we deploy theta_0.
    x = {"a": jnp.asarray([[0.0, 0.0], [1.0, 2.0], [2.0, 1.0]], jnp.float32)}
    out = emr_merge(x)
    assert np.isfinite(np.asarray(out.rescalers)).all()
    assert float(out.rescalers[0]) == 1.0
    assert not np.asarray(out.masks["a"])[0].any()


ALL = [
    methods.average(),
    methods.task_arithmetic(1.5),
    methods.ties(1.2),
    methods.consensus_ta(1.0, 0.3),
    methods.consensus_ties(1.0, 0.3),
    methods.emr(),
]


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_permutation_invariance(method):
    x = block(3)
    members = np.array([1, 1, 0, 1, 0, 1], bool)
    perm = np.array([4, 2, 5, 0, 3, 1])
    a = method.merge_group({k: jnp.asarray(v) for k, v in x.items()}, members)
    b = method.merge_group({k: jnp.asarray(v[perm]) for k, v in x.items()}, members[perm])
    for k in x:
        np.testing.assert_allclose(np.asarray(a.vector[k]), np.asarray(b.vector[k]),
                                   rtol=1e-5, atol=1e-9)
        if a.masks is not None:
            np.testing.assert_array_equal(np.asarray(a.masks[k])[perm], np.asarray(b.masks[k]))
            np.testing.assert_allclose(
                np.asarray(a.rescalers)[perm], np.asarray(b.rescalers), rtol=1e-6
            )


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_single_task_returns_itself(method):
    x = block(4)
    members = np.zeros(6, bool)
    members[2] = True
    out = method.merge_group({k: jnp.asarray(v) for k, v in x.items()}, members)
    factor = method.group_scale if method.name not in ("emr",) else 1.0
    for k in x:
        deployed = np.asarray(out.vector[k])
        if out.masks is not None:
            deployed = deployed * np.asarray(out.masks[k])[2] * float(out.rescalers[2])
        np.testing.assert_allclose(deployed, factor * x[k][2], rtol=1e-6, atol=1e-12)


def test_task_arithmetic_is_scaled_average():
    x = {k: jnp.asarray(v) for k, v in block(5).items()}
    for k, v in task_arithmetic_merge(x, scale=2.5).items():
        np.testing.assert_allclose(np.asarray(v), 2.5 * np.asarray(group_mean(x)[k]), rtol=1e-6)


@settings(deadline=None, max_examples=25)
@given(
    seed=st.integers(0, 2**16),
    members=st.lists(st.booleans(), min_size=6, max_size=6).filter(any),
)
def test_masked_group_equals_gathered_group(seed, members):
    """merge(x, mask) == merge(x[mask], all): masks are just a fixed-shape gather."""
    x = block(seed)
    members = np.asarray(members)
    idx = np.flatnonzero(members)
    for method in ALL:
        a = method.merge_group({k: jnp.asarray(v) for k, v in x.items()}, members)
        b = method.merge_group({k: jnp.asarray(v[idx]) for k, v in x.items()}, None)
        for k in x:
            np.testing.assert_allclose(np.asarray(a.vector[k]), np.asarray(b.vector[k]),
                                       rtol=1e-6, atol=1e-12)
            if a.masks is not None:
                np.testing.assert_array_equal(np.asarray(a.masks[k])[idx], np.asarray(b.masks[k]))


def test_kernels_compile_once_across_groups_and_scales():
    traces = []

    def f(x, members, scale):
        traces.append(1)
        return ties_merge(x, members, scale=scale)

    jf = jax.jit(f)
    x = {k: jnp.asarray(v) for k, v in block(6).items()}
    for members, scale in itertools.product(MEMBER_SETS, [0.5, 1.0, 2.0]):
        jf(x, jnp.asarray(members), scale)
    assert len(traces) == 1


def test_sequential_task_sum_order():
    # (a + b) + c differs from a + (b + c) in float32 here: the kernels use the
    # reference's left-to-right order.
    x = jnp.asarray([[1e8], [1.0], [-1e8]], jnp.float32)
    assert float(task_sum(x)[0]) == float((np.float32(1e8) + np.float32(1.0)) - np.float32(1e8))


def test_pcb_zero_task_vector_is_finite():
    # Reference: constant rows make PCB's min-max 0/0 -> NaN merged vector.
    x = block(9)
    x = {k: v.copy() for k, v in x.items()}
    for v in x.values():
        v[1] = 0.0
    leaves = [jnp.asarray(v) for v in x.values()]
    d = sum(int(np.prod(s)) for s in SHAPES.values())
    lo, hi = pcb_thresholds(leaves, 0.2, d)
    assert np.isfinite(lo).all() and np.isfinite(hi).all()
    clo, chi = pcb_clip_bounds(leaves, d)
    out = pcb_merge({k: jnp.asarray(v) for k, v in x.items()}, None, clip_lo=jnp.asarray(clo),
                            clip_hi=jnp.asarray(chi), lo=jnp.asarray(lo), hi=jnp.asarray(hi))
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
