"""Merged-vector plans of TSV-like methods with and without per-block shared state.

    python benchmarks/bench_shared_state.py     # ~7 min on 2 cores

Breadcrumbs and DELLA rank every task's entries (a sort) before merging a
group; that work does not depend on the group, so ``Prepared.extra`` computes
it once per block (:meth:`flexmerge_jax.methods.Method.shared_state`) instead
of at each of the block's merges. This measures ``fm.plan(linkage=None,
similarity="cosine")`` both ways in one run (the "per merge" runs patch
``shared_state`` out, so the kernels compute everything for each group) on a
one-layer, width-384 synthetic ViT (3.2M parameters per model), n = 8,
and checks that both give the same schedule.

Writes ``benchmarks/results/bench_shared_state.{json,md}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flexmerge_jax as fm  # noqa: E402

from bench_plan import RESULTS, _timed, machine, make_models, vit_shapes  # noqa: E402


def _plan(base, fts, method) -> tuple[dict, list]:
    """Timings (:func:`bench_plan._timed`, one steady-state run) and the
    schedule of the merged-vector plan."""
    held = {}

    def run():
        held["plan"] = fm.plan(base, fts, blocks="clip-vit-b32", method=method, linkage=None,
                               similarity="cosine")

    t = _timed(run, repeat=1)
    return t, [(e.block, e.members_a, e.members_b) for e in held["plan"].events]


def main() -> None:
    shapes = vit_shapes(layers=1, width=384, mlp=1536)
    P = sum(int(np.prod(s)) for s in shapes.values())
    base, fts = make_models(shapes, 8)
    methods = {"breadcrumbs": fm.methods.breadcrumbs(0.5, top=0.01, bottom=0.8),
               "della": fm.methods.della(1.0, density=0.5, epsilon=0.1)}
    out = {"machine": machine(), "params_per_model": P, "n": 8, "runs": {}}
    shared_state = fm.methods.Method.shared_state
    for name, m in methods.items():
        once, events = _plan(base, fts, m)
        fm.methods.Method.shared_state = lambda self, x, key=None, **kw: {}
        try:
            per_merge, events_old = _plan(base, fts, m)
        finally:
            fm.methods.Method.shared_state = shared_state
        if events != events_old:
            raise AssertionError(f"{name}: the two paths gave different schedules")
        out["runs"][name] = {"once_per_block": once, "per_merge": per_merge}
        print(name, out["runs"][name], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_shared_state.json").write_text(json.dumps(out, indent=1) + "\n")
    (RESULTS / "bench_shared_state.md").write_text(report(out))
    print(report(out))


def report(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Merged-vector plans: shared per-block state vs recomputed per merge",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']} on {m['device']}. "
        f"Synthetic one-layer ViT, width 384 ({r['params_per_model']:,} parameters per model), "
        f"n = {r['n']}, `linkage=None, similarity=\"cosine\"`; same schedules both ways (checked).",
        "",
        "| method | shared state once per block (s) | recomputed at each merge (s) | speed-up |",
        "|---|---|---|---|",
    ]
    for name, run in r["runs"].items():
        a, b = run["once_per_block"]["seconds"], run["per_merge"]["seconds"]
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.1f}x |")
    lines += ["", "Steady-state times (second run; the first compiles).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
