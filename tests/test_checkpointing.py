"""save / load of FlexModels and Plans (Orbax + JSON), atomicity, bad paths."""

import json
import os
import shutil
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest

import flexmerge_jax as fm
from flexmerge_jax import checkpointing

from conftest import random_case


def same_params(a, b, n):
    for i in range(n):
        pa, pb = a.params_for_task(i), b.params_for_task(i)
        assert set(pa) == set(pb)
        for k in pa:
            np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]))


@pytest.mark.parametrize(
    "method", [fm.methods.task_arithmetic(1.5), fm.methods.emr(), fm.methods.consensus_ties()],
    ids=lambda m: m.name,
)
def test_flexmodel_roundtrip(tmp_path, method):
    base, fts = random_case(0, n=5)
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        p = fm.plan(base, fts, blocks=["l1.", "l0."], method=method)
    model = p.at_size(3.0)
    fm.save(tmp_path / "m", model)
    meta = json.loads((tmp_path / "m" / "flexmerge.json").read_text())
    assert meta["format"] == "flexmerge_jax/flexmodel"
    assert meta["n_models"] == model.n_models and meta["method"]["name"] == method.name
    loaded = fm.load(tmp_path / "m")
    assert loaded.task_names == model.task_names and loaded.n_models == model.n_models
    assert {k: v.tolist() for k, v in loaded.routing.items()} == {
        k: v.tolist() for k, v in model.routing.items()
    }
    same_params(model, loaded, 5)


def test_masks_take_one_bit_per_parameter(tmp_path):
    base, fts = random_case(1, n=4)
    model = fm.merge(base, fts, fm.methods.emr())
    fm.save(tmp_path / "m", model)
    part = ocp.StandardCheckpointer().restore((tmp_path / "m" / "arrays" / "p00000").absolute())
    for bi, name in enumerate(model.blocks):
        entry = part[f"b{bi:05d}"]
        numel = int(np.prod(base[name].shape))
        for t in model.task_names:
            packed = entry["masks"][t][name]
            assert packed.dtype == np.uint8 and packed.size == -(-numel // 8)


def test_arrays_are_uncompressed_and_compressed_ones_still_load(tmp_path):
    base, fts = random_case(7, n=4, shapes={"l0.mlp.w": (300, 200), "l1.mlp.w": (300, 200)})
    model = fm.plan(base, fts, blocks=["l1.", "l0."], method=fm.methods.ties(keep=0.5)).at_size(1)
    fm.save(tmp_path / "m", model)
    arrays = tmp_path / "m" / "arrays"
    raw = sum(v.nbytes for v in base.values())  # the 1x model: one merged set per block
    on_disk = sum(f.stat().st_size for f in arrays.rglob("*") if f.is_file())
    assert on_disk >= raw  # one merged set of float32 noise: zstd would store ~92% of it
    # Directories written before (Orbax's default, zstd) load the same.
    for item in arrays.iterdir():
        tree = ocp.StandardCheckpointer().restore(item.absolute())
        shutil.rmtree(item)
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(item.absolute(), tree)
        ckpt.wait_until_finished()
    assert sum(f.stat().st_size for f in arrays.rglob("*") if f.is_file()) < on_disk
    same_params(model, fm.load(tmp_path / "m"), 4)


def test_blocks_are_written_in_few_parts_of_bounded_size(tmp_path, monkeypatch):
    """Consecutive blocks share an Orbax checkpoint up to PART_BYTES (one
    save per part, not per block); a block larger than that is a part of
    its own; the parts hold every block once, in order, and load back."""
    shapes = {f"l{i}.w": (40, 50) for i in range(6)}  # 8,000 bytes per block and set
    base, fts = random_case(8, n=3, shapes=shapes)
    model = fm.plan(base, fts, blocks="by-layer", method="ta").at_size(3.0)  # 3 sets per block
    fm.save(tmp_path / "one", model)
    meta = json.loads((tmp_path / "one" / "flexmerge.json").read_text())
    assert meta["version"] == 3 and len(meta["parts"]) == 1
    assert sorted(p.name for p in (tmp_path / "one" / "arrays").iterdir()) == ["p00000"]
    # A part closes once it holds 50,000 bytes: with its third block (3 x 8,000 bytes each).
    monkeypatch.setattr(checkpointing, "PART_BYTES", 50_000)
    fm.save(tmp_path / "two", model)
    meta = json.loads((tmp_path / "two" / "flexmerge.json").read_text())
    blocks = [f"b{i:05d}" for i in range(6)]
    assert meta["parts"] == [blocks[0:3], blocks[3:6], ["model"]]
    for i, keys in enumerate(meta["parts"]):
        tree = ocp.StandardCheckpointer().restore(
            (tmp_path / "two" / "arrays" / f"p{i:05d}").absolute())
        assert sorted(tree) == sorted(keys)
    same_params(model, fm.load(tmp_path / "two"), 3)
    monkeypatch.setattr(checkpointing, "PART_BYTES", 1)
    fm.save(tmp_path / "each", model)
    assert len(json.loads((tmp_path / "each" / "flexmerge.json").read_text())["parts"]) == 7
    same_params(model, fm.load(tmp_path / "each"), 3)


def test_plan_roundtrip_and_later_cuts(tmp_path):
    base, fts = random_case(2, n=4)
    p = fm.plan(base, fts, blocks="by-layer", method=fm.methods.ties(keep=0.5),
                linkage=None, similarity="sign")
    fm.save(tmp_path / "plan", p)
    meta = json.loads((tmp_path / "plan" / "flexmerge.json").read_text())
    assert meta["format"] == "flexmerge_jax/plan" and len(meta["events"]) == p.num_steps
    bare = fm.load(tmp_path / "plan")
    assert [e.to_json() for e in bare.events] == [e.to_json() for e in p.events]
    assert not bare.has_inputs
    with pytest.raises(ValueError, match="no inputs attached"):
        bare.at_size(2.0)
    loaded = fm.load(tmp_path / "plan", base=base, finetuned=fts)
    same_params(p.at_size(2.0), loaded.at_size(2.0), 4)
    other = {**base, "emb": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match="do not match"):
        fm.load(tmp_path / "plan", base=other,
                finetuned=[{**f, "emb": np.zeros(5, np.float32)} for f in fts])


def saved_plan_of_files(tmp_path, seed, suffix):
    """A ta plan of 3 random models saved as files, saved to ``tmp_path/plan``."""
    base, fts = random_case(seed, n=3)
    fm.save_params(tmp_path / "base.npz", base)
    paths = [fm.save_params(tmp_path / f"t{i}{suffix}", f) for i, f in enumerate(fts)]
    p = fm.plan(tmp_path / "base.npz", paths, blocks="by-layer", method="ta", linkage="min")
    fm.save(tmp_path / "plan", p)
    return fts, paths, p


def test_plan_whose_files_changed_loads_without_inputs(tmp_path):
    fts, paths, p = saved_plan_of_files(tmp_path, 2, ".npz")
    assert fm.load(tmp_path / "plan").has_inputs  # the files are reattached
    (tmp_path / "t1.npz").unlink()
    fm.save_params(tmp_path / "t1.npz", {**fts[1], "emb": np.zeros(7, np.float32)})
    with pytest.warns(UserWarning, match=r"without its inputs, which changed since planning: "
                                         r"task 't1' .*t1.npz \(size \d+ -> \d+ bytes\)"):
        bare = fm.load(tmp_path / "plan")
    assert not bare.has_inputs and bare.num_steps == p.num_steps
    with pytest.raises(ValueError, match="'emb' has shape"):
        fm.load(tmp_path / "plan", base=tmp_path / "base.npz", finetuned=paths)


def test_replaced_files_of_the_same_layout_are_noticed(tmp_path):
    fts, paths, p = saved_plan_of_files(tmp_path, 5, ".safetensors")
    # Moved copies (modification times kept) are the same inputs: attached
    # without a word.
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in [tmp_path / "base.npz", *paths]:
        shutil.copy2(f, moved / f.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fm.load(tmp_path / "plan", base=moved / "base.npz",
                        finetuned=[moved / f.name for f in paths])
    same_params(p.at_size(2.0), again.at_size(2.0), 3)
    # t2 re-trained (same names, shapes and dtypes, other values).
    paths[2].unlink()
    fm.save_params(paths[2], {k: v + 0.5 for k, v in fts[2].items()})
    with pytest.warns(UserWarning, match="without its inputs.*t2.safetensors .content differs"):
        assert not fm.load(tmp_path / "plan").has_inputs
    with pytest.warns(UserWarning, match="not the ones this plan was computed from "
                                         r"\(task 't2' .*t2.safetensors \(content differs\)\)"):
        forced = fm.load(tmp_path / "plan", base=tmp_path / "base.npz", finetuned=paths)
    assert forced.has_inputs


def test_fingerprint_samples_content_not_names(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal(300_000).astype(np.float32).tobytes()  # 1.2 MB
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(data)
    b.write_bytes(data)
    fp = fm.sources.fingerprint(a)
    assert fp["sample"].startswith("blake2b:") and fp["size"] == len(data)
    assert fp["sample"] == fm.sources.fingerprint(b)["sample"]  # a copy
    # A copy with another modification time: the same input for a full hash;
    # the fast check cannot tell it from an in-place edit, and says so.
    assert fm.sources.fingerprint_change(fm.sources.fingerprint(b, "full"), a) is None
    assert fm.sources.fingerprint_change(fm.sources.fingerprint(b), a).startswith("modified since")
    # 50 values edited in place between the samples.
    full = fm.sources.fingerprint(a, "full")
    st = a.stat()
    values = np.frombuffer(data, np.float32).copy()
    values[150_000:150_050] += 1.0
    a.write_bytes(values.tobytes())
    assert fm.sources.fingerprint(a)["sample"] == fp["sample"]  # missed by the samples alone
    assert fm.sources.fingerprint_change(fp, a).startswith("modified since")  # seen: the mtime
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the mtime put back
    assert fm.sources.fingerprint_change(full, a) == "content differs"
    edited = bytearray(data)
    edited[-1] ^= 1  # the last 4 KiB are a sample
    b.write_bytes(bytes(edited))
    assert fm.sources.fingerprint(b)["sample"] != fp["sample"]
    assert fm.sources.fingerprint_change(fp, b) == "content differs"
    b.write_bytes(data + b"\0")  # the size
    assert fm.sources.fingerprint_change(fp, b) == f"size {len(data)} -> {len(data) + 1} bytes"
    # Directories (Orbax checkpoints): every file, with its relative path.
    ck = fm.save_params(tmp_path / "ck", {"w": np.ones((64, 64), np.float32)})
    fp_dir = fm.sources.fingerprint(ck, "full")
    assert fm.sources.fingerprint(ck, "full") == fp_dir and "full" in fp_dir
    shutil.rmtree(ck)
    fm.save_params(ck, {"w": np.full((64, 64), 2.0, np.float32)})
    assert fm.sources.fingerprint_change(fp_dir, ck) is not None
    with pytest.raises(ValueError, match="no such file"):
        fm.sources.fingerprint(tmp_path / "missing")
    assert fm.sources.fingerprint_change(fp, tmp_path / "missing") == "no longer exists"


def test_refuses_existing_and_foreign_directories(tmp_path):
    base, fts = random_case(3, n=3)
    model = fm.merge(base, fts, fm.methods.emr())
    fm.save(tmp_path / "m", model)
    with pytest.raises(ValueError, match="exists"):
        fm.save(tmp_path / "m", model)
    fm.save(tmp_path / "m", model, overwrite=True)
    fm.load(tmp_path / "m")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a flexmerge_jax checkpoint"):
        fm.load(foreign)
    with pytest.raises(ValueError, match="not a flexmerge_jax checkpoint"):
        fm.save(foreign, model, overwrite=True)  # never deletes what is not ours
    assert (foreign / "data.bin").exists()
    (foreign / "flexmerge.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a flexmerge_jax file"):
        fm.load(foreign)
    with pytest.raises(ValueError, match="not a directory"):
        fm.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="FlexModel or a Plan"):
        fm.save(tmp_path / "x", {"a": 1})


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    base, fts = random_case(4, n=3)
    model = fm.merge(base, fts, fm.methods.emr())

    monkeypatch.setattr(checkpointing, "PART_BYTES", 1)  # one Orbax item per block
    write, calls = checkpointing._Writer.write, []

    def boom(self, path, arrays):  # the first block is written, the second fails
        calls.append(path)
        if len(calls) == 2:
            (path / "partial").mkdir(parents=True)
            raise OSError("disk full")
        write(self, path, arrays)

    monkeypatch.setattr(checkpointing._Writer, "write", boom)
    with pytest.raises(OSError, match="disk full"):
        fm.save(tmp_path / "m", model)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_incomplete_directory_is_rejected(tmp_path):
    base, fts = random_case(5, n=3)
    fm.save(tmp_path / "m", fm.merge(base, fts, fm.methods.emr()))
    import shutil

    shutil.rmtree(tmp_path / "m" / "arrays")
    with pytest.raises(ValueError, match="incomplete"):
        fm.load(tmp_path / "m")


def test_streaming_cut_equals_in_memory_cut(tmp_path):
    base, fts = random_case(6, n=4)
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        p = fm.plan(base, fts, blocks=["l1.", "l0."], method=fm.methods.consensus_ta())
    fm.save_cut(tmp_path / "stream", p, size=3.0)
    fm.save(tmp_path / "mem", p.at_size(3.0))
    a, b = fm.load(tmp_path / "stream"), fm.load(tmp_path / "mem")
    assert a.n_models == b.n_models == p.sizes[p.step_for_size(3.0)]
    same_params(a, b, 4)
    ja = json.loads((tmp_path / "stream" / "flexmerge.json").read_text())
    jb = json.loads((tmp_path / "mem" / "flexmerge.json").read_text())
    assert ja == jb
    with pytest.raises(ValueError, match="exactly one"):
        fm.save_cut(tmp_path / "x", p)


def test_docs_plain_orbax_snippet_rebuilds_a_task(tmp_path, monkeypatch):
    """docs/format.md's snippet (Orbax and NumPy only) gives params_for_task,
    for a mask method (masked sets, base, rescalers), HF-style dotted names
    and nested names, with parameters outside every block."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    base, fts = random_case(3, n=4)
    nested = lambda t: {**{k: v for k, v in t.items() if k.startswith("l1")},  # noqa: E731
                        "l0": {k[3:]: v for k, v in t.items() if k.startswith("l0")},
                        "emb": t["emb"]}
    for method in (fm.methods.emr(), fm.methods.ties(keep=0.5)):
        with pytest.warns(fm.blocks.UnmatchedParametersWarning):
            plan = fm.plan(nested(base), [nested(f) for f in fts], blocks=["l1.", "l0/"],
                           method=method, task_names=["a.b", "c", "d/e", "f g"])
        model = plan.at_size(2.5)
        assert any(b.masked.any() for b in model.blocks.values()) == method.uses_masks
        d = tmp_path / method.name
        fm.save(d / "model_2x", model)
        monkeypatch.chdir(d)
        scope: dict = {}
        exec(compile(snippet, "docs/format.md", "exec"), scope)
        assert scope["size"] == model.n_models
        want = dict(zip(*fm.tree.flatten(model.params_for_task(1))[:2]))
        assert sorted(scope["params"]) == sorted(want)
        for k, v in want.items():
            assert scope["params"][k].dtype == v.dtype
            np.testing.assert_allclose(scope["params"][k], np.asarray(v), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("version", [1, 2])
def test_earlier_versions_still_load(version):
    """Models saved by earlier code (tests/fixtures/model_v1: anonymous keys,
    consensus TIES with masked sets, a base, unmatched parameters;
    model_v2: named trees, one Orbax item per block, several sets in one
    block and masks in the other, task names with '.' and '/') load to the
    per-task params recorded when they were written."""
    from pathlib import Path

    fixtures = Path(__file__).resolve().parent / "fixtures"
    d = fixtures / f"model_v{version}"
    assert json.loads((d / "flexmerge.json").read_text())["version"] == version
    model = fm.load(d)
    expected = np.load(fixtures / f"model_v{version}_expected.npz")
    names = ("a", "b", "c", "d") if version == 1 else ("a", "b.c", "d/e", "f")
    assert model.task_names == names and model.partition.unmatched
    assert any(len(b.sets) > 1 for b in model.blocks.values())
    assert any(b.masks for b in model.blocks.values())
    for t in range(4):
        got = model.params_for_task(t)
        assert sorted(got) == sorted(k.split("/", 1)[1] for k in expected if k.startswith(f"{t}/"))
        for k, v in got.items():
            np.testing.assert_array_equal(np.asarray(v), expected[f"{t}/{k}"])
