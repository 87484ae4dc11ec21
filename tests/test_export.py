"""fm.export / `flexmerge export`: every task's full params as deployable
checkpoints (safetensors, npz, Orbax, Hugging Face directories mirroring the
base's files, names, dtypes and shards)."""

import json
import warnings

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors import safe_open

import flexmerge_jax as fm
from flexmerge_jax.cli import main
from flexmerge_jax.sources import files as fio

from conftest import random_case, write_hf_dir


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(f"u{a.dtype.itemsize}")


def assert_bitwise(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
        np.testing.assert_array_equal(bits(got[k]), bits(want[k]), err_msg=k)


def bf16(t):
    return {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}


@pytest.fixture
def hf_model(tmp_path):
    """A 2x TIES cut of four bf16 HF directories of three shards each."""
    base, fts = random_case(5, n=4)
    b = write_hf_dir(tmp_path / "base", bf16(base), 3,
                     ("config.json", "tokenizer.json", "generation_config.json"))
    paths = [write_hf_dir(tmp_path / f"task{i}", bf16(f), 3) for i, f in enumerate(fts)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fm.blocks.UnmatchedParametersWarning)
        plan = fm.plan(b, paths, blocks=["l1.", "l0."], method=fm.methods.ties(keep=0.5))
    return plan, b


def test_hf_round_trip_mirrors_files_names_dtypes_and_shards(tmp_path, hf_model):
    plan, b = hf_model
    model = plan.at_size(2.0)
    assert 1 < len({tuple(r) for r in model.routing.values()}) or model.n_models < 4
    fm.save(tmp_path / "m", model)
    out = fm.export(tmp_path / "m", tmp_path / "deploy", format="hf")  # base recorded in the model
    index = json.loads((b / "model.safetensors.index.json").read_text())
    for t, name in enumerate(model.task_names):
        d = out / name
        assert sorted(f.name for f in d.iterdir()) == sorted(f.name for f in b.iterdir())
        for f in ("config.json", "tokenizer.json", "generation_config.json"):
            assert (d / f).read_bytes() == (b / f).read_bytes()
        got_index = json.loads((d / "model.safetensors.index.json").read_text())
        assert got_index["weight_map"] == index["weight_map"]
        for shard in set(index["weight_map"].values()):
            with safe_open(str(d / shard), "numpy") as f:
                assert f.metadata() == {"format": "pt"}  # what transformers requires
        assert_bitwise(fio.load_params(d), model.params_for_task(t))
        assert all(str(v.dtype) == "bfloat16" for v in fio.load_params(d).values())


@pytest.mark.parametrize("fmt", ["safetensors", "npz", "orbax"])
def test_cli_exports_one_task_in_each_format(tmp_path, hf_model, capsys, fmt):
    plan, _ = hf_model
    fm.save_cut(tmp_path / "m", plan, size=2.0)
    model = fm.load(tmp_path / "m")
    out = tmp_path / "out"
    if fmt == "npz":  # NumPy has no bfloat16: refused, in one line, leaving nothing
        assert main(["export", str(tmp_path / "m"), "--task", "task2", "--format", "npz",
                     "--out", str(out)]) == 2
        assert ".npz cannot store bfloat16" in capsys.readouterr().err and not out.exists()
        model = fm.plan(*random_case(5, n=4), method="ta").at_size(2.0)
        fm.save(tmp_path / "m32", model)
        assert main(["export", str(tmp_path / "m32"), "--task", "2", "--format", "npz",
                     "--out", str(out)]) == 0
        assert_bitwise(fio.load_params(out / "params.npz"), model.params_for_task(2))
        return
    assert main(["export", str(tmp_path / "m"), "--task", "task2", "--format", fmt,
                 "--out", str(out)]) == 0, capsys.readouterr().err
    want = model.params_for_task("task2")
    if fmt == "orbax":
        got = ocp.StandardCheckpointer().restore(out.absolute())  # plain Orbax
    else:
        got = fio.load_params(out / ("model.safetensors" if fmt == "safetensors" else "params.npz"))
    assert_bitwise(got, want)
    assert main(["export", str(tmp_path / "m"), "--task", "1", "--format", fmt,
                 "--out", str(tmp_path / "by_index")]) == 0


def test_hf_export_through_a_name_mapping_copies_dropped_tensors(tmp_path):
    from flexmerge_jax import adapters

    rng = np.random.default_rng(0)

    def hf(seed_shift):
        weight = rng.standard_normal((3, 4)) * 0.1 + seed_shift
        return {"enc.fc.weight": weight.astype(np.float32),
                "enc.fc.bias": rng.standard_normal(3).astype(np.float32),
                "embeddings.position_ids": np.arange(6, dtype=np.int64)[None]}

    b = write_hf_dir(tmp_path / "base", hf(0))
    paths = [write_hf_dir(tmp_path / f"t{i}", hf(1)) for i in range(3)]
    mapping = [(r"position_ids$", None), (r"\.weight$", ".kernel"), (r"\.", "/")]
    inverse = adapters.NameMap.rules(mapping, inverse=[(r"/", "."), (r"\.kernel$", ".weight")])
    model = fm.plan(adapters.hf_source(b, paths, mapping), method="ta").at_size(1.0)
    with pytest.raises(ValueError, match="pass the same mapping="):
        fm.export(model, tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()
    fm.export(model, tmp_path / "out", task=0, format="hf", mapping=inverse)
    got = fio.load_params(tmp_path / "out")
    want = adapters.to_hf(model.params_for_task(0), inverse)
    want["embeddings.position_ids"] = np.arange(6, dtype=np.int64)[None]
    assert_bitwise(got, want)


def test_export_errors_leave_nothing(tmp_path, hf_model, monkeypatch):
    plan, _ = hf_model
    model = plan.at_size(2.0)
    fm.save(tmp_path / "plan", plan)
    with pytest.raises(ValueError, match="a plan, not a model"):
        fm.export(tmp_path / "plan", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        fm.export(model, tmp_path / "x", task="nope")
    with pytest.raises(ValueError, match="format must be one of"):
        fm.export(model, tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="base= and mapping= describe"):
        fm.export(model, tmp_path / "x", format="npz", base=tmp_path / "base")
    base, fts = random_case(5, n=3)
    in_memory = fm.plan(base, fts, method="ta").at_size(2.0)
    with pytest.raises(ValueError, match="needs base="):
        fm.export(in_memory, tmp_path / "x", format="hf")
    fio.save_params(tmp_path / "base.npz", base)
    with pytest.raises(ValueError, match="base.npz: a npz checkpoint"):
        fm.export(in_memory, tmp_path / "x", format="hf", base=tmp_path / "base.npz")
    from flexmerge_jax import _export

    real, calls = _export._write_task, []

    def fail_second(dest, *a):
        calls.append(dest)
        if len(calls) == 2:
            raise OSError("disk full")
        real(dest, *a)

    monkeypatch.setattr(_export, "_write_task", fail_second)
    with pytest.raises(OSError, match="disk full"):
        fm.export(model, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "base.npz", "plan", "task0",
                                                          "task1", "task2", "task3"]
    monkeypatch.undo()
    fm.export(model, tmp_path / "x")
    with pytest.raises(ValueError, match="exists"):
        fm.export(model, tmp_path / "x")
