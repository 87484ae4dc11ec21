"""Batched multi-task serving (flexmerge_jax.serve) against per-task apply."""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import serve
from flexmerge_jax import zoo as zoo_mod
from flexmerge_jax.blocks import UnmatchedParametersWarning
from flexmerge_jax.zoo import apply as F

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def z3():
    return zoo_mod.load().subset(3, 64)


@pytest.fixture(scope="module")
def heads3(z3):
    return zoo_mod.padded_heads(z3.heads)


@pytest.fixture(scope="module")
def plans(z3):
    return {
        m: fm.plan(z3.base, z3.finetuned, blocks="vit", method=m, task_names=z3.task_names)
        for m in ("ta", "emr")
    }


def mixed_batch(z, seed=0, per=(7, 4, 9), shuffle=True):
    """Images of several tasks in random order (unequal counts)."""
    rng = np.random.default_rng(seed)
    imgs, tids = [], []
    for t, k in enumerate(per):
        if k:
            idx = rng.choice(len(z.test_sets[t].labels), k, replace=False)
            imgs.append(z.test_sets[t].images[idx])
            tids.append(np.full(k, t, np.int32))
    imgs, tids = np.concatenate(imgs), np.concatenate(tids)
    if shuffle:
        p = rng.permutation(len(tids))
        imgs, tids = imgs[p], tids[p]
    return imgs, tids


def per_task_logits(params, images):
    return F.logits(params, params["head"], images)


def check_logits(out, ref):
    out = np.asarray(out)
    assert out.shape == ref.shape
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(out), fin)
    np.testing.assert_array_equal(out[~fin], ref[~fin])  # padded classes: -inf
    np.testing.assert_allclose(out[fin], ref[fin], **TOL)


def reference(model, imgs, tids, heads):
    return serve.apply_per_task(model, per_task_logits, tids, imgs, per_task={"head": heads})


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize(
    "method,size",
    [pytest.param("ta", 3.0, marks=pytest.mark.slow), ("ta", 2.0), ("ta", 1.5), ("ta", 1.0),
     ("emr", 3.0), ("emr", 2.5), ("emr", 0.0)],
)
def test_served_equals_per_task(z3, heads3, plans, method, size):
    plan = plans[method]
    model = plan.at_size(max(size, plan.min_size))
    sets = {len(b.sets) for b in model.blocks.values()}
    if method == "emr" and size < 3:
        assert any(b.masked.any() for b in model.blocks.values())
    if 1.0 < size < 3.0:  # a real intermediate cut: shared and unshared blocks
        assert 1.0 < model.n_models < 3.0 and min(sets) < 3 and max(sets) > 1
    srv = serve.Server(model, zoo_mod.vit_forward, per_task={"head": heads3})
    for seed, per in [(0, (7, 4, 9)), (1, (0, 12, 8))]:  # every task; a task absent
        imgs, tids = mixed_batch(z3, seed, per)
        check_logits(srv(tids, imgs), reference(model, imgs, tids, heads3))
    assert srv.traces == 1  # two task mixes, one compilation


@pytest.mark.parametrize("impl,presort", [("tiled", True), ("ragged", True), ("scan", False),
                                          pytest.param("tiled", False, marks=pytest.mark.slow)])
def test_impls_and_sorting(z3, heads3, plans, impl, presort):
    model = plans["emr"].at_size(2.5)
    imgs, tids = mixed_batch(z3, 3)
    srv = serve.Server(model, zoo_mod.vit_forward, per_task={"head": heads3}, dense_impl=impl,
                       presort=presort, tile=8)
    check_logits(srv(tids, imgs), reference(model, imgs, tids, heads3))


def test_masked_and_unmasked_sets_in_one_block():
    """EMR on 4 tasks: a masked group of 3 next to a singleton in one block."""
    z4 = zoo_mod.load().subset(4, 16)
    plan = fm.plan(z4.base, z4.finetuned, blocks="vit", method="emr", task_names=z4.task_names)
    step = next(
        s for s in range(plan.num_steps + 1)
        if any(max(map(len, g)) >= 3 and min(map(len, g)) == 1
               for g in plan.partition_at(s).values())
    )
    model = plan.at_step(step)
    mixed = [b for b in model.blocks.values() if b.masked.any() and (~b.masked).any()]
    assert mixed
    heads = zoo_mod.padded_heads(z4.heads)
    srv = serve.Server(model, zoo_mod.vit_forward, per_task={"head": heads})
    imgs, tids = mixed_batch(z4, 5, (5, 3, 6, 4))
    check_logits(srv(tids, imgs), reference(model, imgs, tids, heads))
    st = srv.state.blocks[mixed[0].name]
    assert st.num_sets == len(mixed[0].sets) and st.num_masked == 3
    assert st.masks[mixed[0].leaves[0]].dtype == jnp.uint8  # bit-packed


def test_generic_apply_modes(z3, plans):
    """Modules through r.apply (segment and gather) with the plain zoo functions."""
    model = plans["ta"].at_size(2.0)

    def forward(r, images, mode):
        x = F.patchify(F.preprocess(images), 7)
        x = r.apply("embed/patch", F.dense, x, mode=mode)
        cls, pos = r.param("embed/cls"), r.param("embed/pos")
        x = jnp.concatenate([cls[:, None, :], x], axis=1) + pos
        x = r.apply("ln_pre", F.layer_norm, x, mode=mode)
        for i in range(4):
            x = r.apply(f"blocks/{i}", F.block, x, mode=mode)  # several blocks: by task
            # equivalently per block: ln_1 / attn / ln_2 / mlp
        f = r.apply("ln_post", F.layer_norm, x[:, 0], mode=mode)
        return r.dense("proj", f, bias=None)

    def forward_blocks(r, images, mode):
        x = F.patchify(F.preprocess(images), 7)
        x = r.dense("embed/patch", x)
        x = jnp.concatenate([r.param("embed/cls")[:, None, :], x], axis=1) + r.param("embed/pos")
        x = r.apply("ln_pre", F.layer_norm, x, mode=mode)
        for i in range(4):
            p = f"blocks/{i}"
            h = r.apply(f"{p}/ln_1", F.layer_norm, x, mode=mode)
            x = x + r.apply(f"{p}/attn", F.attn_apply, h, mode=mode)
            h = r.apply(f"{p}/ln_2", F.layer_norm, x, mode=mode)
            x = x + r.apply(f"{p}/mlp", F.mlp_apply, h, mode=mode)
        return r.dense("proj", r.apply("ln_post", F.layer_norm, x[:, 0], mode=mode), bias=None)

    imgs, tids = mixed_batch(z3, 7)
    ref = serve.apply_per_task(model, F.features, tids, imgs)
    state = serve.stack(model)
    for fwd, mode in [(forward, "segment"), (forward_blocks, "segment"),
                      (forward_blocks, "gather")]:
        run = partial(serve.run, partial(fwd, mode=mode), presort=mode == "gather")
        out = jax.jit(run)(state, tids, imgs)
        np.testing.assert_allclose(np.asarray(out), ref, **TOL)


# --------------------------------------------------------------------------- compilation


def test_one_compilation_for_mixes_and_routings(z3, heads3, plans):
    model = plans["ta"].at_size(3.0)  # every block: 3 singleton sets
    srv = serve.Server(model, zoo_mod.vit_forward, per_task={"head": heads3})
    imgs, tids = mixed_batch(z3, 0, (8, 8, 8))
    rng = np.random.default_rng(0)
    for t in [tids, rng.permutation(tids), np.zeros_like(tids), np.full_like(tids, 2),
              rng.integers(0, 3, len(tids)).astype(np.int32)]:
        check_logits(srv(t, imgs), reference(model, imgs, t, heads3))
    # A different routing with the same set counts: task t -> set perm[t] in every block.
    perm = np.array([2, 0, 1], np.int32)
    state = srv.state
    rerouted = serve.ServeState(
        {k: serve.BlockStack(b.sets, b.variant[perm] if b.kind == "block" else b.variant,
                             b.base, b.masks, b.mask_set, b.rescalers, b.name, b.leaves,
                             b.shapes, b.kind, b.packed)
         for k, b in state.blocks.items()},
        state.task_names,
    )
    srv.swap(rerouted)
    out = np.asarray(srv(tids, imgs))
    # row of task t: backbone of task perm[t], head of task t
    fts = [jax.tree.map(jnp.asarray, f) for f in z3.finetuned]
    for t in range(3):
        rows = tids == t
        ref = F.logits(fts[perm[t]], z3.heads[t], imgs[rows])
        np.testing.assert_allclose(out[rows, : ref.shape[1]], np.asarray(ref), **TOL)
    assert srv.traces == 1
    if hasattr(srv._jit, "_cache_size"):  # the jit cache agrees
        assert srv._jit._cache_size() == 1


def test_grouped_matmul_all_impls():
    rng = np.random.default_rng(0)
    g, k, n = 4, 6, 5
    gm = jax.jit(serve.grouped_matmul, static_argnames=("impl", "tile"))
    w = jnp.asarray(rng.standard_normal((g, k, n)).astype(np.float32))
    for sizes in ([3, 0, 10, 4], [0, 0, 17, 0], [5, 5, 5, 2]):
        m = sum(sizes)
        x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        grp = np.repeat(np.arange(g), sizes)
        ref = np.einsum("mk,mkn->mn", np.asarray(x), np.asarray(w)[grp])
        for impl in ("tiled", "scan", "ragged"):
            for tile in (None, 8):
                y = gm(x, w, jnp.asarray(sizes), impl=impl, tile=tile)
                np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
        # segments with explicit kernels (several segments, one kernel)
        ids = np.array([2, 2, 0, 1, 2], np.int32)
        seg = [2, 3, 4, 0, m - 9] if m >= 9 else [m, 0, 0, 0, 0]
        grp = np.repeat(ids, seg)
        ref = np.einsum("mk,mkn->mn", np.asarray(x), np.asarray(w)[grp])
        for impl in ("tiled", "scan", "ragged"):
            y = gm(x, w, jnp.asarray(seg), group_ids=jnp.asarray(ids), impl=impl)
            np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("method,size", [("ta", 3.0), ("ta", 2.0), ("ta", 1.0), ("emr", 2.5),
                                         ("emr", 0.0)])
def test_memory_is_n_models(z3, heads3, plans, method, size):
    plan = plans[method]
    model = plan.at_size(max(size, plan.min_size))
    state = serve.stack(model, per_task={"head": heads3})
    nb = state.nbytes()
    P = model.partition.total
    mask_entries = sum(len(b.masks) * p.numel for b, p in
                       zip(model.blocks.values(), model.partition.blocks))
    # sets + bases: exactly the model's stored parameters without the mask term
    assert nb["params"] == 4 * (model.stored_parameters() - mask_entries / 32)
    # masks: one bit per entry, each leaf's bits padded to a byte
    packed = sum(len(b.masks) * math.ceil(math.prod(np.shape(b.base[k])) / 8)
                 for b in model.blocks.values() if b.masks for k in b.leaves)
    assert nb["masks"] == packed
    assert (abs(state.stored_parameters() - model.stored_parameters())
            <= 8 * len(model.blocks) * model.n / 32)
    assert state.stored_parameters() == pytest.approx(model.n_models * P, rel=1e-12, abs=1)
    # held bytes: n_models * P * 4 + per-task heads + small routing tables
    heads = sum(np.asarray(h[k]).nbytes for h in heads3 for k in h)
    assert nb["per_task"] == heads
    assert nb["tables"] <= 4 * (model.n + 2 * model.n) * (len(model.blocks) + 1)
    assert nb["total"] - heads - nb["tables"] == pytest.approx(4 * model.n_models * P, abs=64)
    for b in model.blocks.values():  # g_b stacked sets, never per task
        assert state.blocks[b.name].num_sets == len(b.sets)


def test_unmatched_parameters_and_dtype(z3, heads3):
    """Parameters outside every block stay per task and are served per task."""
    names = fm.blocks.vit().block_names(F.leaf_names(z3.config.depth))
    names = [b for b in names if b not in ("proj", "embed/cls")]
    with pytest.warns(UnmatchedParametersWarning):
        plan = fm.plan(z3.base, z3.finetuned, blocks=names, method="ta")
    model = plan.at_size(plan.min_size)
    state = serve.stack(model, per_task={"head": heads3})
    assert state.blocks["proj/kernel"].kind == "unmatched"
    assert state.stored_parameters() == pytest.approx(model.stored_parameters())
    srv = serve.Server(state, zoo_mod.vit_forward)
    imgs, tids = mixed_batch(z3, 11)
    check_logits(srv(tids, imgs), reference(model, imgs, tids, heads3))
    bf = serve.Server(model, zoo_mod.vit_forward, per_task={"head": heads3}, dtype=jnp.bfloat16)
    assert bf.state.nbytes()["params"] == state.nbytes()["params"] // 2
    out = np.asarray(bf(tids, imgs)).astype(np.float32)
    ref = reference(model, imgs, tids, heads3)
    fin = np.isfinite(ref)
    assert np.mean(np.argmax(np.where(fin, out, -np.inf), 1) == np.argmax(ref, 1)) > 0.9


def test_validation(z3, heads3, plans):
    model = plans["ta"].at_size(1.0)
    srv = serve.Server(model, zoo_mod.vit_forward, per_task={"head": heads3})
    imgs, tids = mixed_batch(z3, 0)
    with pytest.raises(ValueError, match="task_ids"):
        srv(np.full_like(tids, 3), imgs)
    with pytest.raises(ValueError, match="one per task"):
        serve.stack(model, per_task={"head": heads3[:2]})
    with pytest.raises(ValueError, match="differs"):
        serve.stack(model, per_task={"head": z3.heads})  # unpadded heads
    with pytest.raises(ValueError, match="impl"):
        serve.grouped_matmul(jnp.ones((4, 2)), jnp.ones((1, 2, 2)), jnp.array([4]), impl="x")
    r = serve.Router(srv.state, jnp.asarray(tids))
    with pytest.raises(KeyError, match="nowhere"):
        r.params("nowhere")


# --------------------------------------------------------------------------- nnx example


def test_nnx_example():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import serve_nnx
    finally:
        sys.path.pop(0)
    res = serve_nnx.main(n_tasks=3, batch=16, sizes=(1.5,), reps=1)
    assert all(v["max_err"] < 1e-4 and v["traces"] == 1 for v in res.values())
    assert 1.0 < res[1.5]["n_models"] < 3.0


def test_apply_per_task_with_one_value_per_row():
    from conftest import random_case

    base, fts = random_case(2, n=3)
    model = fm.plan(base, fts, method="ta").at_size(2.0)
    fn = lambda p, x: x @ p["l0.mlp.w"] @ np.ones((7,), np.float32)  # [rows]
    tids = np.array([2, 0, 1, 0, 2])
    x = np.random.default_rng(0).standard_normal((5, 5)).astype(np.float32)
    got = serve.apply_per_task(model, fn, tids, x)
    exp = [np.asarray(fn(model.params_for_task(int(t)), x[i:i + 1]))[0] for i, t in enumerate(tids)]
    assert got.shape == (5,)
    np.testing.assert_allclose(got, exp, rtol=1e-6)
