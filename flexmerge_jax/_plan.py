"""``plan`` and ``merge``: the whole accuracy-size axis from one schedule."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import blocks as blocks_lib
from . import methods as methods_lib
from ._flexmodel import FlexModel, summary_text
from ._prepared import Prepared, materialize
from ._traced import any_traced, traced_merge
from ._tune import Tuning, check_tunable, tune_scales
from .progress import counting
from .schedule.greedy import (
    LINKAGE_ALIASES,
    LINKAGES,
    SIMILARITIES,
    BlockSequence,
    interleave,
    linear_sequences,
    linkage_sequences,
    materialized_sequence,
    replay,
)
from .sources._source import Source, reuse_buffers
from .sources.files import as_source, fingerprint_change
from .sources.sharding import ShardedSource, check_method
from .sources.threads import read_ahead
from .stats.gram import block_gram
from .stats.passes import grams
from .tree import Layout, layout_mismatch

PyTree = Any
ORDERS = ("greedy", "left-right", "right-left", "random")


@dataclasses.dataclass(frozen=True)
class Event:
    """One merge of the schedule.

    Attributes:
      step: number of merges done after this event (1-based; the
        reference's ``t + 1``). ``plan.at_step(step)`` is the model right
        after it.
      block: block name.
      members_a: sorted task indices of the group listed first.
      members_b: sorted task indices of the other group.
      similarity: the similarity that selected the pair (NaN: undefined,
        e.g. a zero group vector; ``random`` order has none).
      n_models: deployed size after this event, in models.
    """

    step: int
    block: str
    members_a: tuple[int, ...]
    members_b: tuple[int, ...]
    similarity: float
    n_models: float

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["members_a"], d["members_b"] = list(self.members_a), list(self.members_b)
        d["similarity"] = None if math.isnan(self.similarity) else self.similarity
        return d

    @classmethod
    def from_json(cls, d: dict) -> Event:
        sim = d["similarity"]
        return cls(
            int(d["step"]),
            d["block"],
            tuple(d["members_a"]),
            tuple(d["members_b"]),
            float("nan") if sim is None else float(sim),
            float(d["n_models"]),
        )


def size_change(sa: int, sb: int, has_pre: bool) -> tuple[int, int, int]:
    """The reference's ``get_size_change`` for mask methods (spec §4.6).

    Returns:
      ``(vectors removed, vectors added, masks added)`` in units of the block.
    """
    lo, hi = sorted((sa, sb))
    add = 1 if has_pre else 2
    if hi == 1:
        return 0, 0, 0
    if lo == 1 and hi == 2:
        return 3, add, 3
    if lo == 1:
        return 1, 0, 1
    if lo == 2 and hi == 2:
        return 4, add, 4
    if lo == 2:
        return 2, 0, 2
    return 1, 0, 0


def schedule_sizes(
    blocks_of_events: np.ndarray,
    size_a: np.ndarray,
    size_b: np.ndarray,
    numels: np.ndarray,
    *,
    n: int,
    total: int,
    masks: bool,
) -> np.ndarray:
    """``n_models`` before and after every event (``float64[T + 1]``).

    Mirrors the reference's ``store_params`` arithmetic: every merge in block
    b removes ``numel(b)`` (non-mask methods), or adds
    ``numel(b) * (-removed + added + masks/32)`` (mask methods). All values
    are multiples of 1/32 below 2^53, so the float64 sums are exact.
    """
    store = float(n * total)
    has_pre = np.zeros(len(numels), bool)
    out = [n * store / (n * total)]
    for b, sa, sb in zip(blocks_of_events, size_a, size_b):
        numel = int(numels[b])
        if masks:
            r, a, m = size_change(int(sa), int(sb), bool(has_pre[b]))
            if sa + sb > 2:
                has_pre[b] = True
            store -= numel * r
            store += numel * a
            store += numel * m * 1 / 32
        else:
            store -= numel
        out.append(n * store / (n * total))
    return np.asarray(out)


_WORDS = {2: "two", 3: "three"}


def _check_pairwise(method, n: int) -> None:
    k = method.traits.tasks
    if k is not None and n != k:
        raise ValueError(
            f"{method.name} merges exactly {_WORDS.get(k, k)} models (got {n}): it is not "
            "defined for other group sizes, so FlexMerge cannot grow groups with it; use a "
            "group method (avg, ta, ties, tsv, ...)"
        )


def _canonical_linkage(linkage):
    if linkage is None:
        return None
    key = LINKAGE_ALIASES.get(linkage, linkage)
    if key not in LINKAGES:
        raise ValueError(
            f"linkage must be one of {list(LINKAGES)} (reference names "
            f"{list(LINKAGE_ALIASES)} accepted) or None, got {linkage!r}"
        )
    return key




def _check_size(size, floor: float, n: int) -> None:
    size = float(size)
    if not (floor - 1e-12 <= size <= n + 1e-12) or math.isnan(size):
        raise ValueError(
            f"size {size} outside [{floor:.6g}, {n}] "
            f"(the smallest model this plan reaches is {floor:.6g}x)"
        )


def floor_size(partition: blocks_lib.Partition, n: int, masks: bool) -> float:
    """``n_models`` once every block is merged into one group (the last
    entry of :attr:`Plan.sizes`), without a schedule: the accounting of
    :func:`schedule_sizes` ends there whatever the order of the merges, so
    one task joining a growing group block after block gives it."""
    b = len(partition)
    grown = np.tile(np.arange(1, n), b)
    return float(schedule_sizes(np.repeat(np.arange(b), n - 1), grown, np.ones_like(grown),
                                partition.numels, n=n, total=partition.total, masks=masks)[-1])


def end_groups(num_blocks: int, n: int, merged: bool) -> list[tuple[tuple[int, ...], ...]]:
    """Every block's groups at an end of the axis: all ``n`` tasks in one
    group (``merged``, step ``T``) or each alone (step 0)."""
    groups = (tuple(range(n)),) if merged else tuple((t,) for t in range(n))
    return [groups] * num_blocks


def axis_end(prepared: Prepared, size: float):
    """``(step, groups of every block, n_models)`` of the model at ``size``
    if it is an end of the accuracy-size axis (``size >= n``: every task
    alone, step 0; ``size`` at the floor: every block merged, step
    ``T = (n - 1) B``), else ``None``. Either end is the same for every
    schedule, so it needs none: :meth:`Plan.at_size` would give this model.

    Raises:
      ValueError: ``size`` outside ``[floor, n]``.
    """
    n, part = prepared.n, prepared.partition
    floor = floor_size(part, n, prepared.method.uses_masks)
    _check_size(size, floor, n)
    if float(size) >= n - 1e-12:
        return 0, end_groups(len(part), n, False), float(n)
    if float(size) <= floor + 1e-12:
        return (n - 1) * len(part), end_groups(len(part), n, True), floor
    return None


def cut_summary(partition, method, n: int, groups: dict, n_models: float, step) -> str:
    """:meth:`FlexModel.summary` of a cut from its groups (``{block name:
    groups}``), without materializing it."""

    m = method.min_merged
    blocks = {name: (sum(1 if len(g) >= m else len(g) for g in gs), gs)
              for name, gs in groups.items()}
    return summary_text(n, method, n_models, step, blocks, partition.unmatched)


class Plan:
    """The full FlexMerge schedule: every size from n models down to the floor.

    Attributes:
      events: list of :class:`Event`, one per merge, in order.
      sizes: ``float64[T + 1]`` ``n_models`` after 0..T merges.
      method, partition, task_names, config: what produced it.
    """

    def __init__(
        self,
        *,
        prepared: Prepared | None,
        layout,
        partition: blocks_lib.Partition,
        method: methods_lib.Method,
        task_names: Sequence[str],
        sequences: Sequence[BlockSequence],
        order: tuple[np.ndarray, np.ndarray],
        config: dict,
        source_info: dict | None = None,
        scales: Sequence[float | None] | None = None,
    ):
        self._prepared = prepared
        self._missing = None  # why a loaded plan's recorded inputs were not attached
        self.layout = layout
        self.partition = partition
        self.method = method
        self.task_names = tuple(task_names)
        self.sequences = list(sequences)
        self.order = (np.asarray(order[0], np.int64), np.asarray(order[1], np.int64))
        self.config = dict(config)
        self.scales = None if scales is None else [None if v is None else float(v) for v in scales]
        self.source_info = source_info or (
            prepared.source.describe() if prepared is not None else None
        )
        n = len(self.task_names)
        blk, seq = self.order
        sa = np.array([self.sequences[b].members_a[s].sum() for b, s in zip(blk, seq)], int)
        sb = np.array([self.sequences[b].members_b[s].sum() for b, s in zip(blk, seq)], int)
        self.sizes = schedule_sizes(
            blk, sa, sb, partition.numels, n=n, total=partition.total, masks=method.uses_masks
        )
        names = partition.names
        self.events = [
            Event(
                step=t + 1,
                block=names[b],
                members_a=tuple(np.flatnonzero(self.sequences[b].members_a[s]).tolist()),
                members_b=tuple(np.flatnonzero(self.sequences[b].members_b[s]).tolist()),
                similarity=float(self.sequences[b].sim[s]),
                n_models=float(self.sizes[t + 1]),
            )
            for t, (b, s) in enumerate(zip(blk, seq))
        ]

    @property
    def n(self) -> int:
        return len(self.task_names)

    @property
    def num_steps(self) -> int:
        """T = (n - 1) * B, the number of merges."""
        return len(self.events)

    @property
    def min_size(self) -> float:
        return float(self.sizes[-1])

    def step_for_size(self, size: float) -> int:
        """The first step whose ``n_models <= size``.

        Raises:
          ValueError: if ``size`` is outside ``[min size, n]``.
        """
        _check_size(size, self.min_size, self.n)
        return int(np.argmax(self.sizes <= float(size) + 1e-12))

    def partition_at(self, step: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The groups of every block after ``step`` merges."""
        self._check_step(step)
        n = self.n
        if step in (0, self.num_steps):  # the ends of the axis, whatever the schedule
            return dict(zip(self.partition.names, end_groups(len(self.partition), n, step > 0)))
        done = np.zeros(len(self.sequences), np.int64)
        for b in self.order[0][:step]:
            done[b] += 1
        out = {}
        for b, seq in enumerate(self.sequences):
            root_of = np.arange(n)
            for s in range(done[b]):
                a, bb, r = int(seq.a[s]), int(seq.b[s]), int(seq.root[s])
                loser = bb if r == a else a
                root_of[root_of == loser] = r
            groups = {}
            for t in range(n):
                groups.setdefault(int(root_of[t]), []).append(t)
            out[self.partition.blocks[b].name] = tuple(
                sorted(tuple(g) for g in groups.values())
            )
        return out

    def _check_step(self, step) -> None:
        if isinstance(step, bool) or int(step) != step:
            raise ValueError(f"step must be an integer, got {step!r}")
        if not 0 <= step <= self.num_steps:
            raise ValueError(
                f"step {step} outside [0, {self.num_steps}] "
                f"((n-1)*B = ({self.n}-1)*{len(self.partition)})"
            )

    def at_step(self, step: int) -> FlexModel:
        """The deployable model after ``step`` merges (0 = the n fine-tuned)."""
        self._check_step(step)
        prepared = self._require_inputs()
        parts = self.partition_at(step)
        return materialize(
            prepared,
            [parts[b.name] for b in self.partition.blocks],
            n_models=float(self.sizes[step]),
            step=int(step),
            scales=self._group_scales(step),
        )

    def summary_at(self, step: int) -> str:
        """:meth:`FlexModel.summary` of the model after ``step`` merges,
        without materializing it (or needing the inputs)."""
        return cut_summary(self.partition, self.method, self.n, self.partition_at(step),
                           float(self.sizes[step]), int(step))

    def _require_inputs(self) -> Prepared:
        """The inputs, after checking that their files are still the ones
        this plan read (a cut must not merge edited or replaced files)."""
        if self._prepared is None:
            why = f": {self._missing}" if self._missing else " (loaded without them)"
            raise ValueError(
                f"this plan has no inputs attached{why}; "
                "use flexmerge_jax.load(path, base=..., finetuned=...)"
            )
        changed = self._prepared.source.changed()
        if changed:
            raise ValueError(
                f"the plan's input files changed since they were read: {'; '.join(changed)}; "
                "plan again, or attach them again (plan.attach) to merge their new values "
                "along this schedule"
            )
        return self._prepared

    def _group_scales(self, step: int):
        """Per block, ``{group: tuned lambda}`` of the groups formed by step."""
        if self.scales is None:
            return None
        index = {b: i for i, b in enumerate(self.partition.names)}
        out: list[dict] = [{} for _ in self.partition.blocks]
        for e, lam in zip(self.events[:step], self.scales[:step]):
            if lam is not None:
                out[index[e.block]][tuple(sorted(e.members_a + e.members_b))] = lam
        return out

    def at_size(self, size: float) -> FlexModel:
        """The model at the first step whose ``n_models <= size``."""
        return self.at_step(self.step_for_size(size))

    @property
    def has_inputs(self) -> bool:
        """Whether models can be cut (the inputs are attached)."""
        return self._prepared is not None

    def attach(self, base, finetuned=None) -> None:
        """Attaches the inputs (pytrees or checkpoint paths) to a loaded plan.

        Raises:
          ValueError: if their parameter names, shapes or dtypes differ from
            the plan's.
        """
        source = as_source(base, finetuned, self.task_names, self._verify)
        self._attach(source, _changed_inputs(self.source_info, source))

    def _attach(self, source: Source, changed: list[str]) -> None:
        """:meth:`attach` of a built source; ``changed``: its files whose
        fingerprints differ from the plan's record (warned about)."""
        msg = layout_mismatch(self.layout, source.layout, "the plan")
        if msg:
            raise ValueError(f"the given inputs do not match this plan ({msg})")
        if changed:
            warnings.warn(
                f"the attached inputs are not the ones this plan was computed from "
                f"({'; '.join(changed)}): cuts will merge their values along the "
                f"recorded schedule", stacklevel=3,
            )
        self._prepared = Prepared(source, self.partition, self.method)
        self._missing = None

    def shard(self, mesh, mesh_axis: str = "model") -> None:
        """Reads the attached inputs onto ``mesh`` from now on (as
        :func:`plan` with ``mesh=``): cuts are sharded over ``mesh_axis``.

        Raises:
          ValueError: no inputs are attached, or the method cannot run with
            its parameters sharded on ``mesh``.
        """

        prepared = self._require_inputs()
        check_method(self.method, mesh, mesh_axis)
        source = prepared.source
        if isinstance(source, ShardedSource):
            source = source.inner
        self._prepared = Prepared(ShardedSource(source, mesh, mesh_axis), self.partition,
                                  self.method)

    def _layout_json(self) -> dict:
        return self.layout.to_json()

    @classmethod
    def from_json(cls, meta: dict, *, base=None, finetuned=None, method=None) -> Plan:
        """Rebuilds a plan saved by :func:`flexmerge_jax.save` (``method``:
        see :func:`flexmerge_jax.load`)."""

        n = len(meta["task_names"])
        seqs = []
        for s in meta["sequences"]:
            seq = replay(s["a"], s["b"], s["root"], n)
            sim = np.array([np.nan if v is None else v for v in s["sim"]], np.float64)
            seqs.append(seq._replace(sim=sim))
        plan = cls(
            prepared=None,
            layout=Layout.from_json(meta["layout"]),
            partition=blocks_lib.Partition.from_json(meta["partition"]),
            method=methods_lib.from_json(meta["method"], method),
            task_names=meta["task_names"],
            sequences=seqs,
            order=(np.asarray(meta["order"][0]), np.asarray(meta["order"][1])),
            config=meta["config"],
            source_info=meta.get("source"),
            scales=meta.get("scales"),
        )
        if base is not None or finetuned is not None:
            plan.attach(base, finetuned)
        elif (plan.source_info or {}).get("kind") == "paths":
            plan._reattach()
        return plan

    @property
    def _verify(self) -> str:
        """How the inputs were fingerprinted (``verify=`` of :func:`plan`)."""
        rec = (self.source_info or {}).get("fingerprints") or {}
        return "full" if isinstance(rec.get("base"), dict) and "full" in rec["base"] else "fast"

    def _reattach(self) -> None:
        """Attaches the recorded input files if they are still the ones
        planned from; else warns naming each file and why (kept for the
        error of a later cut)."""
        info = self.source_info
        changed = _changed_inputs(info, None)
        try:
            if changed:
                raise ValueError("; ".join(changed))
            self._attach(as_source(info["base"], info["finetuned"], self.task_names, self._verify),
                         [])
        except ValueError as e:  # the files changed since planning
            self._missing = f"its recorded input files are not the ones planned from ({e})"
            warnings.warn(
                f"loaded the plan without its inputs, which changed since planning: {e}; "
                "pass base=/finetuned= to attach inputs", stacklevel=4,
            )

    def __repr__(self) -> str:
        return (
            f"Plan(n={self.n}, method={self.method.describe()}, blocks={len(self.partition)}, "
            f"steps={self.num_steps}, sizes {self.sizes[0]:.4g}x..{self.min_size:.4g}x, "
            f"config={self.config})"
        )


def _changed_inputs(recorded: dict | None, source: Source | None) -> list[str]:
    """The inputs of ``source`` (``None``: the recorded files themselves)
    that are not the ones a plan's record (``plan.source_info``) describes,
    each as ``"task 'x' PATH (why)"`` (see :func:`~.sources.fingerprint_change`).

    Files are compared with files, in-memory models with in-memory models
    (:func:`~.sources._source.tree_fingerprint`, as recorded); other pairs (files
    planned, arrays attached), and records without fingerprints, cannot be
    compared and give none.
    """

    rec = (recorded or {}).get("fingerprints")
    if not rec:
        return []
    current = recorded if source is None else source.describe()
    names = current.get("task_names") or (source.task_names if source is not None else [])
    who = ["the base"] + [f"task {t!r}" for t in names]
    recs = [rec["base"], *rec["finetuned"]]
    if recorded.get("kind") in ("paths", "hf") and "finetuned" in current:
        paths = [current["base"], *current["finetuned"]]
        return [f"{w} {p} ({why})" for w, p, r in zip(who, paths, recs)
                if (why := fingerprint_change(r, p))]
    now = current.get("fingerprints")
    if recorded.get("kind") != "MemorySource" or current.get("kind") != "MemorySource" or not now:
        return []
    nows = [now["base"], *now["finetuned"]]
    if len(nows) != len(recs):
        return []
    return [f"{w} (its values differ from the planned ones)" for w, r, c in zip(who, recs, nows)
            if r != c]


def _random_order(partition, n: int, seed: int):
    """The reference's ``random_block_merge`` order, replayed exactly.

    Uses ``np.random.default_rng(seed)`` with the reference's calls and a real
    Python set for the group order, so a given seed reproduces its schedule.
    """
    rng = np.random.default_rng(seed)
    names = list(partition.names)
    remaining = list(names)
    parent = {b: list(range(n)) for b in names}
    rank = {b: [1] * n for b in names}
    recs: dict[str, list] = {b: [] for b in names}
    blk, seq = [], []

    def find(p, x):
        while p[x] != x:
            x = p[x]
        return x

    for _ in range((n - 1) * len(names)):
        block = str(rng.choice(remaining))
        p, r = parent[block], rank[block]
        unique = list(set(find(p, x) for x in range(n)))
        i, j = (int(v) for v in rng.choice(unique, size=2, replace=False))
        ma = np.array([find(p, x) == i for x in range(n)])
        mb = np.array([find(p, x) == j for x in range(n)])
        if r[i] > r[j]:
            p[j], root = i, i
        elif r[i] < r[j]:
            p[i], root = j, j
        else:
            p[j], root = i, i
            r[i] += 1
        b = names.index(block)
        blk.append(b)
        seq.append(len(recs[block]))
        recs[block].append((i, j, root, ma, mb))
        if len(set(find(p, x) for x in range(n))) == 1:
            remaining.remove(block)
    seqs = []
    for b in names:
        rows = recs[b]
        seqs.append(
            BlockSequence(
                np.array([x[0] for x in rows], np.int32),
                np.array([x[1] for x in rows], np.int32),
                np.array([x[2] for x in rows], np.int32),
                np.full(len(rows), np.nan),
                np.stack([x[3] for x in rows]),
                np.stack([x[4] for x in rows]),
            )
        )
    return seqs, (np.array(blk), np.array(seq))


def _sequences(prepared: Prepared, linkage, similarity: str, structured: bool,
               precision: str = "float64"):
    method, partition = prepared.method, prepared.partition
    if linkage is not None:
        return linkage_sequences(grams(prepared, precision=precision), linkage)
    # Structured runs compare singletons on their raw task vectors (spec §7).
    raw_singles = structured and (method.trims or method.sparsify is not None)
    if method.linear and similarity != "sign" and not raw_singles:
        return linear_sequences(
            grams(prepared, precision=precision), partition.numels, similarity, method.group_scale,
            method.min_merged, method.sums,
        )
    # TIES: one pass over every parameter finds the trim thresholds first.
    # Each block's inputs (task vectors, trimmed as they are computed; their
    # Gram; the method's block state) are then computed in host threads
    # ahead of the sequences (read_ahead: up to one largest block ahead, so
    # that a run of small blocks does not leave the next large one waiting),
    # while XLA reduces the comparisons on one core: the Gram of a block read
    # anyway costs no read, and on the second core little time.
    def inputs(b):
        if structured:  # singletons compare raw vectors
            singles = prepared.tau(b)
            x = prepared.x(b, singles)
        else:
            x = singles = prepared.x(b)
        gram = None if similarity == "sign" else block_gram(singles, precision)
        return x, singles, prepared.extra(b, x), gram

    # One block at a time: two blocks at once in worker threads would hold
    # twice the group vectors, past the streaming memory bound, for a small
    # gain on few cores.
    # Every block's task vectors (and, from files, its reads) are new arrays
    # of the shapes of a block two back, and its group-vector slots those of
    # the last block of its shapes: reuse_buffers recycles both instead of
    # page-faulting fresh memory at every block.
    with reuse_buffers():
        if method.trims:
            prepared.trim_threshold  # noqa: B018 (computes the thresholds)
        return [
            materialized_sequence(x, singles, extra, similarity, method,
                                  partition.blocks[b].numel, gram=gram, precision=precision)
            for b, (x, singles, extra, gram) in enumerate(read_ahead(
                inputs, partition.numels, threads=not prepared.source.main_thread_only))
        ]


def check_options(method, linkage, similarity: str, order: str, gram_precision: str,
                  tune=None):
    """Checks :func:`plan`'s options; returns the method and the canonical
    linkage."""
    method = methods_lib.get(method)
    if method.traced:
        raise ValueError(f"plan() needs concrete hyperparameters ({method.describe()} has traced "
                         "ones); merge() is the traceable entry point")
    linkage = _canonical_linkage(linkage)
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
    if tune is not None:
        check_tunable(method, linkage if order != "random" else "random", similarity)
    if gram_precision not in ("float64", "float32"):
        raise ValueError(f"gram_precision must be 'float64' or 'float32', got {gram_precision!r}")
    return method, linkage


def prepare(base, finetuned, *, blocks, method: methods_lib.Method, task_names=None, mesh=None,
            mesh_axis: str = "model", verify: str = "fast") -> Prepared:
    """The inputs of :func:`plan` (same arguments) as a :class:`Prepared`."""
    source = as_source(base, finetuned, task_names, verify)
    _check_pairwise(method, source.n)
    if mesh is not None:

        check_method(method, mesh, mesh_axis)
        source = ShardedSource(source, mesh, mesh_axis)
    partition = blocks_lib.resolve(blocks, source.layout.names, source.layout.sizes)
    return Prepared(source, partition, method)


def plan(
    base: PyTree | Source,
    finetuned: Sequence[PyTree] | None = None,
    *,
    blocks=None,
    method: methods_lib.Method | str = "ta",
    linkage: str | None = "min",
    similarity: str = "cosine",
    order: str = "greedy",
    seed: int = 0,
    task_names: Sequence[str] | None = None,
    tune: Tuning | None = None,
    progress: bool | None = None,
    mesh=None,
    mesh_axis: str = "model",
    gram_precision: str = "float64",
    verify: str = "fast",
) -> Plan:
    """Computes the FlexMerge schedule (every size from n down to the floor).

    Args:
      base: base params pytree :math:`\\theta_0` (or a checkpoint path, or a
        :class:`Source`).
      finetuned: n params pytrees (or checkpoint paths) of the same layout.
      blocks: block specification: a :mod:`flexmerge_jax.blocks` spec, a
        preset name (``"vit"``, ``"clip-vit-b32"``, ...), an ordered list of
        substrings or the path of a JSON file holding one; default one block
        per parameter.
      method: a :mod:`flexmerge_jax.methods` method or its name.
      linkage: constituent similarity (cosine of member task vectors):
        ``"min"``, ``"mean"`` or ``"max"`` over member pairs. The reference's
        names are accepted as aliases with *its* semantics: ``"single"`` is
        the MIN pairwise cosine, ``"average"`` the mean, ``"complete"`` the
        MAX. The schedule then depends only on the Gram matrices (method
        agnostic). ``None``: compare merged group vectors with ``similarity``.
      similarity: ``"cosine"``, ``"euclidean"`` (minus RMS distance) or
        ``"sign"`` (fraction of equal signs); used when ``linkage is None``.
      order: ``"greedy"`` (FlexMerge), ``"right-left"`` (block list order, one
        block at a time), ``"left-right"`` (reversed) or ``"random"``.
      seed: seed of the ``random`` order (``np.random.default_rng``, the
        reference's calls: the same seed reproduces its order).
      task_names: names of the n tasks (default ``task0``...).
      tune: a :class:`~flexmerge_jax.Tuning` to choose :math:`\\lambda` per
        merge on validation data, as the reference's ``--USE_VAL`` (the
        chosen values are in ``plan.scales`` and used by every cut).
      progress: report the parameters read and the tuning on stderr
        (``None``: :data:`flexmerge_jax.progress.DEFAULT`, a bar when stderr
        is a terminal).
      mesh: a ``jax.sharding.Mesh``: task vectors, statistics, merges and the
        cut models are sharded over its ``mesh_axis`` on parameter dims
        (see :mod:`flexmerge_jax.sources.sharding`).
      mesh_axis: the mesh axis to shard parameters over.
      gram_precision: ``"float64"`` (default: every similarity the schedule
        compares is a float64 sum: Gram matrices of exact products, and
        comparisons of materialized group vectors of float32 products, each
        rounded once, so cosines within ~1.2e-7 of the exact values and
        independent of the order of summation) or ``"float32"``
        (HIGHEST-precision float32 like the reference; faster, no emulated
        float64 on TPU, and ties closer than ~1e-7 may then be decided
        differently).
      verify: how the plan records its inputs, to notice later that they
        changed (files edited or replaced before a cut, other models passed
        to :func:`~flexmerge_jax.load`): ``"fast"`` (default: size,
        modification time and sampled content of files; sampled entries of
        in-memory models) or ``"full"`` (a hash of every byte: reads the
        inputs once more, and files again before each cut; a copy with a
        new modification time is then the same input). See
        :func:`~flexmerge_jax.sources.fingerprint`.

    Returns:
      A :class:`Plan`: ``plan.events``, ``plan.sizes``, ``plan.at_step(k)``,
      ``plan.at_size(s)``.

    Raises:
      ValueError: bad arguments, mismatched trees, NaN/Inf task vectors, a
        block specification that matches nothing.
    """
    method, linkage = check_options(method, linkage, similarity, order, gram_precision, tune)
    prepared = prepare(base, finetuned, blocks=blocks, method=method, task_names=task_names,
                       mesh=mesh, mesh_axis=mesh_axis, verify=verify)
    return plan_prepared(prepared, linkage=linkage, similarity=similarity, order=order,
                         seed=seed, tune=tune, progress=progress, gram_precision=gram_precision)


def plan_prepared(prepared: Prepared, *, linkage, similarity: str, order: str, seed: int,
                  gram_precision: str, tune=None, progress=None) -> Plan:
    """:func:`plan` of inputs :func:`prepare` made (options checked by
    :func:`check_options`)."""
    method, source, partition = prepared.method, prepared.source, prepared.partition
    counted, bar = counting(source, "plan", progress)
    prepared.source = counted
    n = source.n
    with bar:
        if order == "random":
            seqs, ordr = _random_order(partition, n, int(seed))
        else:
            structured = order != "greedy"
            seqs = _sequences(prepared, linkage, similarity, structured, gram_precision)
            if structured:
                idx = list(range(len(partition)))
                if order == "left-right":
                    idx = idx[::-1]
                ordr = (np.repeat(idx, n - 1), np.tile(np.arange(n - 1), len(idx)))
            else:
                ordr = interleave(seqs)
    prepared.source = source  # cuts report their own progress
    config = {
        "gram_precision": gram_precision,
        "linkage": linkage,
        "similarity": similarity if linkage is None else None,
        "order": order,
        "seed": int(seed) if order == "random" else None,
    }
    result = Plan(
        prepared=prepared,
        layout=source.layout,
        partition=partition,
        method=method,
        task_names=source.task_names,
        sequences=seqs,
        order=ordr,
        config=config,
    )
    if tune is not None:
        result.scales = tune_scales(result, prepared, tune, progress)
        result.config["tuned"] = {"lambdas": [float(v) for v in tune.lambdas], "start": tune.start}
    return result


def merge(
    base: PyTree,
    finetuned: Sequence[PyTree],
    method: methods_lib.Method | str,
    *,
    blocks=None,
    task_names: Sequence[str] | None = None,
    progress: bool | None = None,
    mesh=None,
    mesh_axis: str = "model",
):
    """One-shot merge of all n tasks (the 1x end of the size axis).

    Args:
      base: base params pytree.
      finetuned: n params pytrees of the same structure, shapes and dtypes.
      method: a :mod:`flexmerge_jax.methods` method (or name).
      blocks: block specification; it matters for per-block statistics (EMR
        rescalers, PCB normalisation, TIES zero-sign fallback). Default: every
        parameter its own block.
      task_names: optional task names.
      progress: report the parameters read on stderr (see :func:`plan`).
      mesh, mesh_axis: shard the inputs and the merged parameters over a
        device mesh, as :func:`plan` does.

    Returns:
      For methods without masks, the merged params pytree. For mask methods,
      a :class:`FlexModel` (use ``model.params_for_task(i)``); with n = 2 a
      mask method keeps both models, as the reference does.

    Traceable: when the method's numeric hyperparameters (``scale``, ...)
    or the params are tracers, the merge is one ``jax.numpy`` function of
    the in-memory pytrees (``jax.jit``, ``jax.vmap``, ``jax.grad``; no
    NaN/Inf checks), e.g. a lambda grid in one compiled call::

        f = lambda s, b, f: fm.merge(b, f, fm.methods.ties(scale=s, keep=0.2), blocks="vit")
        merged = jax.jit(jax.vmap(f, (0, None, None)))(jnp.linspace(0.5, 1.5, 8), base, fts)

    (Passing the params as arguments, not closing over them, keeps XLA
    from constant-folding the whole merge at compile time.)

    Mask methods and methods with host statistics (``pcb``) are not
    traceable (ValueError); static hyperparameters (``keep``, ...) must be
    Python numbers (each factory says why).

    Raises:
      ValueError: bad inputs, or parameters outside every block (they could
        not be merged: use :func:`plan` to keep them per task).
    """
    method = methods_lib.get(method)

    if any_traced(method, base, finetuned):
        _check_pairwise(method, len(finetuned))
        return traced_merge(base, finetuned, method, blocks)
    source = as_source(base, finetuned, task_names)
    partition = blocks_lib.resolve(blocks, source.layout.names, source.layout.sizes, warn=False)
    if partition.unmatched:
        raise ValueError(
            f"merge(): {len(partition.unmatched)} parameter(s) match no block "
            f"(e.g. {partition.unmatched[0]!r}); a one-shot merge must merge every "
            "parameter — extend the block specification, or use plan() to keep "
            "them per task"
        )
    _check_pairwise(method, source.n)
    if mesh is not None:

        check_method(method, mesh, mesh_axis)
        source = ShardedSource(source, mesh, mesh_axis)
    counted, bar = counting(source, "merge", progress)
    prepared = Prepared(counted, partition, method)
    n = source.n
    everyone = tuple(range(n))
    groups = [[everyone] for _ in partition.blocks]
    with bar:
        if method.uses_masks:
            # One masked group per block: base + merged vector + n 1-bit masks.
            size = 2 + n / 32 if n > 2 else float(n)
            return materialize(prepared, groups, n_models=size, step=None)
        model = materialize(prepared, groups, n_models=1.0, step=None)
    return model.params_for_task(0)
