"""Saved outputs of every built-in method (plans and cuts), for refactors.

``python tests/golden_methods.py`` (with ``PYTHONPATH`` at the repository
root) regenerates ``tests/fixtures/golden/methods.json`` from the current
code; ``tests/test_golden_methods.py`` checks the code against it. The file
was generated before the methods moved into ``flexmerge_jax/methods/`` (one
module per method), so it holds the behaviour of the old ``Method`` record:
events (blocks, members, similarities, sizes) and a SHA-256 of every task's
cut parameters at several steps, bit for bit.
"""

import hashlib
import json
import sys
from pathlib import Path

import jax
import numpy as np

import flexmerge_jax as fm

from conftest import random_case

PATH = Path(__file__).resolve().parent / "fixtures" / "golden" / "methods.json"
BLOCKS = ["l1.mlp", "l1.attn", "l0.mlp", "l0.attn", "emb"]
M = fm.methods

# (label, method factory, linkage, n tasks)
CASES = [
    ("avg", lambda: M.average(), "min", 5),
    ("ta", lambda: M.task_arithmetic(1.3), None, 5),
    ("ta_sum", lambda: M.task_arithmetic(0.4, convention="sum"), None, 5),
    ("ties", lambda: M.ties(1.2, keep=0.3), None, 5),
    ("ties_nokeep", lambda: M.ties(0.9), "mean", 5),
    ("ties_max", lambda: M.ties(1.0, merge_func="max"), None, 5),
    ("pcb", lambda: M.pcb(1.1, keep=0.2), None, 5),
    ("consensus_ta", lambda: M.consensus_ta(1.4, consensus=0.4), None, 5),
    ("consensus_ties", lambda: M.consensus_ties(1.0), None, 5),
    ("emr", lambda: M.emr(), None, 5),
    ("dare_ta", lambda: M.dare(M.task_arithmetic(1.0), drop=0.5, seed=7), None, 5),
    ("dare_ties", lambda: M.dare(M.ties(1.0), drop=0.3), None, 5),
    ("tsv", lambda: M.tsv(1.0), None, 5),
    ("tsv_k", lambda: M.tsv(0.8, k=2), None, 4),
    ("iso_c", lambda: M.iso_c(1.2), None, 4),
    ("iso_cts", lambda: M.iso_cts(1.0, common_fraction=0.6), None, 4),
    ("breadcrumbs", lambda: M.breadcrumbs(1.0, top=0.05, bottom=0.5), None, 4),
    ("della", lambda: M.della(1.0, density=0.6, epsilon=0.1, seed=3), None, 4),
    ("magmax", lambda: M.magmax(0.9), None, 4),
    ("model_stock", lambda: M.model_stock(), None, 4),
    ("slerp", lambda: M.slerp(0.3), None, 2),
]


def _digest(params: dict) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode() + str(a.dtype).encode()
                 + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


# The zoo (a real ViT, ``blocks="vit"``): label -> (method, linkage, tasks).
ZOO_CASES = [
    ("zoo_ties", lambda: M.ties(1.0, keep=0.2), "min", 8),
    ("zoo_emr", lambda: M.emr(), None, 3),
]


def _inputs(label: str, n: int):
    if label.startswith("zoo_"):
        from flexmerge_jax import zoo

        z = zoo.load()
        return z.base, list(z.finetuned[:n]), "vit"
    base, fts = random_case(11, n=n)
    return base, fts, BLOCKS


def run_case(label: str, make, linkage, n: int) -> dict:
    base, fts, blocks = _inputs(label, n)
    p = fm.plan(base, fts, blocks=blocks, method=make(), linkage=linkage)
    steps = sorted({0, p.num_steps // 2, p.num_steps})
    cuts = {}
    for s in steps:
        model = p.at_step(s)
        cuts[str(s)] = [_digest(model.params_for_task(t)) for t in range(n)]
    return {
        "method": p.method.to_json(),
        "events": [e.to_json() for e in p.events],
        "sizes": [float(v) for v in p.sizes],
        "cuts": cuts,
    }


if __name__ == "__main__":
    PATH.parent.mkdir(parents=True, exist_ok=True)
    only = sys.argv[1:]  # labels to regenerate (default: all)
    out = json.loads(PATH.read_text()) if only and PATH.exists() else {}
    out.update({label: run_case(label, make, linkage, n)
                for label, make, linkage, n in CASES + ZOO_CASES if not only or label in only})
    PATH.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PATH}", file=sys.stderr)
