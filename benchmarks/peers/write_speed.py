"""One-shot task arithmetic at 1x, written, against the floor of reading the
inputs and writing one model, for two checkouts of flexmerge_jax (before
and after a change to how outputs are written), in one run.

    python benchmarks/peers/write_speed.py --before /path/to/old/checkout [--rounds 3]

The case is :mod:`run`'s (the ViT-B/32-sized safetensors files, 8 fine-tuned
models + base); ``--tmp DIR`` reuses (or keeps) the case there. Each round
runs the floor (``read + write``), the old checkout's and this checkout's
``flexmerge merge --method ta --size 1``, each a whole process with its own
persistent compilation cache (round 0, a warm-up that fills it, is not
counted); rounds interleave the three so that load from other work on the
machine spreads over them; the tables give medians. Before the rounds, one
process per checkout (twice, in turn) times ``fm.save`` alone of the merged
model held in memory against writing the same arrays with plain Python.

Writes ``benchmarks/results/write_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from run import FLOOR_READ_WRITE, RESULTS, ROOT, TA_SUM_SCALE, N, build_case, machine, run_timed

# In one process of a checkout: the merged 1x model (a FlexModel) in memory, then, 3 times
# in turn, its bytes written with plain Python (to the page cache, and with
# an fsync per file as TensorStore does by default) and fm.save of it.
SAVE_ONLY = """
import json, os, shutil, sys, time
import numpy as np
import flexmerge_jax as fm
base, fts, blocks, out = sys.argv[1], sys.argv[2:-2], json.load(open(sys.argv[-2])), sys.argv[-1]
m = fm.plan(base, fts, blocks=fm.blocks.from_substrings(blocks), linkage="min",
            method=fm.methods.task_arithmetic(%r)).at_size(1.0)
arrays = [np.asarray(v) for b in m.blocks.values() for st in b.sets for v in st.values()]
def raw(sync):
    os.makedirs(out)
    for i, a in enumerate(arrays):
        with open(f"{out}/{i}", "wb") as f:
            f.write(a.tobytes())
            if sync:
                f.flush()
                os.fsync(f.fileno())
times = {"raw": [], "raw_fsync": [], "fm_save": []}
for _ in range(3):
    for name, fn in [("raw", lambda: raw(False)), ("raw_fsync", lambda: raw(True)),
                     ("fm_save", lambda: fm.save(out, m))]:
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
shutil.rmtree(out, ignore_errors=True)
print(json.dumps({"bytes": sum(a.nbytes for a in arrays), "arrays": len(arrays),
                  "blocks": len(m.blocks), **times}))
""" % (TA_SUM_SCALE * N)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the checkout to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="directory for the case and outputs")
    ap.add_argument("--before-label", default="", help="what the old checkout does")
    ap.add_argument("--after-label", default="", help="what this checkout changes")
    args = ap.parse_args()
    own = None if args.tmp else tempfile.TemporaryDirectory(prefix="fm-write-")
    work = Path(args.tmp or own.name)
    try:
        case = _case(work)
        env = {**os.environ, "FLOOR_OUT": str(work / "floor.bin"),
               "FLOOR_BYTES": str(case["model_bytes"])}
        py, out = sys.executable, work / "out"
        merge = ["-m", "flexmerge_jax.cli", "merge", "--base", case["base"], "--finetuned",
                 *case["finetuned"], "--blocks", case["blocks"], "--method", "ta", "--scale",
                 str(TA_SUM_SCALE * N), "--size", "1", "--out", str(out), "--quiet"]
        systems = {
            "floor": ([py, "-c", FLOOR_READ_WRITE, case["base"], *case["finetuned"]], None),
            "before": ([py, *merge], Path(args.before).resolve()),
            "after": ([py, *merge], ROOT),
        }
        saves: dict = {"before": [], "after": []}
        for _ in range(2):  # fm.save alone, the two checkouts in turn
            for name in ("before", "after"):
                checkout = systems[name][1]
                e = {**env, "PYTHONPATH": str(checkout),
                     "FLEXMERGE_COMPILATION_CACHE": str(work / f"xla-cache-{name}")}
                res = run_timed([py, "-c", SAVE_ONLY, case["base"], *case["finetuned"],
                                 case["blocks"], str(work / "save_only")], e,
                                work / "stderr.log")
                if not res["ok"]:
                    raise SystemExit(f"save-only run failed: {res['error']}")
                saves[name].append(json.loads(res["stdout_tail"][0]))
                print(f"  save-only {name}: {saves[name][-1]}", flush=True)
        runs: dict = {k: [] for k in systems}
        for r in range(args.rounds + 1):
            for name, (cmd, checkout) in systems.items():
                shutil.rmtree(out, ignore_errors=True)
                e = dict(env)
                if checkout is not None:
                    e.update(PYTHONPATH=str(checkout),
                             FLEXMERGE_COMPILATION_CACHE=str(work / f"xla-cache-{name}"))
                res = run_timed(cmd, e, work / "stderr.log")
                if checkout is not None:
                    res["output_bytes"] = sum(f.stat().st_size for f in out.rglob("*")
                                              if f.is_file())
                print(f"  round {r} {name:7s} {res['seconds']:7.2f} s "
                      f"{res['peak_rss_mb']:7.0f} MB{'' if res['ok'] else ' FAILED'}", flush=True)
                if r > 0:
                    runs[name].append(res)
    finally:
        if own is not None:
            own.cleanup()
    med = {k: statistics.median(x["seconds"] for x in v if x["ok"]) for k, v in runs.items()}
    save_med = {name: {k: statistics.median(t for rec in recs for t in rec[k])
                       for k in ("raw", "raw_fsync", "fm_save")}
                for name, recs in saves.items()}
    results = {"machine": machine(), "params_per_model": case["params"], "n": N,
               "rounds": args.rounds, "runs": runs, "median_seconds": med,
               "ratio_to_floor": {k: med[k] / med["floor"] for k in ("before", "after")},
               "commits": {name: _commit(systems[name][1]) for name in ("before", "after")},
               "labels": {"before": args.before_label, "after": args.after_label},
               "save_only": saves, "save_only_median_seconds": save_med,
               "saved_bytes": saves["after"][0]["bytes"], "blocks": saves["after"][0]["blocks"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "write_speed.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "write_speed.md").write_text(report(results))
    print(json.dumps({"median_seconds": med, "ratio_to_floor": results["ratio_to_floor"]},
                     indent=1))


def report(r: dict) -> str:
    med, runs = r["median_seconds"], r["runs"]

    def row(name, label):
        ok = [x for x in runs[name] if x["ok"]]
        rss = statistics.median(x["peak_rss_mb"] for x in ok)
        every = ", ".join(f"{x['seconds']:.1f}" for x in runs[name])
        ratio = "1" if name == "floor" else f"{r['ratio_to_floor'][name]:.2f}"
        return f"| {label} | {med[name]:.1f} s | {ratio} | {rss:.0f} MB | {every} |"

    m = r["machine"]
    return "\n".join([
        "# One-shot TA at 1x, written: before and after (`benchmarks/peers/write_speed.py`)",
        "",
        f"ViT-B/32-sized case ({r['params_per_model']:,} float32 parameters per model, base + "
        f"{r['n']} fine-tuned safetensors files), `flexmerge merge --method ta --size 1`, whole "
        f"processes, warm page cache and compilation caches, {r['rounds']} interleaved rounds "
        f"after a warm-up; {m.get('cpu')}, {m.get('cores')} cores (single timings vary from run "
        "to run on this machine: all are listed).",
        "",
        "| run | median | / floor | peak RSS | every round (s) |",
        "|---|---|---|---|---|",
        row("floor", "floor: read the inputs + write one model (plain Python)"),
        *[row(k, f"{k} ({r['commits'][k]})" + (f": {r['labels'][k]}" if r["labels"][k] else ""))
          for k in ("before", "after")],
        "",
        "Target (issue 27): one-shot TA within 1.5x of the floor.",
        "",
        f"`fm.save` alone of the merged model held in memory ({r['saved_bytes'] / 1e6:.0f} MB in "
        f"{r['blocks']} blocks), against writing the same arrays with plain Python, one file "
        "each, to the page cache and with an fsync per file (TensorStore's default, which Orbax "
        "keeps; the floor above does not sync); one process per checkout, twice in turn, 3 "
        "repetitions each, medians:",
        "",
        "| checkout | plain write | plain write + fsync | fm.save | fm.save / plain + fsync |",
        "|---|---|---|---|---|",
        *[f"| {name} | {v['raw']:.2f} s | {v['raw_fsync']:.2f} s | {v['fm_save']:.2f} s | "
          f"{v['fm_save'] / v['raw_fsync']:.2f} |"
          for name, v in r["save_only_median_seconds"].items()],
        "",
    ])


def _commit(checkout: Path) -> str:
    import subprocess

    r = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def _case(work: Path) -> dict:
    """The case's files (written once; ``build_case`` with the files already
    there only rebuilds its small side files)."""
    base = work / "case" / "base.safetensors"
    if base.exists():
        import numpy as np

        from run import blocks_for, vit_shapes

        blocks = work / "blocks.json"
        blocks.write_text(json.dumps(blocks_for(12)))
        params = sum(int(np.prod(s)) for s in vit_shapes().values())
        return {"base": str(base),
                "finetuned": [str(work / "case" / f"task{i:02d}.safetensors") for i in range(N)],
                "blocks": str(blocks), "params": params, "model_bytes": base.stat().st_size}
    return build_case(work, {})


if __name__ == "__main__":
    main()
