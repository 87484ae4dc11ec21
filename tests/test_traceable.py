"""Numeric hyperparameters are traceable: jit, vmap and grad through fm.merge.

Each traced result is checked against the eager host engine (a Python loop
over the values) and gradients against central finite differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm

from conftest import random_case

BLOCKS = ["l1.mlp", "l1.attn", "l0.mlp", "l0.attn", "emb"]
M = fm.methods

# (factory of a numeric value, name): the traced hyperparameter of each.
TRACEABLE = [
    (lambda s: M.average(), "avg"),
    (lambda s: M.task_arithmetic(s), "ta"),
    (lambda s: M.task_arithmetic(s, convention="sum"), "ta_sum"),
    (lambda s: M.ties(s, keep=0.2), "ties_keep"),
    (lambda s: M.ties(s), "ties"),
    (lambda s: M.ties(s, merge_func="max"), "ties_max"),
    (lambda s: M.dare(M.task_arithmetic(s), drop=0.4, seed=2), "dare_ta"),
    (lambda s: M.tsv(s), "tsv"),
    (lambda s: M.iso_c(s), "iso_c"),
    (lambda s: M.iso_cts(s, common_fraction=0.5), "iso_cts"),
    (lambda s: M.breadcrumbs(s, top=0.05, bottom=0.5), "breadcrumbs"),
    (lambda s: M.della(s, density=0.6, epsilon=0.1, seed=1), "della"),
    (lambda s: M.magmax(s), "magmax"),
    (lambda s: M.model_stock(), "model_stock"),
]


def _loss(params):
    return sum(jnp.sum(jnp.sin(7.0 * v)) for v in jax.tree.leaves(params))


@pytest.mark.parametrize("make,label", TRACEABLE, ids=[t[1] for t in TRACEABLE])
def test_jit_vmap_equals_the_python_loop(make, label):
    base, fts = random_case(5, n=4)
    values = [0.5, 1.0, 1.7]
    traces = []

    def f(s):
        traces.append(1)
        return fm.merge(base, fts, make(s), blocks=BLOCKS)

    got = jax.jit(jax.vmap(f))(jnp.asarray(values, jnp.float32))
    assert len(traces) == 1  # one compilation for the whole grid
    for i, s in enumerate(values):
        want = fm.merge(base, fts, make(s), blocks=BLOCKS)  # host engine, concrete s
        for k in base:
            np.testing.assert_allclose(np.asarray(got[k][i]), np.asarray(want[k]),
                                       rtol=2e-6, atol=2e-7, err_msg=f"{label} {k} s={s}")


@pytest.mark.parametrize("label", ["ta", "ta_sum", "ties_keep", "ties", "tsv", "breadcrumbs",
                                   "magmax", "dare_ta"])
def test_grad_matches_finite_differences(label):
    make = dict((t[1], t[0]) for t in TRACEABLE)[label]
    base, fts = random_case(6, n=4)
    g = jax.grad(lambda s: _loss(fm.merge(base, fts, make(s), blocks=BLOCKS)))(1.3)

    def loss64(s):  # the eager engine's output, the loss in float64
        out = fm.merge(base, fts, make(s), blocks=BLOCKS)
        return sum(np.sum(np.sin(7.0 * np.asarray(v, np.float64))) for v in jax.tree.leaves(out))

    # Outputs are float32 (rounding noise ~1e-5 on the loss), so a wide
    # step: the loss is smooth in s, truncation error O(h^2 |V|^3) ~ 1e-8.
    h = 1e-2
    fd = (loss64(1.3 + h) - loss64(1.3 - h)) / (2 * h)
    np.testing.assert_allclose(float(g), fd, rtol=1e-3, atol=1e-3)


def test_gradient_steps_on_scale_decrease_the_loss():
    base, fts = random_case(7, n=4)
    target = fm.merge(base, fts, M.ties(1.6), blocks=BLOCKS)

    def loss(s):
        out = fm.merge(base, fts, M.ties(s), blocks=BLOCKS)
        return sum(jnp.sum((out[k] - target[k]) ** 2) for k in base)

    step = jax.jit(jax.value_and_grad(loss))
    s, first = 1.0, None
    for _ in range(20):
        v, g = step(s)
        first = v if first is None else first
        s = s - 5.0 * g
    assert float(v) < 0.05 * float(first)
    assert abs(float(s) - 1.6) < 0.05


def test_untraceable_cases_say_why():
    base, fts = random_case(5, n=4)
    with pytest.raises(ValueError, match="keep must be a Python number.*order statistic"):
        jax.jit(lambda k: fm.merge(base, fts, M.ties(1.0, keep=k), blocks=BLOCKS))(0.2)
    with pytest.raises(ValueError, match="pcb cannot be traced"):
        jax.jit(lambda s: fm.merge(base, fts, M.pcb(s), blocks=BLOCKS))(1.0)
    with pytest.raises(ValueError, match="mask method consensus_ta"):
        jax.jit(lambda s: fm.merge(base, fts, M.consensus_ta(s), blocks=BLOCKS))(1.0)
    with pytest.raises(ValueError, match="plan\\(\\) needs concrete"):
        jax.jit(lambda s: fm.plan(base, fts, method=M.task_arithmetic(s)).sizes)(1.0)
