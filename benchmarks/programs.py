"""XLA programs compiled by a plan and a cut (cold starts).

    python benchmarks/programs.py            # zoo + ViT-B/32-sized case (~5 min)
    python benchmarks/programs.py --quick    # zoo + a small ViT

Each measurement is a fresh process with the persistent compilation cache
off, counting XLA compilations (``jax.monitoring``'s backend-compile
events: their number and seconds; ``jax_log_compiles`` names them) of
one call: ``fm.plan`` (ta and ties,
linkage ``min``), then ``plan.at_size(2)``, then ``fm.save_cut`` at 1x and
2x (after the plan's own cut compiled what the cuts share), and the
one-shot ``flexmerge merge --size 1`` path (``save_groups``) alone. The
ViT case is ``bench_plan``'s (8 models from safetensors files,
``clip-vit-b32``-like blocks).

Writes ``benchmarks/results/programs.json`` and ``programs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:0] = [str(ROOT), str(HERE)]


def job(spec: dict) -> dict:
    import collections
    import logging
    import re
    import time

    import jax

    counts = {"programs": 0, "seconds": 0.0}
    names = collections.Counter()

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["programs"] += 1
            counts["seconds"] += duration

    class Names(logging.Handler):  # which programs: jax_log_compiles' messages
        def emit(self, record):
            m = re.match(r"Finished XLA compilation of (\S+) in", record.getMessage())
            if m:
                names[m.group(1)] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    logging.getLogger("jax").addHandler(Names())
    logging.getLogger("jax").propagate = False  # (the messages are warnings)
    jax.config.update("jax_log_compiles", True)
    import flexmerge_jax as fm

    if spec["case"] == "zoo":
        from flexmerge_jax import zoo

        z = zoo.load()
        inputs, blocks = (z.base, z.finetuned), "vit"
    else:
        inputs, blocks = (spec["base"], spec["finetuned"]), json.load(open(spec["blocks"]))
        blocks = fm.blocks.from_substrings(blocks)
    method = fm.methods.get(spec["method"])
    out, tmp = {}, Path(spec["tmp"])

    def measure(name, fn):
        before = dict(counts)
        names.clear()
        t = time.perf_counter()
        fn()
        out[name] = {"programs": counts["programs"] - before["programs"],
                     "compile_seconds": counts["seconds"] - before["seconds"],
                     "seconds": time.perf_counter() - t, "by_name": dict(names)}

    if spec["what"] == "plan":
        held = {}
        measure("plan", lambda: held.setdefault("p", fm.plan(*inputs, blocks=blocks,
                                                             method=method)))
        p = held["p"]
        measure("at_size(2)", lambda: p.at_size(2.0))
        measure("save_cut(1x)", lambda: fm.save_cut(tmp / "c1", p, size=p.min_size))
        measure("save_cut(2x)", lambda: fm.save_cut(tmp / "c2", p, size=2.0))
    else:
        from flexmerge_jax._plan import axis_end, prepare
        from flexmerge_jax.checkpointing import save_groups

        def one_shot():
            prepared = prepare(*inputs, blocks=blocks, method=method)
            step, groups, size = axis_end(prepared, prepared.n if spec["what"] == "nx" else
                                          1.0)
            save_groups(tmp / "m", prepared, groups, task_names=prepared.source.task_names,
                        n_models=size, step=step, source=None)

        measure("one-shot merge at 1x, saved", one_shot)
    out["total_programs"] = counts["programs"]
    return out


def run(spec: dict, code: Path = ROOT) -> dict:
    env = {**os.environ, "FLEXMERGE_COMPILATION_CACHE": "off",
           "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, __file__, "--code", str(code), "--job",
                            json.dumps({**spec, "tmp": d})],
                           capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(code, spec["case"], spec["method"], spec["what"], res, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--code", default=str(ROOT), help="the flexmerge_jax checkout measured")
    ap.add_argument("--before", help="another checkout (e.g. the code before a change): its "
                                     "plans and cuts are measured too, beside this one's")
    args = ap.parse_args()
    if args.job:
        sys.path.insert(0, args.code)
        print(json.dumps(job(json.loads(args.job))))
        return
    from bench_plan import blocks_for, make_models, vit_shapes, write_models

    codes = [("before", Path(args.before))] if args.before else []
    codes.append(("after" if args.before else "this checkout", Path(args.code)))
    def described(path: Path) -> str:  # the commit measured (and whether edited since)
        git = ["git", "-C", str(path)]
        rev = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "flexmerge_jax"],
                               capture_output=True, text=True).stdout.strip()
        return f"{rev}{' + edits' if dirty else ''}" if rev else str(path)

    results = {"codes": {k: described(v) for k, v in codes}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="fm-programs-") as d:
        model = {"layers": 2, "width": 384, "mlp": 1536} if args.quick else {}
        base, fts = make_models(vit_shapes(**model), 8)
        b, f = write_models(Path(d) / "vit", base, fts)
        del base, fts
        bl = Path(d) / "blocks.json"
        bl.write_text(json.dumps(blocks_for(model.get("layers", 12))))
        vit = {"case": "vit", "base": b, "finetuned": f, "blocks": str(bl)}
        for case in ({"case": "zoo"}, vit):
            for method in ("ta", "ties"):
                for label, code in codes:
                    for what in ("plan", "1x"):
                        results["runs"].append({
                            "code": label, "case": case["case"], "method": method,
                            **run({**case, "method": method, "what": what}, code)})
    name = "programs_quick" if args.quick else "programs"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# XLA programs compiled by a plan and a cut", "",
             "Fresh process per row, persistent cache off. Each cell: programs compiled / "
             "seconds spent compiling (this shared 2-core machine: seconds are noisy; the "
             "counts are exact).", "",
             "Code: " + ", ".join(f"{k} = {v}" for k, v in results["codes"].items()) + ".", "",
             "| code | case | method | call | programs | compile (s) | wall (s) "
             "| programs by name |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        for k, v in r.items():
            if isinstance(v, dict):
                by = ", ".join(f"{name.removeprefix('jit(').removesuffix(')')} {c}"
                               for name, c in sorted(v["by_name"].items(), key=lambda x: -x[1]))
                lines.append(f"| {r['code']} | {r['case']} | {r['method']} | {k} | "
                             f"{v['programs']} | {v['compile_seconds']:.2f} | "
                             f"{v['seconds']:.2f} | {by} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
