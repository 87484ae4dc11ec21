"""Tests of the shipped real model zoo (flexmerge_jax/zoo)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexmerge_jax import zoo as zoo_mod
from flexmerge_jax.zoo import apply as F

N_TASKS = 8
MIN_GAP = 0.05


@pytest.fixture(scope="module")
def zoo():
    return zoo_mod.load()


def _all_keys_are_str(tree) -> bool:
    if isinstance(tree, dict):
        return all(isinstance(k, str) and _all_keys_are_str(v) for k, v in tree.items())
    return True


def test_leaf_names_and_shapes(zoo):
    cfg = zoo.config
    expected = F.leaf_names(cfg.depth)
    assert len(expected) == 6 + 12 * cfg.depth + 3
    assert expected[:4] == ["embed/patch/kernel", "embed/patch/bias", "embed/cls", "embed/pos"]
    assert expected[-3:] == ["ln_post/scale", "ln_post/bias", "proj/kernel"]
    assert "blocks/0/attn/qkv/kernel" in expected and "blocks/0/mlp/fc2/bias" in expected
    shapes = F.param_shapes(cfg)
    assert zoo.meta["leaf_names"] == expected
    assert (len(zoo.finetuned) == len(zoo.heads) == len(zoo.task_names) == len(zoo.test_sets)
            == N_TASKS)
    assert len(set(zoo.task_names)) == N_TASKS and all(isinstance(n, str) for n in zoo.task_names)
    for p in [zoo.base, *zoo.finetuned]:
        assert _all_keys_are_str(p)
        flat = F.flatten(p)
        assert sorted(flat) == sorted(expected)
        for k, v in flat.items():
            assert isinstance(v, np.ndarray) and v.dtype == np.float32, k
            assert v.shape == shapes[k], (k, v.shape, shapes[k])
            assert np.all(np.isfinite(v)), k
    assert (F.num_params(zoo.base) == zoo.meta["num_params"]
            == sum(int(np.prod(s)) for s in shapes.values()))
    # fine-tuning moved every model away from the base
    for ft in zoo.finetuned:
        qkv = ft["blocks"]["0"]["attn"]["qkv"]["kernel"]
        assert np.abs(qkv - zoo.base["blocks"]["0"]["attn"]["qkv"]["kernel"]).max() > 0
    for head, c in zip(zoo.heads, zoo.num_classes):
        assert set(head) == {"kernel", "bias"}
        assert head["kernel"].shape == (cfg.feat_dim, c) and head["bias"].shape == (c,)
        assert head["kernel"].dtype == np.float32 and head["bias"].dtype == np.float32
    for ts, c in zip(zoo.test_sets, zoo.num_classes):
        assert ts.images.dtype == np.uint8 and ts.images.shape[1:] == (28, 28)
        assert ts.labels.shape == (len(ts.images),) and 300 <= len(ts.labels) <= 1000
        assert ts.labels.min() >= 0 and ts.labels.max() < c
        assert len(np.unique(ts.labels)) == c


def test_files_within_budget_and_match_record():
    sizes = {p.name: p.stat().st_size for p in zoo_mod.DATA_DIR.iterdir() if p.is_file()}
    assert sum(sizes.values()) <= 8_000_000, sizes
    assert max(sizes.values()) < 4_500_000, sizes
    assert {"zoo.json", "LICENSES.md", "base.npz", "heads.npz", "test_sets.npz"} <= set(sizes)
    meta = json.loads((zoo_mod.DATA_DIR / "zoo.json").read_text())
    for name, digest in meta["file_sha256"].items():
        assert hashlib.sha256((zoo_mod.DATA_DIR / name).read_bytes()).hexdigest() == digest, name


def test_record_contents(zoo):
    m = zoo.meta
    for key in ("seed", "config", "hyperparameters", "training", "versions", "datasets",
                "wall_time_s", "summary"):
        assert key in m, key
    assert all(d["license"] for d in m["datasets"].values())
    assert {t["dataset"] for t in m["tasks"]} <= set(m["datasets"])
    for t in m["tasks"]:
        assert t["n_test_shipped"] == len(zoo.test_sets[zoo.task_index(t["name"])].labels)


def test_functional_apply_matches_nnx(zoo):
    pytest.importorskip("flax")
    from flexmerge_jax.zoo import model as M

    params = zoo.finetuned[1]
    module = M.module_from_params(params, zoo.config)
    assert sorted(F.flatten(M.params_from_module(module))) == sorted(F.leaf_names(zoo.config.depth))
    images = zoo.test_sets[0].images[:32]
    ref = np.asarray(M.apply_module(module, images))
    out = np.asarray(jax.jit(F.features)(params, images))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # block-by-block apply gives the same features
    def blockwise(params, images):
        x = F.embed(params, images)
        assert x.shape == (32, zoo.config.num_tokens, zoo.config.width)
        for i in range(zoo.config.depth):
            x = F.block(params["blocks"][str(i)], x, zoo.config.num_heads)
        return F.pool(params, x)

    np.testing.assert_allclose(np.asarray(jax.jit(blockwise)(params, images)), out,
                               rtol=1e-5, atol=1e-5)
    lg = F.head_logits(zoo.heads[0], out)
    assert lg.shape == (32, zoo.num_classes[0])


def test_recomputed_accuracies_match_record(zoo):
    assert zoo.ft_accuracy is not None and zoo.base_accuracy is not None
    base = zoo.evaluate_all(zoo.base)
    ft = zoo.evaluate_all(zoo.finetuned)
    np.testing.assert_allclose(base, zoo.base_accuracy, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ft, zoo.ft_accuracy, atol=1e-6, rtol=0)
    for name, b, f in zip(zoo.task_names, base, ft):
        assert f >= b + MIN_GAP, (name, b, f)
    assert zoo.evaluate(zoo.finetuned[2], zoo.task_names[2]) == ft[2]


def test_evaluate_compiles_once(zoo):
    zoo.evaluate(zoo.base, 0)
    fn = zoo._evaluator()[0]
    n = fn._cache_size()
    rng = np.random.default_rng(0)
    for i in range(3):
        noisy = jax.tree.map(lambda a: a + 1e-3 * rng.standard_normal(a.shape).astype(np.float32),
                             zoo.base)
        acc = zoo.evaluate(noisy, i)
        assert 0.0 <= acc <= 1.0
        zoo.evaluate(jax.tree.map(jnp.asarray, zoo.finetuned[i]), N_TASKS - 1 - i)
    assert fn._cache_size() == n


def test_load_does_not_import_flax():
    code = (
        "import sys; import flexmerge_jax.zoo as z; zoo = z.load(); "
        "assert 'flax' not in sys.modules, 'flax imported'; print(len(zoo.task_names))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(N_TASKS)
