"""Each built-in method's declared traits hold for what its functions compute."""

from contextlib import nullcontext

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax._tune import check_tunable

M = fm.methods
METHODS = [M.get(n) for n in M.NAMES] + [
    M.task_arithmetic(0.7, convention="sum"), M.ties(1.3, merge_func="max"), M.ties(0.8, keep=0.3),
    M.tsv(1.0, k=1)]


def _state(m, x):
    d = sum(v[0].size for v in x.values())
    prepared = m.prepare(lambda: iter(x.values()), d, **dict(m.static)) if m.prepare else None
    return m.shared_state(x, jax.random.key(0), numel=d, prepared=prepared)


@pytest.mark.parametrize("m", METHODS, ids=lambda m: m.describe())
def test_traits_match_what_the_method_computes(m):
    rng = np.random.default_rng(0)
    n = 2 if m.traits.tasks == 2 else 4
    x = {"w": jnp.asarray(rng.standard_normal((n, 3, 5)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal((n, 5)), jnp.float32)}
    members = jnp.asarray([True, False, True, True][:n] if n == 4 else [True, True])
    gm = m.merge_group(x, members, _state(m, x))
    assert (gm.masks is not None) == m.uses_masks == (gm.rescalers is not None)
    assert m.min_merged == (3 if m.uses_masks else 2)
    sel = np.asarray(members)
    for k, v in x.items():
        tv = np.asarray(v, np.float64)[sel]
        lin = m.group_scale * (tv.sum(0) if m.sums else tv.mean(0))
        close = np.allclose(np.asarray(gm.vector[k]), lin, rtol=1e-5, atol=1e-6)
        # Linear: every leaf is scale * mean (sum). Non-linear: at least the
        # matrix leaf is not (some methods take the mean of vector leaves).
        if m.linear or k == "w":
            assert close == m.linear, (m.describe(), k)
    with pytest.raises(ValueError, match="tunable") if not m.traits.tunable else nullcontext():
        check_tunable(m, "min", "cosine")


def test_task_count_trait_is_enforced():
    base = {"w": np.zeros((3,), np.float32)}
    fts = [{"w": np.full((3,), i, np.float32)} for i in range(3)]
    for m in METHODS:
        if m.traits.tasks is not None:
            with pytest.raises(ValueError, match="exactly two models \\(got 3\\)"):
                fm.merge(base, fts, m)
        elif not m.uses_masks:  # (mask methods return a FlexModel)
            assert jax.tree.leaves(fm.merge(base, fts, m))[0].shape == (3,)

