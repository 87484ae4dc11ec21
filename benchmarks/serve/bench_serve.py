"""Throughput of batched multi-task serving of the zoo vs the n models one by one.

For each cut of one plan (default ``ta`` at 1x, ~2x, ~4x, 8x) a mixed batch of
``n * per_task`` test images (every task, random order) runs through
:class:`flexmerge_jax.serve.Server` (``zoo.vit_forward``, each row's own
head). The baseline runs the same examples as n calls, each task's
``per_task`` images through its own fine-tuned params and head
(``zoo.apply.logits``, jitted). Compile time is measured apart
(``lower().compile()`` for the server, first calls for the baseline); steady
state is the median over ``--rounds`` interleaved rounds of ``--reps`` calls,
each ended by ``jax.block_until_ready``.

Writes ``<out>/<name>.json`` and ``<out>/<name>.md`` (default ``benchmarks/results/serve_zoo``).

Run: python benchmarks/serve/bench_serve.py [--per-task 8 32] [--impls auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import flexmerge_jax as fm
from flexmerge_jax import serve, zoo
from flexmerge_jax.zoo import apply as F

ROOT = Path(__file__).resolve().parents[2]


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _per_task_logits(params, images):
    return F.logits(params, params["head"], images)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="ta")
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--per-task", type=int, nargs="+", default=[8, 32],
                    help="examples per task in a batch (batch = n * per_task)")
    ap.add_argument("--impls", nargs="+", default=["auto"], help="serve dense impls")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="serve_zoo", help="output file stem")
    args = ap.parse_args(argv)

    z = zoo.load()
    n = z.num_tasks
    heads = zoo.padded_heads(z.heads)
    t0 = time.perf_counter()
    plan = fm.plan(z.base, z.finetuned, blocks="vit", method=args.method, task_names=z.task_names)
    plan_s = time.perf_counter() - t0
    models = {s: plan.at_size(min(max(s, plan.min_size), n)) for s in args.sizes}
    rng = np.random.default_rng(0)
    fts = [jax.tree.map(jnp.asarray, f) for f in z.finetuned]
    hs = [jax.tree.map(jnp.asarray, h) for h in z.heads]
    logits = jax.jit(F.logits)
    load_start = _load()

    runs = []  # (label dict, callable)
    for per in args.per_task:
        xs = [jnp.asarray(z.test_sets[t].images[:per]) for t in range(n)]
        imgs = np.concatenate([np.asarray(x) for x in xs])
        tids = np.repeat(np.arange(n), per).astype(np.int32)
        p = rng.permutation(len(tids))
        imgs, tids = jnp.asarray(imgs[p]), jnp.asarray(tids[p])

        def one_by_one(xs=xs):
            return [logits(fts[t], hs[t], xs[t]) for t in range(n)]

        t = time.perf_counter()
        jax.block_until_ready(one_by_one())
        runs.append(({"mode": "one-by-one", "size": float(n), "n_models": float(n),
                      "impl": "-", "per_task": per, "batch": n * per,
                      "compile_s": time.perf_counter() - t,
                      "bytes": int(sum(a.nbytes for f in fts for a in jax.tree.leaves(f))),
                      "max_abs_diff": 0.0}, one_by_one))
        for s, m in models.items():
            for impl in args.impls:
                srv = serve.Server(m, zoo.vit_forward, per_task={"head": heads}, dense_impl=impl)
                t = time.perf_counter()
                compiled = srv.lower(tids, imgs).compile()
                compile_s = time.perf_counter() - t
                out = np.asarray(compiled(srv.state, tids, imgs))
                ref = serve.apply_per_task(m, _per_task_logits, tids, imgs,
                                           per_task={"head": z.heads})
                fin = np.isfinite(ref)
                diff = float(np.abs(out[fin] - ref[fin]).max())
                runs.append(({"mode": "served", "size": s, "n_models": m.n_models,
                              "impl": (impl if impl != "auto"
                                       else f"auto:{serve._default_dense_impl()}"),
                              "per_task": per, "batch": n * per, "compile_s": compile_s,
                              "bytes": srv.state.nbytes()["total"], "max_abs_diff": diff},
                             lambda c=compiled, st=srv.state, t_=tids, x=imgs: c(st, t_, x)))

    per_round: list[list[float]] = [[] for _ in runs]
    for _ in range(args.rounds):
        for i, (_, fn) in enumerate(runs):
            jax.block_until_ready(fn())
            t = time.perf_counter()
            for _ in range(args.reps):
                jax.block_until_ready(fn())
            per_round[i].append((time.perf_counter() - t) / args.reps)

    rows = []
    base = {}
    for (info, _), ts in zip(runs, per_round):
        med = float(np.median(ts))
        info = dict(info, seconds_per_batch=med, examples_per_s=info["batch"] / med,
                    examples_per_s_best=info["batch"] / float(np.min(ts)))
        if info["mode"] == "one-by-one":
            base[info["per_task"]] = info["examples_per_s"]
        rows.append(info)
    for r in rows:
        r["speedup_vs_one_by_one"] = r["examples_per_s"] / base[r["per_task"]]

    dev = jax.devices()[0]
    machine = {
        "device": f"{dev.platform}:{dev.device_kind}",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": _load(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "dtype": "float32",
    }
    result = {
        "benchmark": "serve_zoo",
        "method": args.method,
        "plan_seconds": plan_s,
        "tasks": list(z.task_names),
        "params_per_model": int(plan.partition.total),
        "reps": args.reps,
        "rounds": args.rounds,
        "machine": machine,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"# Batched multi-task serving of the zoo ({res['method']}, {len(res['tasks'])} tasks)",
        "",
        f"Device `{m['device']}` ({m['cpu']}, {m['cpu_count']} cores), JAX {m['jax']}, "
        f"{m['dtype']}; {res['params_per_model']} parameters per model. Median of "
        f"{res['rounds']} interleaved rounds of {res['reps']} batches "
        f"(`jax.block_until_ready` per batch); load average {m['load_average_start']} -> "
        f"{m['load_average_end']}.",
        "",
        "| mode | size | impl | batch (n x per task) | compile s | examples/s | best examples/s "
        "| vs one-by-one | MiB held |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['mode']} | {r['n_models']:.2f}x | {r['impl']} | {r['batch']} "
            f"({len(res['tasks'])} x {r['per_task']}) | {r['compile_s']:.2f} | "
            f"{r['examples_per_s']:.0f} | {r['examples_per_s_best']:.0f} | "
            f"{r['speedup_vs_one_by_one']:.2f} | {r['bytes'] / 2**20:.2f} |"
        )
    lines += [
        "",
        "one-by-one: each task's images through its own fine-tuned params and head "
        "(n jitted calls, the n x model). served: one mixed batch (random task order) through "
        "`serve.Server(plan.at_size(size), zoo.vit_forward)` with per-row heads; compile "
        "time is `lower().compile()` of that batch shape. MiB held: device bytes of the "
        "stacked model (served, with heads and routing tables) or of the n fine-tuned "
        "backbones (one-by-one).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
