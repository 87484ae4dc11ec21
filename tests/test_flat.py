"""Elementwise methods cut blocks as flat rows: few programs, the same numbers.

A cut of an elementwise method merges each block as one zero-padded row
(``flexmerge_jax._flat``), compiled once per row width: the number of XLA
programs a cut compiles no longer grows with the number of distinct block
structures. The numbers are those of the per-parameter programs, bit for
bit (checked here against them, and in ``test_golden_methods`` against the
saved outputs of the code before).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import _flat

from conftest import random_case

M = fm.methods

# Six blocks of six different structures (shapes used by no other test, so
# that no earlier test compiled their programs), all below one row width.
SHAPES = {
    "p0.w": (3, 11), "p0.b": (11,),
    "p1.w": (13, 2),
    "p2.w": (5, 3, 2), "p2.b": (17,),
    "p3.w": (19,),
    "p4.w": (2, 23), "p4.b": (23,), "p4.c": (3,),
    "p5.w": (29, 1),
}
BLOCKS = [f"p{i}." for i in range(6)]


class _Compiles:
    """Counts XLA backend compilations while active."""

    def __init__(self):
        self.count, self.on = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event, duration, **_):
        if self.on and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        self.count, self.on = 0, True
        return self

    def __exit__(self, *exc):
        self.on = False


@pytest.fixture(scope="module")
def compiles():
    return _Compiles()


def _per_parameter(monkeypatch):
    monkeypatch.setattr(_flat, "applies", lambda method, x: False)


def _assert_same_model(a, b):
    assert all(a.groups(blk) == b.groups(blk) for blk in BLOCKS)
    for t in range(a.n):
        x, y = a.params_for_task(t), b.params_for_task(t)
        assert x.keys() == y.keys()
        for k in x:
            u, v = np.asarray(x[k]), np.asarray(y[k])
            assert u.dtype == v.dtype, k
            np.testing.assert_array_equal(u.view(np.uint8), v.view(np.uint8), err_msg=k)


def test_cut_programs_do_not_grow_with_block_structures(compiles):
    base, fts = random_case(3, n=6, shapes=SHAPES)
    plan = fm.plan(base, fts, blocks=BLOCKS, method=M.ties(1.1))
    with compiles:
        cut = plan.at_size(2.0)
    assert any(len(g) > 1 for b in BLOCKS for g in cut.groups(b))  # merges happened
    # One row width for all six structures: one merge program (and at most
    # the float32 conversion of the hyperparameters). The per-parameter
    # programs compiled a merge and an add per structure and group count.
    assert compiles.count <= 2


@pytest.mark.parametrize("make", [
    lambda: M.ties(1.2, keep=0.4),
    lambda: M.ties(0.8, merge_func="max"),
    lambda: M.task_arithmetic(0.7, convention="sum"),
    lambda: M.consensus_ta(1.1, consensus=0.5),
    lambda: M.magmax(0.9),
], ids=["ties_trim", "ties_max", "ta_sum", "consensus_ta", "magmax"])
def test_flat_cut_equals_per_parameter_cut(make, monkeypatch):
    base, fts = random_case(5, n=6, shapes=SHAPES)
    base = {**base, "p2.b": base["p2.b"].astype(jnp.bfloat16)}  # a mixed-dtype block
    fts = [{**f, "p2.b": f["p2.b"].astype(jnp.bfloat16)} for f in fts]
    plan = fm.plan(base, fts, blocks=BLOCKS, method=make())
    for size in (plan.min_size, 3.0):
        flat = plan.at_size(size)
        with monkeypatch.context() as m:
            _per_parameter(m)
            ref = plan.at_size(size)
        _assert_same_model(flat, ref)


def test_bucket_widths():
    widths = [_flat.bucket(d) for d in range(1, 1 << 20, 997)]
    for d, w in zip(range(1, 1 << 20, 997), widths):
        assert w >= d and (w == _flat.MIN_WIDTH or w < 1.25 * d)
    assert widths == sorted(widths)
    # a factor of two in sizes spans at most five widths
    assert len({_flat.bucket(d) for d in range(1 << 16, 1 << 17)}) <= 5


def test_block_majority_is_exact_past_float32_integers():
    # 2^24 positive and 2^24 + 1 negative signs in two tensors: the total is
    # -1, but a float32 sum of the second tensor rounds to -2^24 (total 0,
    # majority +1), while the same signs as one flat row sum to -1.
    from flexmerge_jax.methods._common import block_majority

    n = 1 << 24
    pos, neg = jnp.ones((n,), jnp.float32), -jnp.ones((n + 1,), jnp.float32)
    assert float(block_majority([pos, neg])) == -1.0
    assert float(block_majority([jnp.concatenate([pos, neg])])) == -1.0
