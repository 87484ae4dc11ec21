"""Sharded execution (8 CPU devices, XLA_FLAGS set in conftest) == single device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flexmerge_jax as fm
from flexmerge_jax.stats import order
from flexmerge_jax.stats.gram import _gram

from conftest import assert_blocks_read_ahead_trimmed, record_task_vector_reads
from oracle_utils import load_case

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")


def mesh(kind):
    return jax.make_mesh((8,), ("model",), axis_types=(kind,))


def assert_models_equal(a, b, n, rtol=0.0, atol=0.0):
    for i in range(n):
        pa, pb = a.params_for_task(i), b.params_for_task(i)
        for k in pa:
            np.testing.assert_allclose(np.asarray(pa[k]), np.asarray(pb[k]), rtol=rtol, atol=atol,
                                       err_msg=k)


EX, AU = AxisType.Explicit, AxisType.Auto
CONFIGS = [
    # (mesh kind, method, linkage, similarity); the default run covers the
    # global thresholds (ties trim, sharded radix select), DARE and the
    # merged-vector path; EMR (masks) on a mesh runs by linkage in
    # tests/test_multihost.py (two processes); `pytest -m slow` runs the full
    # cross product here, EMR's merged-vector plan included.
    (EX, fm.methods.ties(1.0, keep=0.2), "min", "cosine"),
    (EX, fm.methods.dare(fm.methods.task_arithmetic(1.5), drop=0.5), None, "euclidean"),
]
SLOW = [
    (k, m, lk, sim)
    for k in (EX, AU)
    for m, lk, sim in [
        (fm.methods.ties(1.0, keep=0.2), "min", "cosine"),
        (fm.methods.pcb(1.0, keep=0.2), "min", "cosine"),
        (fm.methods.emr(), None, "cosine"),
        (fm.methods.dare(fm.methods.task_arithmetic(1.5), drop=0.5), None, "euclidean"),
        (fm.methods.consensus_ties(), None, "sign"),
    ]
    if (k, m, lk, sim) not in CONFIGS
]


@pytest.mark.parametrize(
    "kind,method,linkage,similarity",
    CONFIGS + [pytest.param(*c, marks=pytest.mark.slow) for c in SLOW],
    ids=lambda v: getattr(v, "name", str(v).split(".")[-1].lower()),
)
def test_sharded_plan_equals_single_device(kind, method, linkage, similarity):
    c = load_case("caseB")  # width 24, MLP 96: parameter dims divisible by 8
    kw = dict(blocks=c.blocks, method=method, linkage=linkage, similarity=similarity)
    ref = fm.plan(c.base, c.finetuned, **kw)
    sh = fm.plan(c.base, c.finetuned, mesh=mesh(kind), **kw)
    assert [(e.block, e.members_a, e.members_b) for e in sh.events] == [
        (e.block, e.members_a, e.members_b) for e in ref.events
    ]
    np.testing.assert_allclose([e.similarity for e in sh.events],
                               [e.similarity for e in ref.events], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(sh.sizes, ref.sizes)
    a, b = sh.at_size(3.0), ref.at_size(3.0)
    sharded = [x for blk in a.blocks.values() for s in blk.sets for x in s.values()
               if isinstance(getattr(x, "sharding", None), NamedSharding) and any(x.sharding.spec)]
    assert sharded  # the cut model's parameters stay sharded
    # Block-level sums (EMR means) are reduced across shards in another order:
    # float32 rounding only.
    assert_models_equal(a, b, c.n, rtol=1e-6, atol=1e-8)


@pytest.mark.slow  # the float32 similarity path; the float64 one runs by default
def test_sharded_float32_merged_vector_plan_equals_single_device():
    # gram_precision="float32" compares group vectors with float32 sums:
    # shards add in another order, so similarities agree to float32 rounding.
    c = load_case("caseB")
    kw = dict(blocks=c.blocks, method=fm.methods.ties(1.0, keep=0.2), linkage=None,
              similarity="cosine", gram_precision="float32")
    ref = fm.plan(c.base, c.finetuned, **kw)
    sh = fm.plan(c.base, c.finetuned, mesh=mesh(AxisType.Explicit), **kw)
    assert [(e.block, e.members_a, e.members_b) for e in sh.events] == [
        (e.block, e.members_a, e.members_b) for e in ref.events
    ]
    np.testing.assert_allclose([e.similarity for e in sh.events],
                               [e.similarity for e in ref.events], rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # files on a mesh of two processes: tests/test_multihost.py
def test_sharded_plan_from_files_equals_in_memory(tmp_path, monkeypatch):
    # Files behind a mesh: every block read from disk (the next one read and
    # placed in a background thread) gives the single-device in-memory plan.
    from flexmerge_jax.sources import files
    from flexmerge_jax.sources.sharding import ShardedSource

    c = load_case("caseB")
    paths = []
    for i, params in enumerate([c.base] + list(c.finetuned)):
        paths.append(tmp_path / f"m{i}.safetensors")
        files.save_params(paths[-1], params)
    kw = dict(blocks=c.blocks, method=fm.methods.ties(1.0, keep=0.2), linkage=None,
              similarity="cosine")
    ref = fm.plan(c.base, c.finetuned, **kw)
    m = mesh(EX)
    src = ShardedSource(files.PathSource(paths[0], paths[1:]), m)
    assert src.prefetch
    reads = record_task_vector_reads(monkeypatch, ShardedSource)
    sh = fm.plan(paths[0], paths[1:], mesh=m, **kw)
    monkeypatch.undo()
    assert [(e.block, e.members_a, e.members_b) for e in sh.events] == [
        (e.block, e.members_a, e.members_b) for e in ref.events
    ]
    np.testing.assert_allclose([e.similarity for e in sh.events],
                               [e.similarity for e in ref.events], rtol=1e-9, atol=1e-12)
    # The merged-vector pass read every block once, trimmed as read, each
    # after the first ahead of its turn in a background thread (the reads of
    # whole-model chunks for the TIES thresholds come before, untrimmed).
    assert_blocks_read_ahead_trimmed(reads, [list(b.leaves) for b in ref.partition.blocks])
    assert_models_equal(sh.at_size(3.0), ref.at_size(3.0), c.n, rtol=1e-6, atol=1e-8)


def test_statistics_do_not_gather_task_vectors():
    m = mesh(AxisType.Explicit)
    x = jax.device_put(jnp.ones((8, 32, 64), jnp.float32), NamedSharding(m, P(None, None, "model")))
    with jax.enable_x64(True):
        hlo = _gram.lower((x,)).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo
    fn = order._hist_sharded(m, x.sharding.spec, True, False)
    hlo = fn.lower(x, jnp.zeros((8,), jnp.int32)).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo
    # And the sharded radix select is exact.
    rng = np.random.default_rng(0)
    host = rng.standard_normal((3, 16, 64)).astype(np.float32)
    xs = jax.device_put(jnp.asarray(host), NamedSharding(m, P(None, None, "model")))
    got = order.kth_smallest([xs], [1, 500, 1024])
    srt = np.sort(host.reshape(3, -1), axis=1)
    np.testing.assert_array_equal(got, [srt[0, 0], srt[1, 499], srt[2, 1023]])


def test_leaf_spec():
    m = mesh(AxisType.Auto)
    from flexmerge_jax.sources.sharding import leaf_spec

    assert leaf_spec((24, 96), m) == P(None, "model")
    assert leaf_spec((5,), m) == P(None)
    with pytest.raises(ValueError, match="no axis"):
        fm.plan(*random_inputs(), mesh=m, mesh_axis="data")


def random_inputs():
    from conftest import random_case

    return random_case(0, n=3)


def test_nonfinite_task_vectors_are_named_on_every_path():
    """NaN/Inf is reported with its task and parameter by the NumPy host path,
    the jitted path (inputs already spread over devices) and ShardedSource."""
    base, fts = random_inputs()
    bad = [fts[0], fts[1], {**fts[2], "emb": np.array([0, 0, np.nan, 0], np.float32)}]
    msg = r"task 2 \(task2\): the task vector of parameter 'emb' has NaN or Inf"
    with pytest.raises(ValueError, match=msg):  # host (NumPy) path
        fm.plan(base, bad, method="ta")
    m = mesh(AxisType.Auto)
    spread = lambda t: {k: jax.device_put(v, NamedSharding(m, P())) for k, v in t.items()}
    with pytest.raises(ValueError, match=msg):  # arrays on 8 devices: the jitted path
        fm.plan(spread(base), [spread(f) for f in bad], method="ta")
    with pytest.raises(ValueError, match=msg):  # ShardedSource
        fm.plan(base, bad, method="ta", mesh=m)


@pytest.mark.parametrize("name", ["tsv", "breadcrumbs", "model_stock", "magmax"])
def test_extra_methods_on_a_mesh(name):
    """Sharded over 2 devices (dims divisible by 2 are split): Auto axes give the
    single-device model; whole-parameter kernels refuse Explicit axes clearly."""
    from jax.sharding import Mesh

    base, fts = random_inputs()
    method = fm.methods.get(name)
    one = fm.plan(base, fts, method=method, linkage="min").at_size(2.0)
    auto = Mesh(np.array(jax.devices()[:2]), ("model",), axis_types=(AxisType.Auto,))
    assert_models_equal(fm.plan(base, fts, method=method, linkage="min", mesh=auto).at_size(2.0),
                        one, 3, atol=1e-7)
    explicit = Mesh(np.array(jax.devices()[:2]), ("model",), axis_types=(AxisType.Explicit,))
    if name == "magmax":  # elementwise: fine on Explicit axes too
        assert_models_equal(fm.plan(base, fts, method=method, linkage="min",
                                    mesh=explicit).at_size(2.0), one, 3)
    else:
        with pytest.raises(ValueError, match="needs whole parameters"):
            fm.plan(base, fts, method=method, mesh=explicit)


def test_unknown_mesh_axis_is_named():
    from flexmerge_jax.sources import as_source
    from flexmerge_jax.sources.sharding import ShardedSource

    base, fts = random_inputs()
    m = mesh(EX)
    with pytest.raises(ValueError, match=r"mesh has no axis 'data' \(axes \('model',\)\)"):
        fm.plan(base, fts, mesh=m, mesh_axis="data")
    with pytest.raises(ValueError, match="mesh has no axis 'data'"):
        ShardedSource(as_source(base, fts), m, "data")


def test_cli_mesh_flag_gives_the_unsharded_model(tmp_path, capsys):
    from flexmerge_jax.cli import main
    from flexmerge_jax.sources import files

    from conftest import random_case

    base, fts = random_case(3, n=3, shapes={"l0.w": (16, 8), "l1.w": (8, 24), "l1.b": (8,),
                                            "emb": (3,)})
    b = files.save_params(tmp_path / "base.safetensors", base)
    f = [files.save_params(tmp_path / f"t{i}.safetensors", x) for i, x in enumerate(fts)]
    common = ["merge", "--base", str(b), "--finetuned", *map(str, f), "--method", "ties",
              "--keep", "0.2", "--size", "2"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--mesh", "8", "--out", str(tmp_path / "sharded")]) == 0
    assert main([*common, "--mesh", "9", "--out", str(tmp_path / "bad")]) == 2
    assert "--mesh: 'all' or a device count from 1 to 8 (got '9')" in capsys.readouterr().err
    assert_models_equal(fm.load(tmp_path / "plain"), fm.load(tmp_path / "sharded"), 3)
    plan = ["plan", *common[1:-2], "--out", str(tmp_path / "plan")]  # without --size
    assert main(plan) == 0
    assert main(["cut", str(tmp_path / "plan"), "--size", "2", "--mesh", "all",
                 "--out", str(tmp_path / "cut")]) == 0
    assert_models_equal(fm.load(tmp_path / "plain"), fm.load(tmp_path / "cut"), 3)


SAVE_SHARDED = """
import sys
import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((4,), ("m",))
w = jax.device_put(jnp.arange(64.0, dtype=jnp.float32).reshape(8, 8), NamedSharding(mesh, P("m")))
with ocp.StandardCheckpointer() as c:
    c.save(sys.argv[1], {"w": w, "b": np.ones(3, np.float32)})
"""


def test_orbax_params_saved_sharded_elsewhere_load_as_numpy(tmp_path):
    """An Orbax params checkpoint whose arrays were saved sharded over 4
    devices (another process, another topology: this one has 8) loads
    whole, as the NumPy arrays load_params promises (it restored
    jax.Arrays onto the saving topology, and refused a smaller one)."""
    import os
    import subprocess
    import sys

    path = tmp_path / "params"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", SAVE_SHARDED, str(path)], env=env, check=True,
                   capture_output=True, timeout=300)
    got = fm.load_params(path)
    assert sorted(got) == ["b", "w"] and all(type(v) is np.ndarray for v in got.values())
    np.testing.assert_array_equal(got["w"], np.arange(64.0, dtype=np.float32).reshape(8, 8))
    np.testing.assert_array_equal(got["b"], np.ones(3, np.float32))
