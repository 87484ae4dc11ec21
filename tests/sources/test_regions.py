"""Regions of parameters read as byte ranges (what each host of a mesh reads)."""

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from flexmerge_jax.sources import files
from flexmerge_jax.sources._source import region_runs


def _random_region(rng, shape):
    out = []
    for n in shape:
        a = int(rng.integers(0, n))
        out.append(slice(a, int(rng.integers(a + 1, n + 1))) if rng.random() < 0.7 else slice(None))
    return tuple(out)


@pytest.mark.parametrize("seed", range(20))
def test_region_runs_cover_exactly_the_region_in_c_order(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(d) for d in rng.integers(1, 6, size=int(rng.integers(0, 5))))
    idx = _random_region(rng, shape)
    starts, length = region_runs(shape, idx)
    flat = np.arange(int(np.prod(shape)), dtype=np.int64)
    got = (starts[:, None] + np.arange(length)).reshape(-1)
    np.testing.assert_array_equal(got, flat.reshape(shape)[idx].reshape(-1))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_read_region_equals_slice_of_whole_read(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(6, 8, 5)).astype(dtype), "b": rng.normal(size=7).astype(dtype),
              "s": np.asarray(1.5, dtype)}
    save_file(arrays, str(tmp_path / "p.safetensors"))
    np.savez(tmp_path / "p.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
    src = files.path_source(tmp_path / "p.safetensors", [tmp_path / "p.safetensors"] * 2)
    npz = files.path_source(tmp_path / "p.npz", [tmp_path / "p.npz"] * 2)
    for k, idx in [("w", (slice(None), slice(2, 6), slice(None))), ("w", (slice(1, 3),) * 3),
                   ("b", (slice(3, 7),)), ("s", ())]:
        got = src.base_region(k, idx)
        assert got.dtype == arrays[k].dtype
        np.testing.assert_array_equal(got, arrays[k][idx])
        np.testing.assert_array_equal(src.finetuned_region(k, idx, [1])[0], arrays[k][idx])
        np.testing.assert_array_equal(npz.base_region(k, idx), arrays[k].astype(np.float32)[idx])
