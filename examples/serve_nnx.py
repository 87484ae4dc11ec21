"""Multi-task serving of a Flax nnx module planned with FlexMerge.

A small residual MLP (an ``nnx.List`` of layers, called in a loop) is
"fine-tuned" synthetically on 4 tasks, planned with ``fm.plan``, cut at a few
sizes and served with mixed batches: at each layer, the rows of tasks that
share the layer's parameter set share its computation.

Wiring: the forward is the module's own loop, with each layer called through
the router — ``r.apply(path, nnx_block(layer), x)`` runs the nnx layer
with each row's parameters (or ``r.dense(path, x)`` for a plain linear layer,
``r.params(path)`` for small parameters used directly). Paths are the
parameters' paths in ``nnx.state(model, nnx.Param)`` (list indices as
strings), so the forward is independent of the block specification.

Run: python examples/serve_nnx.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flexmerge_jax as fm
from flexmerge_jax import serve
from flexmerge_jax.adapters import nnx_block


class Layer(nnx.Module):
    """Pre-norm residual MLP layer."""

    def __init__(self, width: int, hidden: int, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, width, rngs=rngs)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class ResMLP(nnx.Module):
    def __init__(self, d_in=16, width=64, hidden=128, depth=3, d_out=10, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(d_in, width, rngs=rngs)
        self.layers = nnx.List([Layer(width, hidden, rngs) for _ in range(depth)])
        self.out = nnx.Linear(width, d_out, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def params_of(model: nnx.Module) -> dict:
    """nnx Param state -> nested dict with string keys ("layers/0/up/kernel")."""

    def s(t):
        return {str(k): s(v) for k, v in t.items()} if isinstance(t, dict) else t

    return s(nnx.state(model, nnx.Param).to_pure_dict())


def synthetic_finetunes(base: dict, n: int, seed: int = 0, scale: float = 0.05) -> list[dict]:
    """n task fine-tunes: base + a shared direction + a task-specific one."""
    rng = np.random.default_rng(seed)
    shared = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), base)

    def finetuned(a, c):
        delta = scale * (0.5 * c + rng.standard_normal(a.shape))
        return (np.asarray(a) + delta).astype(np.float32)

    return [jax.tree.map(finetuned, base, shared) for _ in range(n)]


def make_forward(model: ResMLP):
    """The module's own forward, each parameterised call through the router."""
    layer_fns = [nnx_block(layer) for layer in model.layers]  # built once, outside jit

    def forward(r: serve.Router, x):
        x = r.dense("embed", x)                         # grouped matmul
        for i, fn in enumerate(layer_fns):
            x = r.apply(f"layers/{i}", fn, x)           # the nnx layer, segmented by set
        return r.dense("out", x)

    return forward


def main(n_tasks: int = 4, batch: int = 64, seed: int = 0, sizes=None, reps: int = 20) -> dict:
    model = ResMLP(rngs=nnx.Rngs(seed))
    base = params_of(model)
    fts = synthetic_finetunes(base, n_tasks, seed)
    plan = fm.plan(base, fts, blocks="by-layer", method="ta",
                   task_names=[f"task{i}" for i in range(n_tasks)])
    forward = make_forward(model)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def per_task(params, x):  # plain nnx apply with one task's params
        st = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(st, jax.tree.map(jnp.asarray, params))
        return nnx.merge(graphdef, st, rest)(x)

    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((batch, 16)).astype(np.float32)
    task_ids = rng.integers(0, n_tasks, batch).astype(np.int32)  # a mixed batch
    results = {}
    for size in sizes or (float(n_tasks), 2.0, 1.0):
        flex = plan.at_size(size)
        srv = serve.Server(flex, forward)
        y = np.asarray(srv(task_ids, x))
        ref = serve.apply_per_task(flex, per_task, task_ids, x)
        err = float(np.abs(y - ref).max())
        t0 = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(srv(rng.permutation(task_ids), x))  # new mixes: no recompile
        dt = (time.perf_counter() - t0) / max(reps, 1)
        nb = srv.state.nbytes()
        print(f"size {flex.n_models:4.2f}x  max |served - per-task| {err:.2e}  "
              f"compilations {srv.traces}  {batch / dt:9.0f} examples/s  "
              f"params {nb['params'] / 1024:.1f} KiB")
        assert err < 1e-4 and srv.traces == 1
        results[size] = {"n_models": flex.n_models, "max_err": err, "traces": srv.traces}
    return results


if __name__ == "__main__":
    main()
