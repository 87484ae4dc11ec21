"""A method defined outside the package, used like a built-in one.

``clipped_mean`` is written here the way ``docs/adding_a_method.md`` tells
a user to: a pure ``merge`` function and a factory returning
``fm.methods.Method``. Results are checked against NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm

from conftest import random_case

BLOCKS = ["l1.mlp", "l1.attn", "l0.mlp", "l0.attn", "emb"]


def _merge(x, members, state, *, scale, clip):
    """scale * clip(mean of the members' task vectors, -clip, clip)."""
    del state
    n = next(iter(x.values())).shape[0]
    members = jnp.ones((n,), bool) if members is None else members
    m = jnp.sum(members, dtype=jnp.float32)

    def leaf(v):
        w = members.reshape((-1,) + (1,) * (v.ndim - 1))
        return scale * jnp.clip(jnp.sum(jnp.where(w, v, 0.0), axis=0) / m, -clip, clip)

    return fm.methods.GroupMerge({k: leaf(v) for k, v in x.items()}, None, None)


def clipped_mean(scale=1.0, clip: float = 0.004) -> fm.methods.Method:
    return fm.methods.Method("clipped_mean", _merge, numeric=(("scale", scale),),
                             static=(("clip", clip),))


def _expected(base, fts, groups_of_tasks, scale, clip):
    """NumPy: each task's params when ``groups_of_tasks`` (one per task) are merged."""
    out = []
    for members in groups_of_tasks:
        p = {}
        for k in base:
            tv = np.stack([fts[t][k].astype(np.float64) - base[k] for t in members])
            v = scale * np.clip(tv.mean(0), -clip, clip) if len(members) > 1 else tv[0]
            p[k] = base[k] + v
        out.append(p)
    return out


def test_custom_method_merges_plans_sweeps_saves_and_loads(tmp_path):
    base, fts = random_case(3, n=4)
    m = clipped_mean(1.5, clip=0.004)
    merged = fm.merge(base, fts, m, blocks=BLOCKS)
    want = _expected(base, fts, [range(4)], 1.5, 0.004)[0]
    for k in base:
        np.testing.assert_allclose(np.asarray(merged[k]), want[k], rtol=1e-6, atol=1e-7)

    p = fm.plan(base, fts, blocks=BLOCKS, method=m, linkage=None)
    assert p.method is m
    for step in (p.num_steps // 2, p.num_steps):
        cut = p.at_step(step)
        parts = p.partition_at(step)
        for t in range(4):
            got = cut.params_for_task(t)
            for blk, groups in parts.items():
                g = next(g for g in groups if t in g)
                exp = _expected(base, fts, [g], 1.5, 0.004)[0]
                for k in p.partition.blocks[[b.name for b in p.partition.blocks].index(blk)].leaves:
                    np.testing.assert_allclose(np.asarray(got[k]), exp[k], rtol=1e-6, atol=1e-7)

    res = fm.sweep((base, fts), lambda params, t: float(np.mean(params["emb"])), sizes=[1, 4],
                   methods=[m, "ta"], blocks=BLOCKS, progress=False)
    assert set(res.methods) == {"clipped_mean", "ta"}
    assert res.methods["clipped_mean"]["clip"] == 0.004
    assert len(res.curve("clipped_mean")) == 2

    fm.save(tmp_path / "plan", p)
    with pytest.raises(ValueError, match="custom method 'clipped_mean'.*pass it again"):
        fm.load(tmp_path / "plan")
    with pytest.raises(ValueError, match="made with"):
        fm.load(tmp_path / "plan", base=base, finetuned=fts, method=clipped_mean(1.0))
    q = fm.load(tmp_path / "plan", base=base, finetuned=fts, method=m)
    assert q.events == p.events
    a, b = q.at_step(3).params_for_task(2), p.at_step(3).params_for_task(2)
    for k in base:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))

    fm.save(tmp_path / "model", p.at_step(3))
    with pytest.raises(ValueError, match="custom method"):
        fm.load(tmp_path / "model")
    assert fm.load(tmp_path / "model", method=m).method is m


def test_custom_method_is_traceable():
    base, fts = random_case(3, n=4)
    scales = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)
    f = jax.jit(jax.vmap(lambda s: fm.merge(base, fts, clipped_mean(s), blocks=BLOCKS)))
    got = f(scales)
    for i, s in enumerate([0.5, 1.0, 2.0]):
        one = fm.merge(base, fts, clipped_mean(s), blocks=BLOCKS)
        for k in base:
            np.testing.assert_allclose(np.asarray(got[k][i]), np.asarray(one[k]),
                                       rtol=1e-6, atol=1e-7)


def test_builtin_record_round_trips_and_checks_a_given_method():
    m = fm.methods.dare(fm.methods.ties(1.2), drop=0.3, seed=5)
    assert fm.methods.from_json(m.to_json()) == m
    assert fm.methods.from_json(m.to_json(), m) is m
    with pytest.raises(ValueError, match="made with"):
        fm.methods.from_json(m.to_json(), fm.methods.ties(1.2))
