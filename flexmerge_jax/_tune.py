"""Validation-tuned lambda per merge (the reference's ``--USE_VAL``, spec §6).

For every merge of a tunable method (``ta``, ``ties``, ``pcb``,
``consensus_ta``, ``consensus_ties``) at or after ``start * T``: compute the
group's unscaled merged vector :math:`u`; for each :math:`\\lambda` of the
grid, give every member the block :math:`\\theta_0+\\lambda u` (other
blocks as currently deployed, the member's current — possibly stale — mask
applied) and average the members' validation scores; keep the best
:math:`\\lambda` (first best wins); deploy :math:`\\lambda^* u` (masks
computed from it). The schedule does not depend on :math:`\\lambda` for
constituent linkage and for merged-vector cosine/sign similarity, so it is
computed first and the tuning replays it; merged-vector euclidean
similarity depends on the tuned magnitudes and is refused.

Deviation: the reference starts from a best accuracy of 0 and asserts when
every candidate scores 0; here the first candidate then wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._flexmodel import deploy_masked
from ._prepared import add_base, merge_groups
from .progress import Progress


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Validation-based choice of :math:`\\lambda` for every merge.

    Attributes:
      eval_fn: ``eval_fn(params, task_index) -> score`` on *validation*
        data (higher is better), for one task's full params pytree.
      lambdas: the grid (the reference's default ``0.8, 1.0, 1.5, 2.0``).
      start: tune merges from step ``int(start * T)`` on (``--TUNE_START``);
        earlier merges use the method's ``scale``.
    """

    eval_fn: Callable[[Any, int], float]
    lambdas: Sequence[float] = (0.8, 1.0, 1.5, 2.0)
    start: float = 0.0

    def __post_init__(self):
        if not callable(self.eval_fn):
            raise ValueError("Tuning.eval_fn must be callable")
        if not self.lambdas:
            raise ValueError("Tuning.lambdas is empty")
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"Tuning.start must be in [0, 1], got {self.start}")


def check_tunable(method, linkage, similarity) -> None:
    if not method.traits.tunable:
        raise ValueError(
            f"validation tuning applies to methods whose traits declare a tunable scale "
            f"(the reference's ta, ties, pcb, consensus_ta, consensus_ties); not {method.name}"
        )
    if linkage is None and similarity == "euclidean":
        raise ValueError(
            "validation tuning with merged-vector euclidean similarity is not supported: "
            "that schedule depends on the tuned lambdas (use a linkage, cosine or sign)"
        )


def tune_scales(plan, prepared, tuning: Tuning, progress=None) -> list[float | None]:
    """Replays ``plan``'s events and returns the chosen lambda per event.

    ``None`` for events that merge nothing (two singletons of a mask method).
    """

    method, part, layout = prepared.method, prepared.partition, prepared.layout
    src, n = prepared.source, prepared.n
    names = list(layout.names)
    fts = src.finetuned(names)
    w = [dict(f) for f in fts]  # deployed (unmasked) params per task
    masks: list[dict[int, tuple]] = [{} for _ in range(n)]  # task -> block -> (masks, gamma)
    base_b: dict[int, dict] = {}
    x_b: dict[int, dict] = {}
    extra_b: dict[int, dict | None] = {}
    index = {b: i for i, b in enumerate(part.names)}
    first = int(tuning.start * plan.num_steps)
    todo = sum(
        1 for t, e in enumerate(plan.events)
        if t >= first and not (method.uses_masks and len(e.members_a) + len(e.members_b) <= 2)
    )
    bar = Progress(todo * len(tuning.lambdas), "tune", progress)

    def params_for(i, b, cand):
        flat = dict(w[i])
        leaves = part.blocks[b].leaves
        if b in masks[i]:
            mk, g = masks[i][b]
            for k in leaves:
                flat[k] = deploy_masked(base_b[b][k], cand[k], mk[k], jnp.float32(g))
        else:
            flat.update(cand)
        return layout.unflatten([flat[k] for k in names])

    scales: list[float | None] = []
    for t, e in enumerate(plan.events):
        group = tuple(sorted(e.members_a + e.members_b))
        if method.uses_masks and len(group) <= 2:
            scales.append(None)
            continue
        b = index[e.block]
        if b not in x_b:
            x_b[b] = prepared.x(b)
            extra_b[b] = prepared.extra(b, x_b[b])
            base_b[b] = {k: jnp.asarray(v) for k, v in src.base(part.blocks[b].leaves).items()}
        members = np.zeros((1, n), bool)
        members[0, list(group)] = True
        extra = extra_b[b]
        best = method.scale
        if t >= first:
            u = merge_groups(x_b[b], members, extra, method, np.ones(1, np.float32)).vector
            best_score = -np.inf
            for lam in tuning.lambdas:
                cand = add_base(base_b[b], {k: jnp.float32(lam) * v for k, v in u.items()},
                                 np.int32(0))
                score = float(np.mean([tuning.eval_fn(params_for(i, b, cand), i) for i in group]))
                bar.update(1, f"step {t + 1} lambda {lam}")
                if score > best_score:
                    best, best_score = float(lam), score
        gm = merge_groups(x_b[b], members, extra, method, np.array([best], np.float32))
        deployed = add_base(base_b[b], gm.vector, np.int32(0))
        for i in group:
            w[i].update(deployed)
            if method.uses_masks:
                masks[i][b] = ({k: m[0, i] for k, m in gm.masks.items()}, float(gm.rescalers[0, i]))
        scales.append(best)
    bar.close()
    return scales
