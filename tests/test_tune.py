"""Validation-tuned lambda (reference --USE_VAL) against an independent slow replay."""

import numpy as np
import pytest

import flexmerge_jax as fm

import reference as ref
from conftest import random_case

GRID = (0.8, 1.0, 1.5, 2.0)
BLOCKS = ["l1.attn", "l1.mlp", "l0.attn", "l0.mlp", "emb"]


def make_case():
    base, fts = random_case(40, n=5)
    rng = np.random.default_rng(40)
    # Validation optimum of task i: base + c_i * tau_i with task-specific c_i,
    # so that different merges prefer different lambdas.
    c = rng.uniform(0.5, 3.0, size=5)
    targets = [{k: base[k] + c[i] * (f[k] - base[k]) for k in base} for i, f in enumerate(fts)]

    def val(params, i):
        return -sum(float(np.sum((np.asarray(params[k], np.float64) - targets[i][k]) ** 2))
                    for k in base)

    return base, fts, val


def slow_replay(base, fts, plan, val, method):
    """Deployed params and chosen lambdas, from the spec's description (§6)."""
    n = len(fts)
    part = ref.assign_blocks(list(base), BLOCKS)
    tvs = ref.task_vectors(base, fts)
    w = [{k: np.float64(v) for k, v in f.items()} for f in fts]
    masks: list[dict] = [{} for _ in range(n)]
    chosen = []

    def deployed(i, block_params, block, leaves):
        """Task i's parameters with ``block_params`` in ``block``, under task i's mask there."""
        p = dict(w[i])
        p.update(block_params)
        if block in masks[i]:
            for k in leaves:
                p[k] = base[k] + (p[k] - base[k]) * masks[i][block][k]
        return p

    for e in plan.events:
        group = sorted(e.members_a + e.members_b)
        if method.uses_masks and len(group) <= 2:
            chosen.append(None)
            continue
        leaves = part[e.block]
        xs = [{k: tvs[i][k] for k in leaves} for i in group]
        u = ref.ta_ref(xs, 1.0) if method.name.endswith("ta") else ref.ties_ref(xs, 1.0)
        best, best_score = None, -np.inf
        for lam in GRID:
            cand = {k: base[k] + lam * u[k] for k in leaves}
            score = np.mean([val(deployed(i, cand, e.block, leaves), i) for i in group])
            if score > best_score:
                best, best_score = lam, score
        chosen.append(best)
        v = {k: best * u[k] for k in leaves}
        if method.uses_masks:
            mk = ref.consensus_masks_ref(xs, v, method.hyper()["consensus"])
            for j, i in enumerate(group):
                masks[i][e.block] = mk[j]
        for i in group:
            w[i].update({k: base[k] + v[k] for k in leaves})
    out = []
    for i in range(n):
        p = dict(w[i])
        for blk, mk in masks[i].items():
            for k in part[blk]:
                p[k] = base[k] + (p[k] - base[k]) * mk[k]
        out.append(p)
    return chosen, out


@pytest.mark.parametrize("method",
                         [fm.methods.task_arithmetic(1.0), fm.methods.consensus_ta(1.0, 0.3)],
                         ids=lambda m: m.name)
def test_tuned_lambdas_and_models_match_slow_replay(method):
    base, fts, val = make_case()
    p = fm.plan(base, fts, blocks=BLOCKS, method=method, tune=fm.Tuning(val, GRID), progress=False)
    chosen, final = slow_replay(base, fts, p, val, method)
    assert p.scales == chosen
    assert len({c for c in chosen if c is not None}) > 1  # the test exercises several lambdas
    model = p.at_step(p.num_steps)
    for i in range(5):
        got = model.params_for_task(i)
        for k in base:
            np.testing.assert_allclose(np.asarray(got[k], np.float64), final[i][k],
                                       rtol=1e-5, atol=1e-6)
    untuned = fm.plan(base, fts, blocks=BLOCKS, method=method)
    assert untuned.events == p.events  # the schedule does not depend on lambda


def test_tuning_survives_save_load(tmp_path):
    base, fts, val = make_case()
    p = fm.plan(base, fts, blocks=BLOCKS, method="ties", tune=fm.Tuning(val, GRID, start=0.5),
                progress=False)
    first = int(0.5 * p.num_steps)
    assert all(s == 1.0 for s in p.scales[:first])
    fm.save(tmp_path / "p", p)
    q = fm.load(tmp_path / "p", base=base, finetuned=fts)
    assert q.scales == p.scales
    a, b = p.at_size(2.0), q.at_size(2.0)
    for k in base:
        np.testing.assert_array_equal(np.asarray(a.params_for_task(1)[k]),
                                      np.asarray(b.params_for_task(1)[k]))


def test_untunable_configurations():
    base, fts, val = make_case()
    with pytest.raises(ValueError, match="tunable scale.*; not emr"):
        fm.plan(base, fts, method="emr", tune=fm.Tuning(val))
    with pytest.raises(ValueError, match="euclidean"):
        fm.plan(base, fts, method="ta", linkage=None, similarity="euclidean", tune=fm.Tuning(val))
    with pytest.raises(ValueError, match="start"):
        fm.Tuning(val, start=2.0)
