"""One process of the multi-process tests (``tests/test_multihost.py``).

    python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR OUT_DIR [ONE_PROCESS_OUT_DIR]

Every process runs the same calls on a mesh over all processes' devices (as
users on a TPU pod do), then process 0 writes what it computed to
``OUT_DIR/result.json`` and ``OUT_DIR/params.npz`` (the cut's parameters,
gathered from every process), and every process writes the bytes it read
while planning (and the part of them that fingerprinting the input files
reads) to ``OUT_DIR/read<ID>.json``, and the bytes it wrote to save a model
and read to load it onto the mesh to ``OUT_DIR/io<ID>.json``. With
NUM_PROCESSES = 1 it is the single-process reference the test compares
with; given its OUT_DIR, the processes also load the model it saved. Devices
per process come from XLA_FLAGS, set by the test.
"""

import json
import sys
import time

_START = time.perf_counter()


def _log(what: str) -> None:  # in the process's log: where the time goes
    print(f"{time.perf_counter() - _START:7.1f} s  {what}", flush=True)


def _io(field: str) -> int:
    """``rchar`` / ``wchar``: bytes this process has read / written with
    read(2)- / write(2)-like calls (page cache too), its threads included."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def main() -> None:
    pid, nproc, port, data, out = sys.argv[1:6]
    pid, nproc = int(pid), int(nproc)
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                                   initialization_timeout=60)
    import numpy as np
    from jax.experimental import multihost_utils

    import flexmerge_jax as fm
    _log("imported")

    mesh = jax.make_mesh((jax.device_count(),), ("model",))
    base = f"{data}/base.safetensors"
    fts = [f"{data}/t{i}.safetensors" for i in range(4)]
    blocks = fm.blocks.by_layer()
    from safetensors.numpy import load_file

    base_sq = float(sum(np.sum(x.astype(np.float64) ** 2) for x in load_file(base).values()))
    result, plans = {}, {}
    # What recording the inputs' fingerprints reads (samples of every file,
    # the same on every process), once per plan below.
    read_before = _io("rchar")
    for f in [base, *fts]:
        fm.sources.fingerprint(f)
    fingerprint_bytes = _io("rchar") - read_before
    read_before = _io("rchar")
    for name, method, linkage in [
        # First, while nothing is compiled: threads that compile and run
        # programs with collectives beside the main thread made processes
        # issue them in different orders.
        ("ties_merged", fm.methods.ties(keep=0.2), None),
        ("ta_min", fm.methods.task_arithmetic(1.5), "min"),
        ("ties_min", fm.methods.ties(keep=0.2), "min"),
        # Mask methods: masks and rescalers on the mesh, per-task deploys.
        ("emr_min", fm.methods.emr(), "min"),
        ("cties_min", fm.methods.consensus_ties(), "min"),
    ]:
        p = fm.plan(base, fts, blocks=blocks, method=method, linkage=linkage, mesh=mesh)
        _log(f"plan {name}")
        plans[name] = p
        result[name] = [[e.block, list(e.members_a), list(e.members_b), float(e.similarity)]
                        for e in p.events]
    with open(f"{out}/read{pid}.json", "w") as f:  # every process: what it read to plan
        json.dump({"plans": _io("rchar") - read_before,
                   "fingerprints": len(plans) * fingerprint_bytes}, f)
    # Validation tuning: the user's eval_fn runs on every process, here on
    # the params gathered from every process (a collective), in float64 so
    # that the score does not depend on how the sum is split over devices.
    def sq(params):
        return sum(np.sum(np.asarray(multihost_utils.process_allgather(x, tiled=True),
                                     np.float64) ** 2) for x in jax.tree.leaves(params))

    def eval_fn(params, task):  # prefers other lambdas for other tasks
        return -abs(sq(params) - base_sq - 2.0 * (task + 1))

    tuned = fm.plan(base, fts, blocks=blocks, method="ta", mesh=mesh,
                    tune=fm.Tuning(eval_fn, lambdas=(0.5, 1.0, 2.0), start=0.5))
    _log("tuned plan")
    result["ta_tuned_scales"] = [None if s is None else float(s) for s in tuned.scales]
    model = plans["ties_merged"].at_size(2.0)
    result["cut_n_models"] = float(model.n_models)
    merged = fm.merge(base, fts, fm.methods.ties(keep=0.2), blocks=blocks, mesh=mesh)
    params = {}
    for t in range(model.n):
        for path, v in jax.tree_util.tree_leaves_with_path(model.params_for_task(t)):
            # A collective: every process gathers every shard, in the same order.
            params[f"{t}/{jax.tree_util.keystr(path)}"] = np.asarray(
                multihost_utils.process_allgather(v, tiled=True))
    emr = plans["emr_min"].at_size(2.5)  # masked sets, bases, masks
    for t in range(emr.n):
        for path, v in jax.tree_util.tree_leaves_with_path(emr.params_for_task(t)):
            params[f"emr/{t}/{jax.tree_util.keystr(path)}"] = np.asarray(
                multihost_utils.process_allgather(v, tiled=True))
    _log("cuts, merge, gathers")
    # Saving and loading: every process calls the same functions, one path.
    fm.save_cut(f"{out}/cut", plans["ties_merged"], size=2.0)
    fm.save(f"{out}/plan", plans["ties_merged"])
    fm.save_cut(f"{out}/emr", plans["emr_min"], size=2.5)
    # What each process writes, and reads to load onto the mesh: its shards.
    sharded = sum(int(v.nbytes) for b in model.blocks.values() for st in b.sets
                  for v in st.values())
    io = {"sharded_bytes": sharded, "written": -_io("wchar")}
    fm.save(f"{out}/model", model)
    io["written"] += _io("wchar")
    io["read"] = -_io("rchar")
    loaded = fm.load(f"{out}/model", mesh=mesh)
    io["read"] += _io("rchar")
    others = []
    if len(sys.argv) > 6:  # the same model saved by one process of 4 devices
        before = _io("rchar")
        others.append(("one process's saved model", fm.load(f"{sys.argv[6]}/model", mesh=mesh), ""))
        io["read_one_process_save"] = _io("rchar") - before
    with open(f"{out}/io{pid}.json", "w") as f:
        json.dump(io, f)
    _log("saves, load")

    def gathered(m):
        return {f"{t}/{jax.tree_util.keystr(path)}":
                np.asarray(multihost_utils.process_allgather(v, tiled=True))
                for t in range(m.n)
                for path, v in jax.tree_util.tree_leaves_with_path(m.params_for_task(t))}

    checks = {}
    for name, m, prefix in [
            ("saved cut", fm.load(f"{out}/cut", mesh=mesh), ""),
            ("saved model", loaded, ""),
            ("cut of the saved plan", fm.load(f"{out}/plan", mesh=mesh).at_size(2.0), ""),
            ("saved emr cut", fm.load(f"{out}/emr", mesh=mesh), "emr/"), *others]:
        got = {prefix + k: v for k, v in gathered(m).items()}
        want = {k: v for k, v in params.items()
                if k.startswith(prefix) and (prefix or not k.startswith("emr/"))}
        checks[name] = len(want) > 0 and sorted(got) == sorted(want) and all(
            np.array_equal(got[k], want[k]) for k in want)
        leaf = m.blocks[m.partition.names[0]].sets[0]
        checks[name + " is sharded"] = all(
            not v.sharding.is_fully_replicated for v in leaf.values() if v.size >= 64)
    try:  # every process fails alike, before writing anything
        fm.save(f"{out}/plan", plans["ties_merged"])
        checks["saving over an existing directory fails"] = False
    except ValueError as e:
        checks["saving over an existing directory fails"] = "exists" in str(e)
    checks["the emr cut has masks"] = any(b.masks for b in emr.blocks.values())
    # An Orbax export: every process calls it; process 0 writes it.
    fm.export(model, f"{out}/export", task=0, format="orbax")
    exported = jax.tree_util.tree_leaves_with_path(fm.load_params(f"{out}/export"))
    mine = jax.tree_util.tree_leaves_with_path(model.params_for_task(0))
    checks["the orbax export holds task 0's params"] = [p for p, _ in exported] == [
        p for p, _ in mine] and all(np.array_equal(x, params[f"0/{jax.tree_util.keystr(p)}"])
                                    for p, x in exported)
    # A write failing on process 0 alone fails every process at once (the
    # others waited in the next collective).
    from flexmerge_jax.sources import files as io_lib

    real = io_lib.save_npz
    if pid == 0:
        def refuse(f, arrays, path):
            raise ValueError("refused on process 0")
        io_lib.save_npz = refuse
    try:
        fm.export(model, f"{out}/export_fails", task=0, format="npz")
        checks["an export failing on process 0 fails on every process"] = False
    except ValueError as e:
        checks["an export failing on process 0 fails on every process"] = \
            "refused on process 0" in str(e)
    finally:
        io_lib.save_npz = real
    result["load_checks"] = checks
    for path, v in jax.tree_util.tree_leaves_with_path(merged):  # the one-shot merge
        params[f"merged/{jax.tree_util.keystr(path)}"] = np.asarray(
            multihost_utils.process_allgather(v, tiled=True))
    # One process alone writes and reads an Orbax params checkpoint: no
    # barrier with the other process (Orbax's default waits for it). Orbax
    # writes NumPy arrays from process 0 only: the others are refused.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        w = {"a": {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}}
        try:
            fm.save_params(f"{d}/p", w)
            alone = bool(np.array_equal(fm.load_params(f"{d}/p")["a"]["w"], w["a"]["w"]))
        except ValueError as e:
            alone = str(e)
    with open(f"{out}/params_alone{pid}.json", "w") as f:
        json.dump(alone, f)
    if pid == 0:
        np.savez(f"{out}/params.npz", **params)
        with open(f"{out}/result.json", "w") as f:
            json.dump(result, f)
    print(f"process {pid} done", flush=True)


if __name__ == "__main__":
    main()
