"""The host statistics pass for TIES (sampled bracket, one fused pass, exact
fallbacks) and the streamed Gram pass, against independent NumPy paths."""

import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax._prepared import Prepared
from flexmerge_jax.sources import _source, files
from flexmerge_jax.sources._source import MemorySource
from flexmerge_jax.stats import gram, order, passes
from flexmerge_jax.stats.gram import block_gram
from flexmerge_jax.stats.passes import grams

from conftest import random_case

BLOCKS = ["l1.", "l0."]


def _case(seed=7, n=5, shapes=None):
    base, fts = random_case(seed, n=n, shapes=shapes)
    fts[2]["emb"] = base["emb"] + np.float32(0.5)  # exact ties at the threshold
    return base, fts


def _reference(src, part, keep):
    """Thresholds from a full NumPy sort; Grams of the trimmed float64 vectors."""
    tv = {k: np.stack([np.asarray(f, np.float32) for f in src.task_vectors([k])[k]])
          for k in src.layout.names}
    flat = np.concatenate([v.reshape(src.n, -1) for v in tv.values()], axis=1)
    d = flat.shape[1]
    kk = order.ties_keep_count(d, keep)
    thr = np.sort(np.abs(flat), axis=1)[:, kk - 1]
    g = []
    for blk in part.blocks:
        x = np.concatenate([tv[k].reshape(src.n, -1) for k in blk.leaves], axis=1)
        x = np.where(np.abs(x) >= thr[:, None], x, 0).astype(np.float64)
        g.append(x @ x.T)
    return thr, np.stack(g)


def _check(src, keep=0.3, precision="float64"):
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        part = fm.blocks.resolve(BLOCKS, src.layout.names, src.layout.sizes)
    thr, g_ref = _reference(src, part, keep)
    p = Prepared(src, part, fm.methods.ties(keep=keep))
    g = grams(p, precision=precision)
    np.testing.assert_array_equal(p.trim_threshold, thr)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12 if precision == "float64" else 1e-5, atol=1e-18)
    only = Prepared(src, part, fm.methods.ties(keep=keep))  # thresholds alone
    np.testing.assert_array_equal(only.trim_threshold, thr)
    return p


def _spy_scans(monkeypatch):
    results = []
    real = passes._bracket_scan

    def spy(*a, **k):
        r = real(*a, **k)
        results.append((k.get("counts", True), r is not None))
        return r

    monkeypatch.setattr(passes, "_bracket_scan", spy)
    return results


@pytest.mark.parametrize("keep", [0.3, 0.05, 0.9])
@pytest.mark.parametrize("dense", [0, 3000, 1 << 26])  # captured columns packed / mixed / not
def test_sampled_bracket_path(monkeypatch, keep, dense):
    # A sample smaller than the model: runs of 4 entries, cluster errors.
    monkeypatch.setattr(passes, "_SAMPLE", 80)
    monkeypatch.setattr(passes, "_RUN", 4)
    monkeypatch.setattr(passes, "_DENSE_BYTES", dense)
    monkeypatch.setattr(passes, "columns", lambda n: 64)  # many chunks per block
    kinds = []
    real = passes._unpack_columns
    monkeypatch.setattr(passes, "_unpack_columns", lambda *c: (kinds.append(len(c)), real(*c))[1])
    scans = _spy_scans(monkeypatch)
    shapes = {"l1.w": (40, 30), "l0.w": (30, 40), "emb": (4,)}
    _check(MemorySource(*_case(shapes=shapes)), keep=keep)
    assert scans == [(True, True), (True, True)]  # one pass each, the bracket held
    assert kinds and set(kinds) == {0: {3}, 3000: {1, 3}, 1 << 26: {1}}[dense]


def test_full_sample_path(monkeypatch):
    scans = _spy_scans(monkeypatch)
    _check(MemorySource(*_case()))  # the small model is sampled whole
    assert scans == [(True, True), (True, True)]


def test_bracket_miss_falls_back_to_radix_select(monkeypatch):
    calls = []

    def wrong(prepared, k):  # a bracket far above every |x|
        calls.append(1)
        key = np.float32(1e30).view(np.uint32)
        return np.full(prepared.n, key, np.uint32), np.full(prepared.n, key + 1, np.uint32)

    monkeypatch.setattr(passes, "_sample_bracket", wrong)
    scans = _spy_scans(monkeypatch)
    _check(MemorySource(*_case()))
    assert calls and scans[0] == (True, False)  # missed; radix select, then a Gram pass
    assert scans[1] == (False, True)


def test_too_many_undecided_keys_falls_back(monkeypatch):
    monkeypatch.setattr(passes, "_KEY_BYTES", -1)
    scans = _spy_scans(monkeypatch)
    _check(MemorySource(*_case()))
    assert scans[0] == (True, False)


def test_column_budget_gives_a_second_pass(monkeypatch):
    monkeypatch.setattr(passes, "_column_budget", lambda prepared: 0)
    scans = _spy_scans(monkeypatch)
    _check(MemorySource(*_case()), precision="float32")
    assert scans[:2] == [(True, True), (False, True)]  # counting pass, then the Gram pass


def test_streamed_gram_equals_block_gram():
    src = MemorySource(*_case())
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        part = fm.blocks.resolve(BLOCKS, src.layout.names, src.layout.sizes)
    p = Prepared(src, part, fm.methods.task_arithmetic(0.5))
    direct = np.stack([block_gram({k: np.asarray(v) for k, v in p.tau(b).items()})
                       for b in range(len(part))])
    np.testing.assert_allclose(grams(p), direct, rtol=1e-13)
    np.testing.assert_allclose(grams(p, precision="float32"), direct, rtol=1e-5)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_gram_sum_pieces_against_numpy(precision):
    """Chunks wider than a BLAS piece (and a partial last piece) against
    one float64 product; exactly symmetric."""
    rng = np.random.default_rng(3)
    n = 5
    g = gram.GramSum(n, precision)
    want = np.zeros((n, n))
    for c in (3 * g.width + 17, 1, g.width):
        a = rng.standard_normal((n, c)).astype(np.float32)
        g.add(a)
        a64 = a.astype(np.float64)
        want += a64 @ a64.T
    got = g.result()
    np.testing.assert_array_equal(got, got.T)
    np.testing.assert_allclose(got, want, rtol=1e-13 if precision == "float64" else 1e-5)


def test_safetensors_runs_equal_memory_runs(tmp_path):
    base, fts = _case(n=3)
    b16 = {k: v.astype("bfloat16") for k, v in base.items()}
    f16 = [{k: v.astype("bfloat16") for k, v in f.items()} for f in fts]
    cases = {"f32": (base, fts, ".safetensors"), "bf16": (b16, f16, ".safetensors"),
             "npz": (base, fts, ".npz")}  # npz: whole parameters, then the runs
    for tag, (bb, ff, ext) in cases.items():
        files.save_params(tmp_path / f"{tag}-base{ext}", bb)
        paths = [files.save_params(tmp_path / f"{tag}-{i}{ext}", f) for i, f in enumerate(ff)]
        disk = files.path_source(tmp_path / f"{tag}-base{ext}", paths)
        mem = MemorySource(bb, ff)
        req = [("l1.mlp.w", np.array([0, 7, 3, 28]), 7), ("emb", np.array([1]), 3)]
        a = disk.sample_runs(req)
        for x, y in zip(a, mem.sample_runs(req)):
            np.testing.assert_array_equal(x, y)
        full = mem.task_vectors(["l1.mlp.w"])["l1.mlp.w"].reshape(3, -1)
        np.testing.assert_array_equal(a[0][:, 1], full[:, 7:14])
        assert a[1].shape == (3, 1, 3)


@pytest.mark.parametrize("method,linkage,ext", [
    ("ties", "min", ".safetensors"), ("ta", "min", ".safetensors"),
    ("ties", None, ".safetensors"), ("ties", "min", ""),  # "": Orbax directories
])
def test_disk_plan_equals_memory_plan(tmp_path, monkeypatch, method, linkage, ext):
    monkeypatch.setattr(passes, "_SAMPLE", 60)
    base, fts = _case()
    files.save_params(tmp_path / f"base{ext}", base)
    paths = [files.save_params(tmp_path / f"t{i}{ext}", f) for i, f in enumerate(fts)]
    m = fm.methods.ties(keep=0.3) if method == "ties" else fm.methods.task_arithmetic(0.5)
    kw = dict(blocks=BLOCKS, method=m, linkage=linkage)
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        a = fm.plan(base, fts, **kw)
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        b = fm.plan(tmp_path / f"base{ext}", paths, **kw)
    assert a.events == b.events


@pytest.mark.parametrize("method", ["ta", "ties"])
@pytest.mark.parametrize("where", ["l0.mlp.w", "emb"])  # in a block / unmatched
def test_nan_is_named(method, where):
    base, fts = _case()
    bad = fts[3][where].copy()
    bad.flat[1] = np.nan
    fts[3] = {**fts[3], where: bad}
    m = fm.methods.get(method, **({"keep": 0.3} if method == "ties" else {}))
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        with pytest.raises(ValueError, match=rf"task 3 \(task3\): the task vector of "
                                             rf"parameter '{where}' has NaN"):
            fm.plan(base, fts, blocks=BLOCKS, method=m, linkage="min")


def test_safetensors_reads_are_exact_aligned_and_checked(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    want = {"a.f32": rng.standard_normal((3, 5)).astype(np.float32),
            "b.bf16": rng.standard_normal((7,)).astype("bfloat16"),
            "c.f16": rng.standard_normal((2, 2)).astype(np.float16),
            "d.i64": np.arange(4, dtype=np.int64),  # not a float: through safetensors
            "e.scalar": np.array(2.5, np.float32), "f.empty": np.zeros((0, 3), np.float32)}
    path = tmp_path / "m.safetensors"
    save_file(want, str(path))
    reader = files._Reader(path)
    got = reader.read(list(want)[::-1])
    assert list(got) == list(want)[::-1]
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
        if k != "d.i64" and v.size:  # (an empty array has no data to align)
            assert got[k].ctypes.data % 64 == 0, k
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the file shrinks after the source was opened
        f.truncate(size - 4)
    last = max(want, key=lambda k: reader._offsets[k])
    with pytest.raises(ValueError, match=f"truncated data for parameter '{last}'"):
        reader.read([last])


def test_disk_cut_reads_only_the_kept_tasks_files(tmp_path, monkeypatch):
    """A cut reads the fine-tuned files of the tasks it keeps unmerged only,
    and equals the cut of the in-memory plan."""
    base, fts = _case(n=4)
    files.save_params(tmp_path / "base.safetensors", base)
    paths = [files.save_params(tmp_path / f"t{i}.safetensors", f) for i, f in enumerate(fts)]
    kw = dict(blocks=BLOCKS, method=fm.methods.ties(keep=0.3), linkage="min")
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        disk = fm.plan(tmp_path / "base.safetensors", paths, **kw)
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        mem = fm.plan(base, fts, **kw)
    step = 2  # two merges: some blocks keep singletons
    reads = []
    real = files._Reader.read
    monkeypatch.setattr(files._Reader, "read", lambda self, names: (
        reads.append((self.path.name, tuple(names))), real(self, names))[1])
    src = disk._require_inputs().source
    got = src.finetuned_tasks(["l0.mlp.w"], [2, 0])
    assert list(got) == [2, 0] and reads == [("t2.safetensors", ("l0.mlp.w",)),
                                             ("t0.safetensors", ("l0.mlp.w",))]
    np.testing.assert_array_equal(got[2]["l0.mlp.w"], fts[2]["l0.mlp.w"])
    a, b = disk.at_step(step), mem.at_step(step)
    for name, blk in a.blocks.items():
        other = b.blocks[name]
        assert blk.groups == other.groups
        for s, t in zip(blk.sets, other.sets):
            for k in blk.leaves:
                np.testing.assert_array_equal(np.asarray(s[k]), np.asarray(t[k]))


def test_task_vectors_trimmed_as_computed_equal_trim_after(monkeypatch):
    """``Source.task_vectors(names, threshold)`` trims in the subtraction's
    pass (host: on the bits, chunk by chunk; device: XLA), bit for bit
    ``tree.trim`` of the untrimmed vectors, signed zeros included: ties at
    the threshold kept, thresholds <= 0 keep everything, a NaN threshold
    keeps nothing; NaN/Inf inputs still raise naming the parameter."""
    import jax.numpy as jnp


    base, fts = _case(n=4)
    fts[1]["l0.mlp.w"] = base["l0.mlp.w"].copy()  # a task vector of zeros
    src = MemorySource(base, fts)
    names = list(src.layout.names)
    raw = src.task_vectors(names)
    tie = float(np.abs(raw["emb"][2]).max())  # |x| == threshold: kept
    cases = [np.array([0.1, 0.5, tie, 0.0], np.float32),
             np.array([-1.0, np.nan, 0.3, 1e30], np.float32)]
    for thr in cases:
        want = {k: np.asarray(fm.tree.trim(jnp.asarray(v), jnp.asarray(thr)))
                for k, v in raw.items()}
        host = src.task_vectors(names, thr)
        with monkeypatch.context() as m:  # the device (XLA) path
            m.setattr(_source, "_all_host", lambda *a: False)
            dev = src.task_vectors(names, thr)
        for got in (host, dev):
            assert list(got) == names
            for k in names:
                g = np.asarray(got[k])
                np.testing.assert_array_equal(g, want[k])
                np.testing.assert_array_equal(np.signbit(g), np.signbit(want[k]))
    assert np.count_nonzero(src.task_vectors(["emb"], cases[0])["emb"][2]) >= 1
    assert not np.any(src.task_vectors(names, cases[1])["l0.mlp.w"][1])  # NaN: none kept
    np.testing.assert_array_equal(src.task_vectors(names, cases[1])["emb"][0], raw["emb"][0])
    # across chunk boundaries of the fused pass
    monkeypatch.setattr(_source, "_TRIM_COLUMNS", 7)
    np.testing.assert_array_equal(src.task_vectors(names, cases[0])["l1.mlp.w"],
                                  np.asarray(fm.tree.trim(jnp.asarray(raw["l1.mlp.w"]),
                                                       jnp.asarray(cases[0]))))
    fts[3]["l1.attn.w"] = fts[3]["l1.attn.w"].copy()
    fts[3]["l1.attn.w"].flat[5] = np.inf
    bad = MemorySource(base, fts)
    with pytest.raises(ValueError, match=r"task 3 \(task3\).*'l1\.attn\.w'"):
        bad.task_vectors(names, cases[0])
