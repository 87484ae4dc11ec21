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
machine spreads over them; the tables give medians.

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

from run import FLOOR_READ_WRITE, N, RESULTS, ROOT, TA_SUM_SCALE, build_case, machine, run_timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="the checkout to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="directory for the case and outputs")
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
    results = {"machine": machine(), "params_per_model": case["params"], "n": N,
               "rounds": args.rounds, "runs": runs, "median_seconds": med,
               "ratio_to_floor": {k: med[k] / med["floor"] for k in ("before", "after")}}
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
        f"# One-shot TA at 1x, written: before and after (`benchmarks/peers/write_speed.py`)",
        "",
        f"ViT-B/32-sized case ({r['params_per_model']:,} float32 parameters per model, base + "
        f"{r['n']} fine-tuned safetensors files), `flexmerge merge --method ta --size 1`, whole "
        f"processes, warm page cache and compilation caches, {r['rounds']} interleaved rounds "
        f"after a warm-up; {m.get('cpu')}, {m.get('cores')} cores shared with other jobs (single "
        "timings are noisy: all are listed).",
        "",
        "| run | median | / floor | peak RSS | every round (s) |",
        "|---|---|---|---|---|",
        row("floor", "floor: read the inputs + write one model (plain Python)"),
        row("before", "before: one Orbax checkpoint per block (format 2)"),
        row("after", "after: blocks in parts of <= 512 MiB (format 3)"),
        "",
        "Target (issue 27): one-shot TA within 1.5x of the floor.",
        "",
    ])


def _case(work: Path) -> dict:
    """The case's files (written once; ``build_case`` with the files already
    there only rebuilds its small side files)."""
    base = work / "case" / "base.safetensors"
    if base.exists():
        from run import blocks_for, vit_shapes
        import numpy as np

        blocks = work / "blocks.json"
        blocks.write_text(json.dumps(blocks_for(12)))
        params = sum(int(np.prod(s)) for s in vit_shapes().values())
        return {"base": str(base),
                "finetuned": [str(work / "case" / f"task{i:02d}.safetensors") for i in range(N)],
                "blocks": str(blocks), "params": params, "model_bytes": base.stat().st_size}
    return build_case(work, {})


if __name__ == "__main__":
    main()
