"""The CPython set-order emulation used for the reference's exact tie-breaking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmerge_jax.schedule.pyset import max_table_size, set_positions


@pytest.mark.parametrize("n", [2, 5, 8, 9, 12, 17, 30, 33, 64, 129])
def test_matches_cpython_set_iteration_order(n):
    fn = jax.jit(set_positions)
    rng = np.random.default_rng(n)
    for _ in range(25):
        g = int(rng.integers(1, n + 1))
        keys = rng.choice(n, size=g, replace=False)
        roots = rng.choice(keys, size=n)
        roots[rng.choice(n, size=g, replace=False)] = keys
        order = list(set(int(r) for r in roots))  # what the reference iterates
        exp = np.full(n, n)
        exp[order] = np.arange(len(order))
        np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(roots, jnp.int32))), exp)


def test_wraparound_example():
    # 3 groups with roots 9, 1, 8 (n = 10): in the 8-slot table 9 takes slot 1,
    # 1 collides there and moves to slot (5*1 + 1) & 7 = 6, 8 takes slot 0.
    roots = np.array([9, 1, 9, 8, 8, 1, 9, 9, 8, 1])
    assert list(set(roots.tolist())) == [8, 9, 1]
    pos = np.asarray(set_positions(jnp.asarray(roots, jnp.int32)))
    assert pos[8] == 0 and pos[9] == 1 and pos[1] == 2


def test_max_table_size():
    assert max_table_size(4) == 8
    assert max_table_size(5) == 32
    assert max_table_size(19) == 128


def test_vmapped_over_blocks_matches_cpython():
    """As the greedy loop uses it: one row of roots per block, vmapped."""
    n = 30
    rng = np.random.default_rng(5)
    rows = []
    for _ in range(16):
        g = int(rng.integers(1, n + 1))
        keys = rng.choice(n, size=g, replace=False)
        r = rng.choice(keys, size=n)
        r[rng.choice(n, size=g, replace=False)] = keys
        rows.append(r)
    got = np.asarray(jax.jit(jax.vmap(set_positions))(jnp.asarray(np.stack(rows), jnp.int32)))
    for r, p in zip(rows, got):
        order = list(set(int(v) for v in r))
        exp = np.full(n, n)
        exp[order] = np.arange(len(order))
        np.testing.assert_array_equal(p, exp)
