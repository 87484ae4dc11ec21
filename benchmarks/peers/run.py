"""flexmerge side by side with mergekit and FusionBench, whole processes.

    python benchmarks/peers/run.py                 # ViT-B/32-sized case, 3 rounds (~30 min)
    python benchmarks/peers/run.py --quick         # a small model, 1 round (smoke run)

Creates its own virtual environment for the peers (``--venv``, default
``benchmarks/peers/.venv``): ``torch==2.13.0``, ``mergekit==0.1.5`` and
``fusion-bench==0.2.33`` are installed there, never into ours; a peer that
fails to install is recorded in the results and left out.

The case is ``bench_plan``'s synthetic CLIP ViT-B/32 visual tower (8
fine-tuned models + base, 87.8M float32 parameters each, one safetensors
file per model; mergekit reads them as model directories). Every operation
is one whole process (imports, reads, compilation, writes), timed by the
wall clock with its peak RSS (``wait4``), after an untimed read of the
inputs and import of the system's modules (the page cache is warm:
FusionBench's TIES would evict them) and a sync of pending writes.
Rounds interleave the systems (round 1: every operation of every system,
then round 2, ...) so that load from other work on the machine spreads
over all of them; the tables give medians. flexmerge runs with its persistent
compilation cache in a fresh directory: round 1 compiles (its times are
reported as the cold start), later rounds find the programs cached.

Writes ``benchmarks/results/peers.json`` and ``peers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's flexmerge_jax
from bench_plan import blocks_for, machine, make_models, vit_shapes, write_models  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PEERS = {"torch": "torch==2.13.0", "mergekit": "mergekit==0.1.5",
         "fusion_bench": "fusion-bench==0.2.33"}
DISTS = {"torch": "torch", "mergekit": "mergekit", "fusion_bench": "fusion-bench"}
# The reference FlexMerge's full TA plan on this case (issue 27's table; the
# reference is not installed here).
REFERENCE_PLAN_SECONDS = 48.9
# Hyperparameters: one merged model, the same in every system. TA: base +
# 0.3 * sum of task vectors (flexmerge's lambda multiplies the mean: 0.3 * 8).
# TIES: keep the top 20% magnitudes of each task vector (whole model),
# elect signs, disjoint mean, lambda 1.
N = 8
TA_SUM_SCALE = 0.3
TIES_KEEP = 0.2


def setup_venv(venv: Path) -> dict:
    """Creates the peers' environment if needed; ``{module: version or
    "failed: why"}``."""
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    status = {}
    for mod, req in PEERS.items():
        version = _version(py, DISTS[mod])
        if version is None:
            r = subprocess.run([str(py), "-m", "pip", "install", req], capture_output=True,
                               text=True)
            version = _version(py, DISTS[mod])
            if version is None:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                version = f"failed: pip install {req}: {tail[0]}"
        status[mod] = version
        print(f"  {mod}: {version}", flush=True)
    return status


def _version(py: Path, dist: str) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def run_timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Runs ``cmd`` to completion; wall seconds, peak RSS, exit status."""
    with open(log, "w") as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT, text=True)
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    res = {"seconds": seconds, "peak_rss_mb": ru.ru_maxrss / 1024, "ok": p.returncode == 0,
           "stdout_tail": out.strip().splitlines()[-1:] or [""]}
    if not res["ok"]:
        res["error"] = log.read_text().strip().splitlines()[-3:]
    return res


FLOOR_READ = """
import sys
for p in sys.argv[1:]:
    with open(p, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
"""
FLOOR_READ_WRITE = FLOOR_READ + """
import os
out, size = os.environ["FLOOR_OUT"], int(os.environ["FLOOR_BYTES"])
chunk = bytes(64 << 20)
with open(out, "wb") as f:
    while size > 0:
        f.write(chunk[:min(size, len(chunk))])
        size -= len(chunk)
"""
# plan + cut at 2x in one process, twice: the first call (cold, or served
# by the persistent cache) against the same call warm.
API = """
import json, sys, time
import flexmerge_jax as fm
base, fts, blocks = sys.argv[1], sys.argv[2:-1], json.load(open(sys.argv[-1]))
times = []
for _ in range(2):
    t = time.perf_counter()
    p = fm.plan(base, fts, blocks=fm.blocks.from_substrings(blocks),
                method=fm.methods.task_arithmetic(%r))
    m = p.at_size(2.0)
    times.append(time.perf_counter() - t)
print(json.dumps({"first": times[0], "warm": times[1]}))
""" % (TA_SUM_SCALE * N)


# What each system imports (run untimed before its operations, see main).
WARM = {"flexmerge": "import flexmerge_jax.cli, orbax.checkpoint",
        "mergekit": "import torch, mergekit.merge",
        "fusionbench": "import torch, fusion_bench"}


def mergekit_yaml(path: Path, method: str, base: Path, models: list[Path]) -> Path:
    params = (f"{{weight: 1.0, density: {TIES_KEEP:g}}}" if method == "ties"
              else f"{{weight: {TA_SUM_SCALE:g}}}")
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m in models:
        lines += [f"  - model: {m}", f"    parameters: {params}"]
    # TA: no normalization (a plain weighted sum); TIES: normalized by the
    # weights, mergekit's counterpart of the disjoint mean.
    lines += [f"parameters: {{normalize: {'true' if method == 'ties' else 'false'}}}",
              "dtype: float32", ""]
    path.write_text("\n".join(lines))
    return path


def operations(case: dict, venv: Path, status: dict, work: Path) -> list[tuple]:
    """``(operation, system, command builder(out path))`` in run order."""
    py, base, fts, blocks = sys.executable, case["base"], case["finetuned"], case["blocks"]
    cli = [py, "-m", "flexmerge_jax.cli"]
    inputs = ["--base", base, "--finetuned", *fts, "--blocks", blocks]
    vpy = str(venv / "bin" / "python")
    have_mk = not status["mergekit"].startswith("failed") and \
        not status["torch"].startswith("failed")
    have_fb = not status["fusion_bench"].startswith("failed") and \
        not status["torch"].startswith("failed")
    mk_ta = mergekit_yaml(work / "mk_ta.yml", "task_arithmetic", case["mk_base"], case["mk_fts"])
    mk_ties = mergekit_yaml(work / "mk_ties.yml", "ties", case["mk_base"], case["mk_fts"])
    mk = [str(venv / "bin" / "mergekit-yaml")]
    mk_flags = ["--no-copy-tokenizer", "--quiet", "--no-write-model-card"]
    fb = [vpy, str(HERE / "fusionbench_merge.py")]
    ops = [
        ("read", "floor", lambda out: [py, "-c", FLOOR_READ, base, *fts]),
        ("read_write", "floor", lambda out: [py, "-c", FLOOR_READ_WRITE, base, *fts]),
        ("ta_1x", "flexmerge", lambda out: [*cli, "merge", *inputs, "--method", "ta", "--scale",
                                            str(TA_SUM_SCALE * N), "--size", "1", "--out", out]),
    ]
    if have_mk:
        ops.append(("ta_1x", "mergekit", lambda out: [*mk, str(mk_ta), out, *mk_flags]))
    if have_fb:
        ops.append(("ta_1x", "fusionbench", lambda out: [*fb, "ta", out, base, *fts, "--scale",
                                                         str(TA_SUM_SCALE)]))
    ops.append(("ties_1x", "flexmerge", lambda out: [*cli, "merge", *inputs, "--method", "ties",
                                                     "--keep", str(TIES_KEEP), "--scale", "1",
                                                     "--size", "1", "--out", out]))
    if have_mk:
        ops.append(("ties_1x", "mergekit", lambda out: [*mk, str(mk_ties), out, *mk_flags]))
    if have_fb:
        ops.append(("ties_1x", "fusionbench", lambda out: [*fb, "ties", out, base, *fts,
                                                           "--scale", "1", "--keep",
                                                           str(TIES_KEEP)]))
    plan = str(work / "plan_ta")
    ops += [
        ("plan_ta", "flexmerge", lambda out: [*cli, "plan", *inputs, "--method", "ta", "--scale",
                                              str(TA_SUM_SCALE * N), "--out", plan,
                                              "--overwrite"]),
        ("cut_2x", "flexmerge", lambda out: [*cli, "cut", plan, "--size", "2", "--out", out]),
        # the same plan, cut and save in one process (one import, the
        # inputs read twice: the plan's pass and the cut's)
        ("merge_2x", "flexmerge", lambda out: [*cli, "merge", *inputs, "--method", "ta",
                                               "--scale", str(TA_SUM_SCALE * N), "--size", "2",
                                               "--out", out]),
        ("api_plan_cut", "flexmerge", lambda out: [py, "-c", API, base, *fts, blocks]),
    ]
    return ops


def _write_case(work: str, model: dict) -> None:
    """Writes the checkpoint files (in a process of its own: see build_case)."""
    base, fts = make_models(vit_shapes(**model), N)
    write_models(Path(work) / "case", base, fts)


def build_case(work: Path, model: dict) -> dict:
    # The models are generated in a child process: a child's peak RSS as
    # wait4 reports it starts from its parent's at the fork, so the driver
    # must never hold them.
    subprocess.run([sys.executable, __file__, "--write-case", str(work), json.dumps(model)],
                   check=True)
    shapes = vit_shapes(**model)
    b = str(work / "case" / "base.safetensors")
    f = [str(work / "case" / f"task{i:02d}.safetensors") for i in range(N)]
    layers = model.get("layers", 12)
    blocks = work / "blocks.json"
    blocks.write_text(json.dumps(blocks_for(layers)))
    # mergekit reads model directories (config.json + model.safetensors);
    # an architecture it does not know makes it infer one from the names.
    mk = []
    for p in [b, *f]:
        d = work / "mk" / Path(p).stem
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").symlink_to(p)
        (d / "config.json").write_text(json.dumps(
            {"architectures": ["OpenClipVisual"], "model_type": "clip_vision_model"}))
        mk.append(d)
    params = sum(int(np.prod(s)) for s in shapes.values())
    return {"base": b, "finetuned": f, "blocks": str(blocks), "mk_base": mk[0], "mk_fts": mk[1:],
            "params": params, "model_bytes": os.path.getsize(b)}


def agreement(outs: dict, case: dict) -> dict:
    """Largest differences between the systems' merged models (the last
    round's outputs)."""
    from safetensors.numpy import load_file

    import flexmerge_jax as fm

    def ours(path):
        m = fm.load(path)
        names, leaves, _ = fm.tree.flatten(m.params_for_task(0))
        return {k: np.asarray(v) for k, v in zip(names, leaves)}

    def peer(path):
        p = Path(path)
        files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out

    res = {}
    for op in ("ta_1x", "ties_1x"):
        if ("flexmerge", op) not in outs:
            continue
        a = ours(outs[("flexmerge", op)])
        for system in ("mergekit", "fusionbench"):
            if (system, op) not in outs or (system, op) == ("mergekit", "ties_1x"):  # see report
                continue
            b = peer(outs[(system, op)])
            diffs = [np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)) for k in a]
            res[f"{op}_vs_{system}"] = {
                "max_abs_diff": float(max(d.max() for d in diffs)),
                "entries_over_1e-6": int(sum((d > 1e-6).sum() for d in diffs)),
                "entries": int(sum(d.size for d in diffs)),
                "missing": sorted(set(a) - set(b)),
            }
            del b
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--venv", default=str(HERE / ".venv"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmp", default=None, help="directory for the case and outputs")
    ap.add_argument("--note", default="", help="a paragraph for the report (what the figures "
                    "depend on that the tables do not say)")
    ap.add_argument("--write-case", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_case:
        return _write_case(args.write_case[0], json.loads(args.write_case[1]))
    repeat = 1 if args.quick else args.repeat
    model = {"layers": 2, "width": 384, "mlp": 1536} if args.quick else {}
    print("peers' environment:", flush=True)
    status = setup_venv(Path(args.venv))
    own = None if args.tmp else tempfile.TemporaryDirectory(prefix="fm-peers-")
    work = Path(args.tmp or own.name)
    try:
        case = build_case(work, model)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "FLOOR_OUT": str(work / "floor.bin"), "FLOOR_BYTES": str(case["model_bytes"]),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               # a cache of flexmerge's own, empty at the start: round 1 is cold
               "FLEXMERGE_COMPILATION_CACHE": str(work / "xla-cache")}
        ops = operations(case, Path(args.venv), status, work)
        inputs = [case["base"], *case["finetuned"]]
        runs: dict = {}
        outs: dict = {}
        load: list = []  # the 1-minute load average before each round
        for r in range(repeat):
            load.append(os.getloadavg()[0])
            for op, system, cmd in ops:
                out = work / "out" / f"{op}_{system}"
                out = out.with_suffix(".safetensors") if system == "fusionbench" else out
                if out.is_dir():
                    shutil.rmtree(out)
                elif out.exists():
                    out.unlink()
                out.parent.mkdir(parents=True, exist_ok=True)
                # Warm the page cache (untimed): FusionBench's TIES holds
                # most of the machine's memory and evicts the inputs and the
                # systems' own libraries.
                subprocess.run([sys.executable, "-c", FLOOR_READ, *inputs], check=True)
                if system in WARM:
                    py = sys.executable if system == "flexmerge" else \
                        str(Path(args.venv) / "bin" / "python")
                    subprocess.run([py, "-c", WARM[system]], check=True, env=env,
                                   capture_output=True)
                # Nothing left to write back from earlier operations
                # (untimed): flexmerge syncs its output before claiming it,
                # and a sync also waits for whatever else is dirty (the
                # previous operation's 351-702 MB output, written by a peer
                # that does not sync: once 11.7 s against 3.6 s).
                os.sync()
                res = run_timed(cmd(str(out)), env, work / "stderr.log")
                runs.setdefault(f"{op}/{system}", []).append(res)
                outs[(system, op)] = out
                print(f"  round {r + 1} {op:13s} {system:12s} {res['seconds']:7.2f} s "
                      f"{res['peak_rss_mb']:7.0f} MB{'' if res['ok'] else ' FAILED'}", flush=True)
        # A child's peak RSS (wait4) is at least its parent's at the fork.
        driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        agree = agreement({k: v for k, v in outs.items() if v.exists()}, case)
    finally:
        if own is not None:
            own.cleanup()
    results = {"machine": machine(), "model": model or "ViT-B/32",
               "params_per_model": case["params"], "n": N, "rounds": repeat, "peers": status,
               "runs": runs, "agreement": agree,
               "driver_peak_rss_mb": driver_rss, "load_before_rounds": load,
               "reference_plan_seconds": REFERENCE_PLAN_SECONDS,
               **({"note": args.note} if args.note else {})}
    name = "peers_quick" if args.quick else "peers"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(report(results))
    print(report(results))


def _median(runs: list, key="seconds") -> float:
    ok = [r[key] for r in runs if r["ok"]]
    return statistics.median(ok) if ok else float("nan")


def report(r: dict) -> str:
    runs, m = r["runs"], r["machine"]
    med = {k: _median(v) for k, v in runs.items()}
    rss = {k: _median(v, "peak_rss_mb") for k, v in runs.items()}
    cell = lambda k: f"{med[k]:.1f} s ({rss[k]:.0f} MB)" if k in med and med[k] == med[k] else \
        ("failed" if k in runs else "")
    api = [json.loads(x["stdout_tail"][0]) for x in runs.get("api_plan_cut/flexmerge", [])
           if x["ok"]]
    lines = [
        f"# flexmerge and its peers ({r['params_per_model']:,} parameters per model, n = {r['n']})",
        "",
        f"Machine: {m['cpu']} ({m.get('vector', 'vector unit not recorded')}), "
        f"{m['cores']} cores, {m['ram_gib']} GiB RAM; jax {m['jax']}. Peers "
        f"in their own environment: " + ", ".join(f"{k} {v}" for k, v in r["peers"].items()) + ".",
        "",
        "Whole processes, warm page cache (the inputs read, the system's modules imported and "
        "pending writes synced, untimed, before each), median "
        f"of {r['rounds']} interleaved rounds (peak RSS in brackets; a process's peak counts "
        "from its parent's at the fork, "
        f"{r['driver_peak_rss_mb']:.0f} MB here, so smaller peaks read as that). Single "
        "timings are in peers.json; the rounds interleave the systems so that load from "
        "other work spreads over all of them (1-minute load average before each round: "
        + ", ".join(f"{x:.1f}" for x in r.get("load_before_rounds", [])) + ").",
        "",
    ] + ([r["note"], ""] if r.get("note") else []) + [
        "| operation | flexmerge | mergekit | FusionBench | floor |",
        "|---|---|---|---|---|",
        f"| read all inputs once | | | | {cell('read/floor')} |",
        f"| read all inputs + write one model | | | | {cell('read_write/floor')} |",
        f"| one-shot task arithmetic at 1x, written | {cell('ta_1x/flexmerge')} | "
        f"{cell('ta_1x/mergekit')} | {cell('ta_1x/fusionbench')} | |",
        f"| one-shot TIES at 1x, written | {cell('ties_1x/flexmerge')} | "
        f"{cell('ties_1x/mergekit')} | {cell('ties_1x/fusionbench')} | |",
        f"| full TA plan (every size), saved | {cell('plan_ta/flexmerge')} | | | |",
        f"| cut the plan at 2x and save | {cell('cut_2x/flexmerge')} | | | |",
        f"| plan + cut at 2x + save, one process (`merge --size 2`) | "
        f"{cell('merge_2x/flexmerge')} | | | |",
        "",
        "Ratios (targets of issue 27):",
        "",
    ]
    g = lambda k: med.get(k, float("nan"))
    ta, rw = g("ta_1x/flexmerge"), g("read_write/floor")
    rows = [
        ("one-shot TA / (read inputs + write output)", ta / rw, "<= 1.5"),
        ("one-shot TA / mergekit's", ta / g("ta_1x/mergekit"), "< 1"),
        ("mergekit's TIES / ours", g("ties_1x/mergekit") / g("ties_1x/flexmerge"), ">= 4"),
        ("FusionBench's TIES / ours", g("ties_1x/fusionbench") / g("ties_1x/flexmerge"), ">= 4"),
        (f"reference plan ({r['reference_plan_seconds']} s, issue 27) / (plan + cut at 2x)",
         r["reference_plan_seconds"] / (g("plan_ta/flexmerge") + g("cut_2x/flexmerge")), ">= 10"),
        (f"reference plan ({r['reference_plan_seconds']} s) / (merge --size 2, one process)",
         r["reference_plan_seconds"] / g("merge_2x/flexmerge"), ">= 10"),
    ]
    if api:
        rows.append(("API plan + at_size(2): first call cold (empty cache) - warm call, s",
                     api[0]["first"] - api[0]["warm"], "<= ~2"))
        if len(api) > 1:  # the same process's warm call is the reference
            rows.append(("API: first call of a later process (cache filled) / warm call",
                         statistics.median(a["first"] / a["warm"] for a in api[1:]), "<= 1.3"))
    lines += ["| ratio | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b:.2f} | {c} |" for a, b, c in rows]
    first = {k: v[0]["seconds"] for k, v in runs.items() if k.endswith("flexmerge") and v[0]["ok"]}
    lines += ["", "flexmerge's round 1 (empty compilation cache): " + ", ".join(
        f"{k.split('/')[0]} {v:.1f} s" for k, v in first.items()) + "."]
    lines += ["", "Output agreement (the last round's merged models, float64 differences):", ""]
    for k, v in r["agreement"].items():
        lines.append(f"- {k}: max |diff| {v['max_abs_diff']:.2e}, {v['entries_over_1e-6']:,} of "
                     f"{v['entries']:,} entries differ by more than 1e-6"
                     + (f", missing {v['missing'][:3]}" if v["missing"] else ""))
    lines += [
        "",
        "mergekit's TIES trims each tensor separately (its `density`), ours and FusionBench's "
        "the whole model, so that pair is timed, not compared. Where a coordinate's elected "
        "sign is zero, both take the majority sign instead, FusionBench's over the whole model "
        "and ours over the block (the reference's rule): those entries may differ.",
    ]
    failed = [f"{k}: {v[0].get('error')}" for k, v in runs.items() if not v[0]["ok"]]
    if failed:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
