"""The paper's ">1x" baselines on the same size axis as FlexMerge (spec §7).

* :func:`cluster_merge` — whole-model agglomerative clustering of the tasks
  (cosine distance between full task vectors, or the mean per-tensor cosine
  with ``layerwise=True``) into k = n..1 clusters; each cluster is merged
  over the whole model; size = k models.
* :func:`channel_merge` — Channel Merging: for every parameter tensor
  separately, cosine k-means of the n task vectors into k clusters
  (k-means++ init, at most 100 iterations, tolerance 1e-4, centers = the
  normalised means); each cluster merged; size counted as k models, as the
  reference does (even when a tensor leaves a cluster empty).

Both return a :class:`BaselinePlan`: ``at_size(s)`` / ``at_step(k)`` give
:class:`~flexmerge_jax.FlexModel` objects, and :func:`flexmerge_jax.sweep`
accepts them next to FlexMerge plans. Singletons keep their own fine-tuned
parameters; TIES trims each task over the whole model (as the reference,
whose per-cluster trim is per task over the whole model too). Everything is
computed from Gram matrices of the raw task vectors (one pass).

Differences from the reference: the agglomerative clustering is ours (the
reference calls scikit-learn; the partitions agree, checked in the tests
when scikit-learn is installed), and channel-merge's k-means uses a NumPy
generator where the reference uses torch's, so its clusters match in
distribution only. DARE is refused (the reference ignores it here) and mask
methods are not supported (the reference supports avg, ta, ties).

References:
  Dhasade et al., FlexMerge, 2025 (arXiv:2505.23209), baselines.
  Zhang et al., Channel Merging: Preserving Specialization for Merged
  Experts, AAAI 2025 (arXiv:2412.15283).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from . import blocks as blocks_lib
from . import methods as methods_lib
from ._flexmodel import FlexModel
from ._prepared import Prepared, materialize
from .schedule.greedy import cosine_from_gram
from .sources.files import as_source
from .stats.gram import block_gram
from .stats.passes import grams as engine_grams

__all__ = ["cluster_merge", "channel_merge", "BaselinePlan", "agglomerative"]


class BaselinePlan:
    """k = n, n-1, ..., 1 models: step s has ``n - s`` clusters.

    Attributes mirror :class:`~flexmerge_jax.Plan` where meaningful
    (``n``, ``task_names``, ``method``, ``config``, ``sizes``,
    ``num_steps``, ``min_size``, ``step_for_size``, ``at_step``, ``at_size``,
    ``partition_at``).
    """

    def __init__(self, prepared: Prepared, groups_at, config: dict):
        self._prepared = prepared
        self._groups_at = groups_at  # k -> list (per block) of groups
        self.method = prepared.method
        self.task_names = prepared.source.task_names
        self.partition = prepared.partition
        self.config = dict(config)
        n = prepared.n
        self.sizes = np.arange(n, 0, -1, dtype=np.float64)

    @property
    def n(self) -> int:
        return len(self.task_names)

    @property
    def num_steps(self) -> int:
        return self.n - 1

    @property
    def min_size(self) -> float:
        return 1.0

    def step_for_size(self, size: float) -> int:
        if not 1.0 - 1e-12 <= size <= self.n + 1e-12:
            raise ValueError(f"size {size} outside [1, {self.n}]")
        return int(np.argmax(self.sizes <= size + 1e-12))

    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or int(step) != step or not 0 <= step <= self.num_steps:
            raise ValueError(f"step {step} outside [0, {self.num_steps}]")

    def partition_at(self, step: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The groups of every block with ``n - step`` clusters."""
        self._check_step(step)
        per_block = self._groups_at(self.n - int(step))
        return {
            b.name: tuple(sorted(tuple(sorted(g)) for g in gs))
            for b, gs in zip(self.partition.blocks, per_block)
        }

    def at_step(self, step: int) -> FlexModel:
        """The model with ``n - step`` clusters (size ``n - step`` models)."""
        parts = self.partition_at(step)
        return materialize(
            self._prepared, [parts[b.name] for b in self.partition.blocks],
            n_models=float(self.sizes[step]), step=int(step),
        )

    def at_size(self, size: float) -> FlexModel:
        """The model with ``floor(size)`` clusters."""
        return self.at_step(self.step_for_size(size))

    def __repr__(self) -> str:
        return f"BaselinePlan(n={self.n}, method={self.method.describe()}, config={self.config})"


def _check_method(method) -> methods_lib.Method:
    method = methods_lib.get(method)
    if method.sparsify is not None:
        raise ValueError("DARE has no effect in the reference's cluster/channel merge; "
                         "pass the method without dare()")
    if method.uses_masks:
        raise ValueError(f"{method.name}: mask methods are not supported by the baselines "
                         "(the reference supports avg, ta and ties)")
    if method.traits.tasks is not None:
        raise ValueError(f"{method.name} merges {method.traits.tasks} models only")
    return method


def agglomerative(dist: np.ndarray, linkage: str) -> list[tuple[int, int]]:
    """Standard agglomerative clustering on a distance matrix.

    Args:
      dist: ``f64[n, n]`` symmetric distances.
      linkage: ``"single"`` (min), ``"complete"`` (max) or ``"average"``
        (UPGMA) — the usual (scikit-learn) semantics on distances.

    Returns:
      The n-1 merges ``(a, b)`` in order, as indices of the surviving
      clusters (the merged cluster keeps index ``min(a, b)``).
    """
    if linkage not in ("single", "complete", "average"):
        raise ValueError(f"linkage must be single, complete or average, got {linkage!r}")
    n = dist.shape[0]
    d = np.array(dist, np.float64)
    np.fill_diagonal(d, np.inf)
    size = np.ones(n)
    alive = np.ones(n, bool)
    merges = []
    for _ in range(n - 1):
        masked = np.where(alive[:, None] & alive[None, :], d, np.inf)
        a, b = divmod(int(np.argmin(masked)), n)
        a, b = min(a, b), max(a, b)
        if linkage == "single":
            row = np.minimum(d[a], d[b])
        elif linkage == "complete":
            row = np.maximum(d[a], d[b])
        else:
            row = (size[a] * d[a] + size[b] * d[b]) / (size[a] + size[b])
        d[a, :], d[:, a] = row, row
        d[a, a] = np.inf
        alive[b] = False
        size[a] += size[b]
        merges.append((a, b))
    return merges


def _clusters(merges, n: int, k: int) -> list[list[int]]:
    label = list(range(n))
    for a, b in merges[: n - k]:
        label = [a if x == b else x for x in label]
    out: dict[int, list[int]] = {}
    for t, c in enumerate(label):
        out.setdefault(c, []).append(t)
    return list(out.values())


def _whole_model_partition(layout) -> blocks_lib.Partition:
    return blocks_lib.Partition(
        (blocks_lib.Block("model", layout.names, layout.total),), (), 0, layout.total
    )


def cluster_merge(
    base,
    finetuned=None,
    method="ta",
    *,
    linkage: str = "average",
    layerwise: bool = False,
    task_names: Sequence[str] | None = None,
) -> BaselinePlan:
    """Whole-model clustering baseline (the reference's ``--ALG cluster-merge``).

    Args:
      base, finetuned: params pytrees or checkpoint paths (as :func:`plan`).
      method: a non-mask method (avg, ta, ties, pcb, or the extra ones).
      linkage: ``single`` / ``complete`` / ``average`` in their *standard*
        meaning on distances (scikit-learn's), as the reference uses them here.
      layerwise: distance ``1 - mean over tensors of the per-tensor cosine``
        instead of the cosine of the full task vectors.
      task_names: optional names.

    Returns:
      A :class:`BaselinePlan` (k clusters = k models).
    """
    method = _check_method(method)
    source = as_source(base, finetuned, task_names)
    partition = _whole_model_partition(source.layout)
    prepared = Prepared(source, partition, method)
    n = source.n
    # One streaming pass: per-tensor Grams of the raw task vectors; the
    # whole-model Gram is their sum (spec §10.4), never all tensors at once.
    per_leaf = [block_gram(source.task_vectors([name])) for name in source.layout.names]
    if layerwise:  # per-tensor cosine with the reference's eps: a frozen tensor counts 0
        with jax.enable_x64(True):
            cos = np.asarray(cosine_from_gram(np.stack(per_leaf))).sum(axis=0)
        dist = 1.0 - cos / len(per_leaf)
    else:
        g = np.sum(per_leaf, axis=0)
        nrm = np.sqrt(np.diag(g))
        with np.errstate(invalid="ignore", divide="ignore"):
            dist = np.clip(1.0 - g / (nrm[:, None] * nrm[None, :]), 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    if np.isnan(dist).any():
        raise ValueError("a task vector is zero: its cosine distance is undefined")
    merges = agglomerative(dist, linkage)
    return BaselinePlan(
        prepared, lambda k: [_clusters(merges, n, k)],
        {"baseline": "cluster-merge", "linkage": linkage, "layerwise": layerwise},
    )


def _kmeans_cosine(g: np.ndarray, k: int, rng: np.random.Generator,
                   max_iters: int = 100, tol: float = 1e-4) -> np.ndarray:
    """Cosine k-means of n vectors known by their Gram matrix ``g``.

    Centers are kept as weight rows ``W [k, n]`` over the tasks (center =
    ``W @ X``), so everything is computed from ``g``: k-means++ initial
    centers are data points, each iteration assigns by cosine distance and
    sets each center to the normalised mean of its points (an empty cluster
    takes a random point), until the centers move less than ``tol``.

    Returns:
      ``int[n]`` cluster labels.
    """
    n = g.shape[0]
    if k >= n:
        return np.arange(n)
    nx = np.sqrt(np.maximum(np.diag(g), 0.0))

    def cos(w):
        num = g @ w.T  # [n, k]: <x_i, c_a>
        nc = np.sqrt(np.maximum(np.einsum("an,nm,am->a", w, g, w), 0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            c = num / (nx[:, None] * nc[None, :])
        return np.nan_to_num(c, nan=0.0)  # zero vectors: cosine 0

    first = int(rng.integers(n))
    w = np.zeros((1, n))
    w[0, first] = 1.0
    for _ in range(1, k):
        dmin = np.min(1.0 - cos(w), axis=1)
        p = np.maximum(dmin, 0.0) ** 2
        if p.sum() <= 0:
            p = np.ones(n)
        nxt = int(rng.choice(n, p=p / p.sum()))
        e = np.zeros((1, n))
        e[0, nxt] = 1.0
        w = np.concatenate([w, e])
    labels = np.zeros(n, int)
    for _ in range(max_iters):
        labels = np.argmin(1.0 - cos(w), axis=1)
        new = np.zeros_like(w)
        for a in range(k):
            pts = labels == a
            if not pts.any():
                new[a, int(rng.integers(n))] = 1.0
                continue
            m = pts / pts.sum()
            norm = np.sqrt(max(m @ g @ m, 0.0))
            new[a] = m / (norm + 1e-8)
        diff = w - new
        shift = np.sqrt(max(float(np.einsum("an,nm,am->", diff, g, diff)), 0.0))
        if shift < tol:
            break
        w = new
    return labels


def channel_merge(
    base,
    finetuned=None,
    method="ta",
    *,
    seed: int = 90,
    max_iters: int = 100,
    tol: float = 1e-4,
    task_names: Sequence[str] | None = None,
) -> BaselinePlan:
    """Per-tensor cosine k-means baseline (the reference's ``--ALG channel-merge``).

    Args:
      base, finetuned: params pytrees or checkpoint paths.
      method: a non-mask method; TIES merges globally trimmed vectors while
        clustering uses the untrimmed ones, as the reference.
      seed: k-means++ seed (a fresh ``np.random.default_rng(seed)`` per
        tensor and k, as the reference reseeds per call).
      max_iters, tol: k-means stopping rule.
      task_names: optional names.

    Returns:
      A :class:`BaselinePlan`; size = k models (the reference's count).
    """
    method = _check_method(method)
    source = as_source(base, finetuned, task_names)
    partition = blocks_lib.resolve(None, source.layout.names, source.layout.sizes)
    prepared = Prepared(source, partition, method)
    grams = engine_grams(prepared, raw=True)
    cache: dict[int, list] = {}

    def groups_at(k: int):
        if k not in cache:
            per_block = []
            for g in grams:
                labels = _kmeans_cosine(g, k, np.random.default_rng(seed), max_iters, tol)
                out: dict[int, list[int]] = {}
                for t, c in enumerate(labels):
                    out.setdefault(int(c), []).append(t)
                per_block.append(list(out.values()))
            cache[k] = per_block
        return cache[k]

    return BaselinePlan(prepared, groups_at, {"baseline": "channel-merge", "seed": seed})
