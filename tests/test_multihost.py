"""Two real processes under ``jax.distributed`` (gloo CPU collectives on
127.0.0.1, 2 devices each) give the single-process results.

The processes run ``tests/multihost_worker.py``; the single-process reference
runs the same script with one process of 4 devices, so the mesh has the same
shape. A one-process 8-device test cannot see what this checks: programs with
collectives issued in a different order on each process (worker threads)
abort, hang or silently disagree.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT = 150  # seconds for one group of processes (they take ~20 s here)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, devices: int, data: Path, out: Path, *extra: Path) -> None:
    """Runs the worker in ``nproc`` processes and waits for all of them."""
    out.mkdir()
    port = _free_port()
    _launch(nproc, devices, out, lambda i: [str(WORKER), str(i), str(nproc), str(port),
                                            str(data), str(out), *map(str, extra)])


def _launch(nproc: int, devices: int, logdir: Path, args, env=lambda i: {}) -> None:
    """Runs ``python *args(i)`` (with ``env(i)`` added) for each process
    ``i`` and waits for all of them, logging to ``logdir``; on a failure or
    timeout kills only the processes started here."""
    base = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(sys.path)}
    logs = [open(logdir / f"log{i}.txt", "w+") for i in range(nproc)]
    procs = [subprocess.Popen([sys.executable, *args(i)], env={**base, **env(i)},
                              stdout=logs[i], stderr=subprocess.STDOUT) for i in range(nproc)]
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = ""
    for i, f in enumerate(logs):
        f.seek(0)
        text += f"--- process {i} ---\n" + f.read()[-3000:]
        f.close()
    assert codes is not None, f"processes timed out after {TIMEOUT} s\n{text}"
    assert codes == [0] * nproc, f"exit codes {codes}\n{text}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A base and 4 fine-tuned safetensors files (6 layers of 3 parameters)."""
    from safetensors.numpy import save_file

    data = tmp_path_factory.mktemp("multihost_inputs")
    rng = np.random.default_rng(0)
    shapes = {f"layers.{i}.{k}": s for i in range(6)
              for k, s in [("w", (64, 128)), ("b", (128,)), ("w2", (128, 64))]}
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    save_file(base, str(data / "base.safetensors"))
    for t in range(4):
        save_file({k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32)
                   for k, v in base.items()}, str(data / f"t{t}.safetensors"))
    import flexmerge_jax as fm

    for name in ["base", "t0", "t1", "t2", "t3"]:  # the same models as Orbax checkpoints
        fm.save_params(data / "orbax" / name, fm.load_params(data / f"{name}.safetensors"))
    return data


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    _run(1, 4, inputs, root / "single")
    _run(2, 2, inputs, root / "multi", root / "single")
    return root / "single", root / "multi"


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_cli_merge_in_two_processes_equals_one_process(inputs, tmp_path, fmt):
    """``flexmerge merge --distributed --mesh all`` run by both processes
    (the console script's module, which ends each process at once after its
    atexit handlers: jax.distributed's shutdown) writes one directory, the
    model one process writes without a mesh. Orbax inputs are read in the
    prefetching threads, each process for itself: a restore with Orbax's
    default barrier (a device collective) there broke the run."""
    data, blocks = inputs, tmp_path / "blocks.json"
    blocks.write_text(json.dumps([f"layers.{i}." for i in range(6)]))
    file = (lambda n: data / f"{n}.safetensors") if fmt == "safetensors" else \
        (lambda n: data / "orbax" / n)
    args = ["--base", str(file("base")), "--finetuned",
            *[str(file(f"t{t}")) for t in range(4)], "--blocks", str(blocks),
            "--method", "ties", "--size", "2", "--quiet"]
    cli = ["-m", "flexmerge_jax.cli", "merge", *args]
    port = _free_port()
    logs = [tmp_path / "logs-multi", tmp_path / "logs-single"]
    for d in logs:
        d.mkdir()
    _launch(2, 2, logs[0], lambda i: [*cli, "--distributed", "--mesh", "all", "--out",
                                      str(tmp_path / "multi")],
            env=lambda i: {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
    _launch(1, 1, logs[1], lambda i: [*cli, "--out", str(tmp_path / "single")])
    import flexmerge_jax as fm

    one, two = fm.load(tmp_path / "single"), fm.load(tmp_path / "multi")
    assert two.n_models == one.n_models and 1 < one.n_models < 4
    assert {k: b.groups for k, b in two.blocks.items()} == \
        {k: b.groups for k, b in one.blocks.items()}
    for t in range(4):
        a = fm.tree.flatten(one.params_for_task(t))[1]
        b = fm.tree.flatten(two.params_for_task(t))[1]
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "logs-multi", "logs-single", "multi", "single"]


@pytest.mark.parametrize("name", ["ta_min", "ties_min", "ties_merged", "emr_min", "cties_min"])
def test_two_process_plans_equal_one_process(runs, name):
    single, multi = (json.loads((d / "result.json").read_text()) for d in runs)
    a, b = single[name], multi[name]
    assert [e[:3] for e in b] == [e[:3] for e in a]
    # Similarities are float64 sums whose all-reduce order differs by process layout.
    np.testing.assert_allclose([e[3] for e in b], [e[3] for e in a], rtol=1e-12, atol=1e-15)


def test_two_process_tuning_equals_one_process(runs):
    single, multi = (json.loads((d / "result.json").read_text()) for d in runs)
    assert multi["ta_tuned_scales"] == single["ta_tuned_scales"]
    assert len(set(single["ta_tuned_scales"]) - {None}) > 1  # the scores chose, not a default


def test_two_process_cut_and_merge_equal_one_process(runs):
    single, multi = runs
    assert json.loads((multi / "result.json").read_text())["cut_n_models"] == \
        json.loads((single / "result.json").read_text())["cut_n_models"]
    a, b = np.load(single / "params.npz"), np.load(multi / "params.npz")
    # 4 tasks of the TIES cut, the one-shot merge, 4 tasks of the EMR cut.
    assert sorted(a.files) == sorted(b.files) and len(a.files) == 9 * 18
    for k in a.files:
        if k.startswith("emr/"):  # rescalers: float32 sums over a block, all-reduced in
            # an order that depends on the process layout (1 ulp apart)
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6 * np.abs(a[k]).max(),
                                       err_msg=k)
        else:
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_each_process_reads_only_its_own_slices(runs):
    def data_bytes(d, i):  # what the plans read of the parameters
        r = json.loads((d / f"read{i}.json").read_text())
        return r["plans"] - r["fingerprints"]

    single, multi = runs
    alone = data_bytes(single, 0)
    per_process = [data_bytes(multi, i) for i in range(2)]
    # Every parameter is sharded over the 4 devices, 2 per process: each
    # process reads half the inputs' entries (plus headers, and TIES samples).
    assert alone > 3 * 5 * 6 * (2 * 64 * 128 + 128) * 4  # three plans read every input
    for b in per_process:
        assert b < 0.55 * alone, (per_process, alone)


def test_two_processes_save_and_load_one_directory(runs):
    """save / save_cut called by both processes with one path write one
    complete directory; load(..., mesh=) restores it sharded, equal; an
    Orbax export called by both holds the task's params, and one that fails
    on process 0 alone fails on both, leaving nothing."""
    for d in runs:
        checks = json.loads((d / "result.json").read_text())["load_checks"]
        assert checks and all(checks.values()), (d.name, checks)
        for name in ("cut", "plan", "model", "emr"):
            assert (d / name / "flexmerge.json").is_file()
        # Nothing else: no temporary directories left beside them.
        assert sorted(p.name for p in d.iterdir() if p.is_dir()) == [
            "cut", "emr", "export", "model", "plan"]


def test_one_process_alone_saves_and_loads_orbax_params(runs):
    """fm.save_params / fm.load_params of an Orbax directory called by one
    process alone (a serving host, a conversion script) do not wait for the
    other processes; Orbax writes NumPy arrays only from process 0 (the
    others' checkpoints held no arrays), so other processes are refused."""
    single, multi = runs
    assert json.loads((single / "params_alone0.json").read_text()) is True
    assert json.loads((multi / "params_alone0.json").read_text()) is True
    refused = json.loads((multi / "params_alone1.json").read_text())
    assert refused.endswith(
        "/p: Orbax writes NumPy arrays only from process 0 of a jax.distributed run (this is "
        "process 1); save it from process 0, or as .safetensors or .npz"), refused


def test_each_process_writes_and_loads_only_its_own_shards(runs):
    """fm.save of a model sharded over two processes: each process writes
    the shards it holds (Orbax's multi-process save, one directory of data
    per process), and fm.load(..., mesh=) of it, or of the same model saved
    by one process from a mesh of 4 devices, reads only its own."""
    single, multi = runs
    alone = json.loads((single / "io0.json").read_text())
    io = [json.loads((multi / f"io{i}.json").read_text()) for i in range(2)]
    sharded = alone["sharded_bytes"]  # the parameter sets (>= 1 per block), sharded 4 ways
    assert sharded >= 6 * (2 * 64 * 128 + 128) * 4 and all(
        r["sharded_bytes"] == sharded for r in io)
    assert alone["written"] > sharded and alone["read"] > sharded
    for r in io:  # half each (and small files: metadata, routing, process 0's JSON)
        assert 0.45 * sharded < r["written"] < 0.5 * sharded + 200_000, (io, sharded)
        assert r["read"] < 0.5 * sharded + 200_000, (io, sharded)
        # The one process saved its 4 devices' shards as chunks: read a half each too.
        assert r["read_one_process_save"] < 0.5 * sharded + 200_000, (io, sharded)
    for i in range(2):
        data = multi / "model" / "arrays" / "p00000" / f"ocdbt.process_{i}"
        assert sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) > 0.45 * sharded
