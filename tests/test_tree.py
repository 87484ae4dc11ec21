"""Pytree layer: names, task vectors and their inverse, input checks."""

import jax
import numpy as np
import pytest

from flexmerge_jax import tree


def test_leaf_names():
    t = {"a.b": 1.0, "blocks": {"0": {"w": 2.0}, "1": [3.0, 4.0]}}
    assert tree.leaf_names(t) == ["a.b", "blocks/0/w", "blocks/1/0", "blocks/1/1"]


def test_task_vectors_and_inverse():
    rng = np.random.default_rng(0)
    base = {"x": {"w": rng.standard_normal((3, 2)).astype(np.float32)}, "b": np.ones(4, np.float32)}
    fts = [
        {"x": {"w": base["x"]["w"] + i}, "b": base["b"] * (i + 2)} for i in range(3)
    ]
    tv = tree.task_vectors(base, fts)
    assert tv["x"]["w"].shape == (3, 3, 2) and tv["b"].shape == (3, 4)
    np.testing.assert_allclose(np.asarray(tv["x"]["w"][2]), 2.0)
    one = tree.apply_task_vector(base, jax.tree.map(lambda t: t[1], tv))
    np.testing.assert_allclose(np.asarray(one["b"]), fts[1]["b"], rtol=1e-6)
    assert one["b"].dtype == np.float32
    full = tree.apply_task_vector(base, {"x": {"w": tv["x"]["w"]}, "b": tv["b"]})
    for i in range(3):
        np.testing.assert_allclose(np.asarray(full["x"]["w"][i]), fts[i]["x"]["w"], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(full["b"][i]), fts[i]["b"], rtol=1e-6)
    parts = tree.unstack(tv)
    assert len(parts) == 3
    restacked = tree.stack(parts)
    np.testing.assert_array_equal(np.asarray(restacked["b"]), np.asarray(tv["b"]))


def _pair():
    base = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    return base, [dict(base), dict(base)]


def test_errors_name_task_and_parameter():
    base, fts = _pair()
    bad = [fts[0], {"a": fts[1]["a"]}]
    with pytest.raises(ValueError, match=r"task 1: parameter 'b' of base is missing"):
        tree.task_vectors(base, bad)
    bad = [fts[0], {**fts[1], "c": np.zeros(1, np.float32)}]
    with pytest.raises(ValueError, match=r"task 1: parameter 'c' is not in base"):
        tree.task_vectors(base, bad)
    bad = [{**fts[0], "a": np.zeros((3, 2), np.float32)}, fts[1]]
    with pytest.raises(ValueError, match=r"task 0: parameter 'a' has shape \(3, 2\)"):
        tree.task_vectors(base, bad)
    bad = [fts[0], {**fts[1], "b": np.zeros(3, np.float64)}]
    with pytest.raises(ValueError, match=r"task 1: parameter 'b' has dtype float64"):
        tree.task_vectors(base, bad)
    bad = [fts[0], {**fts[1], "b": np.array([0, np.nan, 0], np.float32)}]
    with pytest.raises(ValueError, match=r"task 1: the task vector of parameter 'b' has NaN"):
        tree.task_vectors(base, bad)
    with pytest.raises(ValueError, match="at least 2"):
        tree.task_vectors(base, [fts[0]])
    with pytest.raises(ValueError, match="integer|int32"):
        tree.task_vectors({"i": np.zeros(2, np.int32)}, [{"i": np.zeros(2, np.int32)}] * 2)
    with pytest.raises(ValueError, match="sequence"):
        tree.task_vectors(base, {"a": 1})


def test_host_task_vectors_are_aligned_for_zero_copy():
    """Host task vectors start on 64-byte boundaries (XLA's CPU client then
    aliases them instead of copying) and equal f32(ft) - f32(base)."""
    from flexmerge_jax.sources._source import aligned_empty, host_task_vectors

    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((33, 7)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float16)}
    fts = [{k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()}
           for _ in range(3)]
    tv = host_task_vectors(["w", "b"], base, fts, ("a", "b", "c"))
    for k, v in tv.items():
        assert v.ctypes.data % 64 == 0 and v.dtype == np.float32
        want = np.stack([f[k].astype(np.float32) - base[k].astype(np.float32) for f in fts])
        np.testing.assert_array_equal(v, want)
    assert aligned_empty((0, 4), np.float32).shape == (0, 4)
    for shape in [(1,), (3, 5, 7)]:
        a = aligned_empty(shape, np.float64)
        assert a.shape == shape and a.dtype == np.float64 and a.ctypes.data % 64 == 0
