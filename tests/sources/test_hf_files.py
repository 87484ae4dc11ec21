"""Params paths as users have them: Hugging Face model directories (one
``model.safetensors`` or an index and its shards), the index file, single
files, and the files we refuse (a lone shard, PyTorch pickles)."""

import ml_dtypes
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax.cli import main
from flexmerge_jax.sources import files as fio

from conftest import random_case, write_hf_dir

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def hf_case(tmp_path, shards, dtype="float32", n=3):
    base, fts = random_case(11, n=n)
    cast = lambda t: {k: v.astype(DTYPES[dtype]) for k, v in t.items()}  # noqa: E731
    base, fts = cast(base), [cast(f) for f in fts]
    b = write_hf_dir(tmp_path / "base", base, shards)
    paths = [write_hf_dir(tmp_path / f"task{i}", f, shards) for i, f in enumerate(fts)]
    return base, fts, b, paths


def assert_same_tree(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shards", [1, 3])
def test_hf_directory_plans_like_memory_with_dtypes_kept(tmp_path, shards, dtype):
    base, fts, b, paths = hf_case(tmp_path, shards, dtype)
    assert fio.detect_format(b) == "hf"
    assert_same_tree(fio.load_params(b), base)
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        from_files = fm.plan(b, paths, blocks=["l1.", "l0."], method="ties")
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        in_memory = fm.plan(base, fts, blocks=["l1.", "l0."], method="ties")
    assert from_files.task_names == ("task0", "task1", "task2")
    np.testing.assert_array_equal(from_files.sizes, in_memory.sizes)
    for t in range(3):
        assert_same_tree(from_files.at_size(2.0).params_for_task(t),
                         in_memory.at_size(2.0).params_for_task(t))


def test_index_file_and_single_files_are_inputs(tmp_path):
    base, fts, b, paths = hf_case(tmp_path, 2)
    index = b / "model.safetensors.index.json"
    assert fio.detect_format(index) == "hf" and fio.task_name(index) == "base"
    assert_same_tree(fio.load_params(index), base)
    single = write_hf_dir(tmp_path / "single", base)
    assert_same_tree(fio.load_params(single / "model.safetensors"), base)
    fio.save_params(tmp_path / "base.npz", base)
    merged = fm.merge(index, [p / "model.safetensors.index.json" for p in paths], "ta")
    want = fm.merge(base, fts, "ta")
    assert_same_tree(merged, want)
    assert_same_tree(fm.merge(tmp_path / "base.npz", paths, "ta"), want)


def test_sharded_reads_open_only_the_shards_holding_the_tensors(tmp_path, monkeypatch):
    base, _, b, _ = hf_case(tmp_path, 3)
    r = fio._Reader(b)
    opened = []
    real = fio._Reader._read_safetensors
    monkeypatch.setattr(fio._Reader, "_read_safetensors",
                        lambda self, names: opened.append((self.file.name, list(names)))
                        or real(self, names))
    shard_of = r.shard_map()
    one = sorted(base)[0]
    assert_same_tree(r.read([one]), {one: base[one]})
    assert opened == [(shard_of[one], [one])]
    runs = r.read_runs([(k, np.array([0]), 2) for k in sorted(base)])
    for k, got in zip(sorted(base), runs):
        np.testing.assert_array_equal(got, base[k].reshape(1, -1)[:, :2])
    opened.clear()
    w = next(k for k in sorted(base) if base[k].ndim == 2)
    region = (slice(1, 3), slice(2, 5))
    np.testing.assert_array_equal(r.read_region(w, region), base[w][region])
    assert opened == []  # byte ranges of the one shard, not the tensor read whole


def test_a_lone_shard_is_refused_naming_its_index(tmp_path, capsys):
    _, _, b, paths = hf_case(tmp_path, 2)
    shard = b / "model-00001-of-00002.safetensors"
    with pytest.raises(ValueError, match="one shard of the sharded checkpoint "
                                         ".*model.safetensors.index.json"):
        fio.load_params(shard)
    with pytest.raises(ValueError, match="one shard"):
        fm.plan(shard, [p / "model-00001-of-00002.safetensors" for p in paths])
    code = main(["merge", "--base", str(shard), "--finetuned", *map(str, paths),
                 "--method", "ta", "--size", "1", "--out", str(tmp_path / "m")])
    assert code == 2 and "index.json" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_broken_sharded_checkpoints_are_named(tmp_path):
    _, _, b, _ = hf_case(tmp_path, 2)
    (b / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="lists the shard model-00002-of-00002.safetensors"):
        fio.load_params(b)
    (b / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match="not a safetensors index"):
        fio.load_params(b)


def test_pytorch_pickles_are_refused_with_how_to_convert(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    for p in (tmp_path / "pytorch_model.bin", tmp_path):
        with pytest.raises(ValueError, match="PyTorch pickle.*convert it to safetensors"):
            fio.load_params(p)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither an Orbax checkpoint nor a Hugging Face"):
        fio.load_params(tmp_path / "empty")


def test_cli_and_adapters_take_hf_directories(tmp_path, capsys):
    base, fts, b, paths = hf_case(tmp_path, 2)
    code = main(["merge", "--base", str(b), "--finetuned", *map(str, paths), "--method", "ta",
                 "--size", "2", "--out", str(tmp_path / "m")])
    assert code == 0, capsys.readouterr().err
    model = fm.load(tmp_path / "m")
    assert model.task_names == ("task0", "task1", "task2")
    want = fm.plan(base, fts, method="ta")
    assert_same_tree(model.params_for_task(1), want.at_step(model.step).params_for_task(1))
    from flexmerge_jax import adapters

    assert_same_tree(adapters.load_hf(b, nested=False), base)
    src = adapters.hf_source(b, paths)
    assert src.task_names == ("task0", "task1", "task2")
    assert_same_tree(src.base(sorted(base)), base)
