"""Independent slow reference of FlexMerge (test ground truth; NOT part of the package).

A float64, loop-based NumPy transcription of the authors' reference implementation
(github sacs-epfl/flexmerge, commit cbf987a: ``main_merge.py``, ``Utils/merging_datastructure.py``,
``Utils/merging_utils.py``, ``Server/base_server.py``), written from the project specification
``shared/spec/FLEXMERGE.md`` (cited below as "spec §x").  It is a *specification in code*: it is
deliberately slow and literal (pairwise loops, a union-find per block, a real Python ``set`` of root
ids for the group order) so that the fast library can be checked against it.  It imports only
NumPy and the standard library and is never imported by ``flexmerge_jax``.

Conventions
-----------
* A model is a one-level ``dict[str, np.ndarray]`` keyed by parameter name; dict insertion order is
  the "state-dict order".  Whenever the reference flattens a dict (``state_dict_to_vector``) it
  sorts the keys; :func:`flatten` / :func:`unflatten` do the same.
* ``blocks`` is the ordered list of block names.  A parameter belongs to the FIRST name that is a
  substring of it (spec §2.1); unmatched parameters are never merged but count in the size
  (spec §1).  Empty blocks are dropped (spec §2.1).
* Task vectors are formed in float32 (as torch does on fp32 checkpoints) and upcast to float64;
  everything after that is float64 (the oracle, computed in float32, agrees to ~1e-6).
* NaN policy (the reference has no guard and crashes, spec §4.2): a NaN similarity ranks below
  every real one.  Inside a block, if no pair beats the reference's initial value, the best *real*
  pair is taken (strict ``>`` from -inf, first wins) and, if every pair is NaN, the first pair in
  enumeration order.  Across blocks, a real best beats a NaN best; ties go to the first block in
  list order.
  The reported similarity is then NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "MASK_METHODS",
    "METHODS",
    "ReferenceRun",
    "assign_blocks",
    "avg_ref",
    "consensus_masks_ref",
    "constituent_similarity",
    "dare",
    "emr_ref",
    "flatten",
    "greedy_reference",
    "group_similarity",
    "init_similarity",
    "pcb_ref",
    "pcb_thresholds",
    "random_reference",
    "size_change",
    "structured_reference",
    "ta_ref",
    "task_vectors",
    "ties_ref",
    "ties_trim",
    "unflatten",
]

Params = dict[str, np.ndarray]

METHODS = ("avg", "ta", "ties", "pcb", "consensus_ta", "consensus_ties", "emr")
MASK_METHODS = ("consensus_ta", "consensus_ties", "emr")
LINKAGES = ("single", "average", "complete")
DISTANCES = ("cosine", "euclidean", "sign")


# ---------------------------------------------------------------------------------------------
# Flattening helpers (ref: state_dict_to_vector / vector_to_state_dict: sorted keys)
# ---------------------------------------------------------------------------------------------


def flatten(params: Params) -> np.ndarray:
    """Concatenate the tensors of ``params`` in SORTED key order into one float64 vector."""
    keys = sorted(params)
    if not keys:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(params[k], dtype=np.float64).reshape(-1) for k in keys])


def unflatten(vec: np.ndarray, like: Params) -> Params:
    """Inverse of :func:`flatten`: split ``vec`` into tensors shaped like ``like`` (sorted keys)."""
    out: Params = {}
    off = 0
    for k in sorted(like):
        shape = np.shape(like[k])
        size = int(np.prod(shape, dtype=np.int64))
        out[k] = np.asarray(vec[off : off + size], dtype=np.float64).reshape(shape)
        off += size
    if off != vec.shape[0]:
        raise ValueError("vector length does not match the template")
    return out


def assign_blocks(param_names: Sequence[str], blocks: Sequence[str]) -> dict[str, list[str]]:
    """Block assignment of spec §2.1: first block name (in list order) that is a substring.

    Returns ``{block: [param, ...]}`` with params in ``param_names`` order, for NON-EMPTY blocks
    only, in block-list order (empty blocks are dropped, spec §2.1).  Unmatched params appear
    nowhere.
    """
    out: dict[str, list[str]] = {b: [] for b in blocks}
    for p in param_names:
        for b in blocks:
            if b in p:
                out[b].append(p)
                break
    return {b: ps for b, ps in out.items() if ps}


# ---------------------------------------------------------------------------------------------
# Preprocessing (spec §3)
# ---------------------------------------------------------------------------------------------


def task_vectors(base: Params, finetuned: Sequence[Params]) -> list[Params]:
    """τ_i = θ_i − θ_0 (spec §1), computed in float32 like torch, then upcast to float64.

    Like the reference's ``state_dict_sub(client, base, strict=False)``: keys of the fine-tuned dict
    (in its order) that are also in ``base``.
    """
    out = []
    for ft in finetuned:
        tv: Params = {}
        for k in ft:
            if k in base:
                diff = np.asarray(ft[k], dtype=np.float32) - np.asarray(base[k], dtype=np.float32)
                tv[k] = diff.astype(np.float64)
        out.append(tv)
    return out


def ties_trim(tvs: Sequence[Params], keep: float) -> list[Params]:
    """Global TIES trim (ref ``sparsify`` → ``topk_values_mask``, spec §3).

    Per task, over the WHOLE concatenated vector (all params, sorted keys) of length d:
    ``k = d − int(d·K)`` (``k ≤ 0`` → 1), ``t`` = k-th smallest |τ|, keep entries with ``|τ| ≥ t``
    (ties kept).  K is the KEEP fraction.  Skipped (copies returned) when ``keep ≥ 1`` because the
    reference only calls it for ``K < 1.0``; the ``K > 1 → K/100`` rescaling of ``topk_values_mask``
    is therefore unreachable and not reproduced.
    """
    if keep >= 1.0:
        return [{k: np.array(v, dtype=np.float64) for k, v in tv.items()} for tv in tvs]
    out = []
    for tv in tvs:
        flat = flatten(tv)
        d = flat.shape[0]
        k = d - int(d * keep)
        if k <= 0:
            k = 1
        mag = np.abs(flat)
        kth = np.partition(mag, k - 1)[k - 1]
        trimmed = flat * (mag >= kth)
        out.append(unflatten(trimmed, tv))
    return out


def _clamp_rows(x: np.ndarray, min_ratio: float, max_ratio: float) -> np.ndarray:
    """PCB ``clamp`` on a 2-D array: clip each row to its order statistics at
    ``int(d·min_ratio)`` and ``int(d·(1−max_ratio) − 1)`` (Python float arithmetic, spec §3/§5)."""
    d = x.shape[1]
    srt = np.sort(x, axis=1)
    lo = srt[:, int(d * min_ratio)][:, None]
    hi = srt[:, int(d * (1 - max_ratio) - 1)][:, None]
    return np.minimum(np.maximum(x, lo), hi)  # torch.clamp semantics (min > max → max)


def _minmax(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """PCB ``normalize``: (x − min)/(max − min); constant input → NaN (0/0), no warning."""
    mn = np.min(x, axis=axis, keepdims=axis is not None)
    mx = np.max(x, axis=axis, keepdims=axis is not None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (x - mn) / (mx - mn)


def _pcb_scores(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shared PCB core on rows X (r×d): returns (signed clamped rows, scores P).

    A = |X| clamped per row at [1e-4, 1−1e-4] order statistics; self = minmax_rows(A)²;
    P = exp(r·self) ⊙ tanh(X ⊙ colsum(X)), where r is the number of ROWS (all tasks for the global
    thresholds, the GROUP size m inside a merge — spec §3, §5).
    """
    r = X.shape[0]
    A = _clamp_rows(np.abs(X), 0.0001, 0.0001)
    Xc = np.sign(X) * A
    self_pcb = _minmax(A, axis=1) ** 2
    self_act = np.exp(r * self_pcb)
    cross_act = np.tanh(X * X.sum(axis=0))
    return Xc, self_act * cross_act


def pcb_thresholds(tvs: Sequence[Params], keep: float) -> list[tuple[float, float]] | None:
    """Global PCB thresholds (ref ``sparsify_pcb``, spec §3): per task ``(lo_i, hi_i)``.

    Over the stacked whole-model vectors T (n×d, all tasks): P as in :func:`_pcb_scores` with n
    rows; ``lo_i = sort(P_i)[int(d·K)]`` (quirk: K used as a DROP fraction),
    ``hi_i = sort(P_i)[int(d − 1)]``.
    Returns None when ``keep ≥ 1`` (the reference computes nothing; PCB merging then asserts).
    """
    if keep >= 1.0:
        return None
    X = np.stack([flatten(tv) for tv in tvs])
    d = X.shape[1]
    _, P = _pcb_scores(X)
    srt = np.sort(P, axis=1)
    lo = srt[:, int(d * keep)]
    hi = srt[:, int(d - 1)]
    return [(float(lo[i]), float(hi[i])) for i in range(X.shape[0])]


def dare(tvs: Sequence[Params], drop: float, rng: np.random.Generator) -> list[Params]:
    """DARE (ref ``dare_preprocess``, spec §3): per task, sequentially with one generator, over the
    sorted-key flat vector: keep a coordinate iff U(0,1) > p, scale kept ones by 1/(1−p).

    Any NumPy generator; bitwise parity with the torch generator is impossible (spec §3).
    """
    out = []
    for tv in tvs:
        flat = flatten(tv)
        mask = rng.random(flat.shape[0]) > drop
        out.append(unflatten(flat * mask * (1 / (1 - drop)), tv))
    return out


# ---------------------------------------------------------------------------------------------
# Merge operators on one group of one block (spec §5)
# ---------------------------------------------------------------------------------------------


def avg_ref(xs: Sequence[Params]) -> Params:
    """avg (ref ``state_dict_avg``): per tensor ``Σ_k (1/m)·x_k / Σ_k (1/m)``."""
    m = len(xs)
    p = [1 / m for _ in range(m)]
    return {k: sum(p[i] * xs[i][k] for i in range(m)) / sum(p) for k in xs[0]}


def ta_ref(xs: Sequence[Params], scale: float) -> Params:
    """Task arithmetic as implemented (spec §5): λ multiplies the MEAN, ``v = λ · avg(x)``."""
    return {k: scale * v for k, v in avg_ref(xs).items()}


def _ties_flat(X: np.ndarray) -> np.ndarray:
    """TIES elect + disjoint mean without trimming (ref ``ties_merging(trim=False)``).

    s_j = sign(Σ_k X_kj); zeros → sign(Σ_j s_j) over the whole (block) vector, +1 if that is 0.
    Mean of the entries whose sign is strictly the elected one; count clamped to ≥ 1.
    """
    signs = np.sign(X.sum(axis=0))
    majority = np.sign(signs.sum())
    if majority == 0:
        majority = 1.0
    signs[signs == 0] = majority
    keep = np.where(signs[None, :] > 0, X > 0, X < 0)
    selected = X * keep
    counts = (selected != 0).sum(axis=0).astype(np.float64)
    return selected.sum(axis=0) / np.maximum(counts, 1.0)


def ties_ref(xs: Sequence[Params], scale: float) -> Params:
    """TIES on a group (spec §5, trim already global): ``v = λ · disjoint_mean(elect(x))``."""
    X = np.stack([flatten(x) for x in xs])
    return unflatten(scale * _ties_flat(X), xs[0])


def pcb_ref(xs: Sequence[Params], lohi_of_members: Sequence[tuple[float, float]],
            scale: float) -> Params:
    """PCB, ``trim=False`` path (ref ``pcb_merging``, spec §5).

    On the group rows X (m×d_b): scores P recomputed with GROUP statistics (``exp(m·self)``), then
    per member ``scale_k = minmax(clamp(P_k, lo_k, hi_k))`` with the GLOBAL thresholds of
    :func:`pcb_thresholds`; ``v = λ · Σ_k scale_k ⊙ Xc_k / max(Σ_k scale_k, 1e-12)``.
    NaN (constant clamped scores) propagates exactly as in torch.
    """
    X = np.stack([flatten(x) for x in xs])
    Xc, P = _pcb_scores(X)
    scales = np.zeros_like(P)
    for k, (lo, hi) in enumerate(lohi_of_members):
        scales[k] = _minmax(np.minimum(np.maximum(P[k], lo), hi))
    with np.errstate(invalid="ignore"):
        merged = (Xc * scales).sum(axis=0) / np.maximum(scales.sum(axis=0), 1e-12)
    return unflatten(scale * merged, xs[0])


def consensus_masks_ref(xs: Sequence[Params], merged: Params, c: float) -> list[Params]:
    """TALL/consensus masks (ref ``state_dict_consensus``, spec §5):
    ``M_k = 1[|x_k| > c·|v − x_k|]`` (strict; v already includes λ), as float 0/1 tensors."""
    v = flatten(merged)
    out = []
    for x in xs:
        xf = flatten(x)
        mask = (np.abs(xf) > c * np.abs(v - xf)).astype(np.float64)
        out.append(unflatten(mask, x))
    return out


def emr_ref(xs: Sequence[Params]) -> tuple[Params, list[Params], np.ndarray]:
    """EMR-Merging (ref ``emr_merge``, spec §5), no λ.

    Per tensor ℓ (dict order of ``xs[0]``): μ = mean_k x_k; flag = +1 where μ > 0 else −1
    (μ = 0 → −1); M_k = 1[x_k·flag > 0]; v = flag ⊙ max_k |M_k ⊙ x_k|.
    Rescaler γ_k = Σ_ℓ mean|x_k[ℓ]| / Σ_ℓ mean|v[ℓ] ⊙ M_k[ℓ]| (sum of per-tensor MEANS).

    Returns ``(v, masks, rescalers)`` with ``masks[k][ℓ]`` the BINARY float mask M_k (the greedy
    loop stores ``M_k · γ_k``).  γ_k = x/0 → inf, 0/0 → NaN (as torch), without warnings.
    """
    m = len(xs)
    unified: Params = {}
    masks: list[Params] = [{} for _ in range(m)]
    scales = np.zeros(m)
    for name in xs[0]:
        stacked = np.stack([np.asarray(x[name], dtype=np.float64) for x in xs])
        mu = stacked.mean(axis=0)
        flag = np.where(mu > 0, 1.0, -1.0)
        pmax = np.zeros_like(stacked[0])
        for k in range(m):
            mk = (stacked[k] * flag) > 0
            masks[k][name] = mk.astype(np.float64)
            pmax = np.maximum(pmax, np.abs(mk * stacked[k]))
            scales[k] += np.mean(np.abs(stacked[k]))
        unified[name] = pmax * flag
    new_scales = np.zeros(m)
    for k in range(m):
        for name in unified:
            new_scales[k] += np.mean(np.abs(unified[name] * masks[k][name]))
    with np.errstate(divide="ignore", invalid="ignore"):
        rescalers = scales / new_scales
    return unified, masks, rescalers


# ---------------------------------------------------------------------------------------------
# Size accounting (spec §4.6)
# ---------------------------------------------------------------------------------------------


def size_change(sA: int, sB: int, has_pre: bool) -> tuple[int, int, int]:
    """(vectors removed, vectors added, masks added) of ref ``get_size_change`` (spec §4.6 table).

    Only used for mask methods: ``store += numel_b·(−r + a + m/32)``.
    """
    if sA == 1 and sB == 1:
        return 0, 0, 0
    if (sA == 2 and sB == 1) or (sA == 1 and sB == 2):
        return 3, (1 if has_pre else 2), 3
    if (sA > 2 and sB == 1) or (sA == 1 and sB > 2):
        return 1, 0, 1
    if sA == 2 and sB == 2:
        return 4, (1 if has_pre else 2), 4
    if (sA > 2 and sB == 2) or (sA == 2 and sB > 2):
        return 2, 0, 2
    if sA > 2 and sB > 2:
        return 1, 0, 0
    raise ValueError(f"invalid group sizes {sA}, {sB}")


# ---------------------------------------------------------------------------------------------
# Similarities (spec §4.2)
# ---------------------------------------------------------------------------------------------


def init_similarity(distance: str) -> float:
    """Initial 'best' value of the reference (``init_sim``): cosine −1.1, euclidean −inf,
    sign −0.1."""
    if distance == "cosine":
        return -1.1
    if distance == "euclidean":
        return float("-inf")
    if distance == "sign":
        return -0.1
    raise ValueError(f"invalid distance {distance!r}")


def _div(a: float, b: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def group_similarity(a: np.ndarray, b: np.ndarray, distance: str) -> float:
    """Merged-group-vector similarity on flat vectors (ref ``find_sim``, spec §4.2(b)).

    cosine: <a,b>/(‖a‖‖b‖) WITHOUT eps (zero vector → NaN); euclidean: −‖a−b‖/sqrt(d);
    sign: fraction of coordinates with equal sign (sign(0)=0 matches 0).
    """
    if distance == "cosine":
        return _div(np.dot(a, b), np.linalg.norm(a) * np.linalg.norm(b))
    if distance == "euclidean":
        return -float(np.linalg.norm(a - b)) / math.sqrt(a.shape[0])
    if distance == "sign":
        return float(np.sum(np.sign(a) == np.sign(b))) / a.shape[0]
    raise ValueError(f"invalid distance {distance!r}")


def constituent_similarity(As: Sequence[np.ndarray], Bs: Sequence[np.ndarray],
                           linkage: str) -> float:
    """Constituent (member) similarity (ref ``find_constituent_sim``, spec §4.2(a)), cosine only.

    c(i,j) = <x_i,x_j>/(‖x_i‖‖x_j‖ + 1e-8) over all i∈A, j∈B (A-major order);
    reference names: ``single`` → MIN, ``average`` → mean (Python ``sum``/len), ``complete`` → MAX.
    """
    eps = 1e-8
    na = [float(np.linalg.norm(a)) for a in As]
    nb = [float(np.linalg.norm(b)) for b in Bs]
    pairs = [
        float(np.dot(a, b)) / (norm_a * norm_b + eps)
        for a, norm_a in zip(As, na)
        for b, norm_b in zip(Bs, nb)
    ]
    if linkage == "average":
        return sum(pairs) / len(pairs)
    if linkage == "single":
        return min(pairs)
    if linkage == "complete":
        return max(pairs)
    raise ValueError(f"unsupported linkage {linkage!r}")


def _is_nan(x: float) -> bool:
    return x != x


def _better(sim: float, best: float | None) -> bool:
    """Cross-block order (spec §4.4 + our NaN policy): real > NaN; among reals strict '>'."""
    if best is None:
        return True
    if _is_nan(sim):
        return False
    if _is_nan(best):
        return True
    return sim > best


# ---------------------------------------------------------------------------------------------
# Merge engine: per-block DSU with group vectors, deployed weights, masks, size accounting
# ---------------------------------------------------------------------------------------------


class ReferenceRun(NamedTuple):
    """Result of a reference run.

    events: one dict per merge ``{"t", "block", "members_i", "members_j", "similarity",
        "store_params", "n_models"}`` (members sorted task indices; ``members_i`` = group listed
        first).
    checkpoints: ``{k: [params of task 0, ..., task n−1]}`` after k merges, as the reference
        evaluates them (``θ0 + (W − θ0) ⊙ mask`` for masked tensors, float64), for every
        requested k.
    partitions: ``{k: {block: [[members], ...]}}`` at the same k (groups sorted by smallest member).
    """

    events: list[dict[str, Any]]
    checkpoints: dict[int, list[Params]]
    partitions: dict[int, dict[str, list[list[int]]]]


class _Engine:
    """State shared by the greedy / structured / random loops (spec §4.1, §4.4, §4.6).

    ``x_sim[b][i]``: the "individual" vector of task i in block b (DSU ``individual_task_vectors``,
    used for constituent similarity and as the initial group vector); ``x_merge[b][i]``: the
    preprocessed ("sparsified") vector used by every merge operator.
    """

    def __init__(
        self,
        base: Params,
        finetuned: Sequence[Params],
        block_params: dict[str, list[str]],
        x_sim: Sequence[Params],
        x_merge: Sequence[Params],
        method: str,
        scale: float,
        consensus: float,
        lohi: list[tuple[float, float]] | None,
        param_names: Sequence[str],
    ):
        if method not in METHODS:
            raise ValueError(f"invalid method {method!r}")
        if method == "pcb" and lohi is None:
            raise ValueError("pcb needs keep < 1 (the reference asserts on missing thresholds)")
        self.n = n = len(finetuned)
        self.method = method
        self.scale = scale
        self.consensus = consensus
        self.lohi = lohi
        self.blocks = list(block_params)
        self.block_params = block_params
        self.base = {k: np.asarray(base[k], dtype=np.float64) for k in param_names}
        # Deployed weights W_i (initialised to θ_i) and masks (spec §4.1).
        self.W = [{k: np.asarray(ft[k], dtype=np.float64) for k in param_names} for ft in finetuned]
        self.masks: list[Params] = [{} for _ in range(n)]
        self.x_sim = {b: [{p: x[p] for p in ps} for x in x_sim] for b, ps in block_params.items()}
        self.x_merge = {b: [{p: x[p] for p in ps} for x in x_merge]
                        for b, ps in block_params.items()}
        self.x_sim_flat = {b: [flatten(v) for v in self.x_sim[b]] for b in self.blocks}
        self.parent = {b: list(range(n)) for b in self.blocks}
        self.rank = {b: [1] * n for b in self.blocks}
        self.group_vec: dict[str, dict[int, Params]] = {
            b: {i: self.x_sim[b][i] for i in range(n)} for b in self.blocks
        }
        self.has_pre = {b: False for b in self.blocks}
        numel = sum(int(np.size(x_sim[0][k])) for k in param_names)
        self.total = n * numel
        self.store: float = self.total

    # --- DSU (ref DisjointSetUnionWithTaskVectors) --------------------------------------------
    def find(self, b: str, x: int) -> int:
        parent = self.parent[b]
        if parent[x] != x:
            parent[x] = self.find(b, parent[x])
        return parent[x]

    def unique_groups(self, b: str) -> list[int]:
        """``list(set(find(x) for x in range(n)))``: a REAL set of root ids, so CPython's set
        iteration order is reproduced (spec §4.2)."""
        return list(set(self.find(b, x) for x in range(len(self.parent[b]))))

    def members(self, b: str, x: int) -> list[int]:
        r = self.find(b, x)
        return [i for i in range(self.n) if self.find(b, i) == r]

    def group_flat(self, b: str, root: int) -> np.ndarray:
        return flatten(self.group_vec[b][self.find(b, root)])

    def pair_similarity(self, b: str, ra: int, rb: int, linkage: str | None,
                        distance: str) -> float:
        if linkage is not None:
            As = [self.x_sim_flat[b][i] for i in self.members(b, ra)]
            Bs = [self.x_sim_flat[b][i] for i in self.members(b, rb)]
            return constituent_similarity(As, Bs, linkage)
        return group_similarity(self.group_flat(b, ra), self.group_flat(b, rb), distance)

    def best_pair(
        self, b: str, linkage: str | None, distance: str, init: float
    ) -> tuple[int, int, float] | None:
        """Best pair of the block (spec §4.2): pairs (i<j) of ``unique_groups`` order, strict ``>``
        against the reference init value; NaN policy fallback (module docstring).  None if
        < 2 groups.
        """
        groups = self.unique_groups(b)
        if len(groups) < 2:
            return None
        sims = []
        best = None
        best_sim = init
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                s = self.pair_similarity(b, groups[i], groups[j], linkage, distance)
                sims.append((groups[i], groups[j], s))
                if s > best_sim:
                    best, best_sim = (groups[i], groups[j]), s
        if best is not None:
            return best[0], best[1], best_sim
        # The reference would crash here (spec §4.2).  Our policy: best real pair, else first pair.
        real = [p for p in sims if not _is_nan(p[2])]
        if real:
            top = real[0]
            for p in real[1:]:
                if p[2] > top[2]:
                    top = p
            return top
        return sims[0]

    # --- one merge (ref union + the bookkeeping after it in greedy_block_merge) --------------
    def merge(self, b: str, A: int, B: int, t: int, similarity: float) -> dict[str, Any]:
        n = self.n
        mask_method = self.method in MASK_METHODS
        members_i = self.members(b, A)
        members_j = self.members(b, B)
        size_i, size_j = len(members_i), len(members_j)
        to_remove, to_add, to_add_masks = size_change(size_i, size_j, self.has_pre[b])
        if size_i + size_j > 2:
            self.has_pre[b] = True

        # union(A, B): members in ascending task order, their PREPROCESSED vectors.
        rootX, rootY = self.find(b, A), self.find(b, B)
        involved = [i for i in range(n) if self.find(b, i) in (rootX, rootY)]
        xs = [self.x_merge[b][i] for i in involved]
        m = len(involved)
        merged: Params | None = None
        new_masks: list[Params] | None = None
        if self.method == "avg":
            merged = avg_ref(xs)
        elif self.method == "ta":
            merged = ta_ref(xs, self.scale)
        elif self.method == "ties":
            merged = ties_ref(xs, self.scale)
        elif self.method == "pcb":
            assert self.lohi is not None
            merged = pcb_ref(xs, [self.lohi[i] for i in involved], self.scale)
        elif m > 2:  # mask methods only merge groups of > 2 members (spec §4.4)
            if self.method == "consensus_ta":
                merged = ta_ref(xs, self.scale)
                new_masks = consensus_masks_ref(xs, merged, self.consensus)
            elif self.method == "consensus_ties":
                # NB no trim: the global trim only happens for method == "ties" (spec §5, §9.7).
                merged = ties_ref(xs, self.scale)
                new_masks = consensus_masks_ref(xs, merged, self.consensus)
            else:  # emr
                merged, bin_masks, rescalers = emr_ref(xs)
                new_masks = [
                    {k: v * rescalers[idx] for k, v in bin_masks[idx].items()} for idx in range(m)
                ]
        if new_masks is not None:
            for idx, i in enumerate(involved):
                self.masks[i].update(new_masks[idx])

        # Union by rank: ranks start at 1; equal ranks → root of the first-listed group, rank+1.
        keep_vec = not (mask_method and m <= 2)
        rank = self.rank[b]
        parent = self.parent[b]
        if rootX != rootY:
            if rank[rootX] > rank[rootY]:
                parent[rootY] = rootX
                new_root = rootX
            elif rank[rootX] < rank[rootY]:
                parent[rootX] = rootY
                new_root = rootY
            else:
                parent[rootY] = rootX
                rank[rootX] += 1
                new_root = rootX
            if keep_vec:
                assert merged is not None
                self.group_vec[b][new_root] = merged
        # Mask methods, two singletons: nothing merged, the group keeps the SURVIVING root's vector.
        merged_group = self.find(b, A)
        group_vec = self.group_vec[b][merged_group]

        # Size accounting (spec §4.6), same arithmetic as the reference (ints, then /32 floats).
        if mask_method:
            for layer in group_vec:
                numel = int(np.size(group_vec[layer]))
                self.store -= numel * to_remove
                self.store += numel * to_add
                self.store += numel * to_add_masks * 1 / 32
        else:
            for layer in group_vec:
                self.store -= int(np.size(group_vec[layer]))

        # Deployment: W_i := θ0 + v for all members (unless mask method with two singletons).
        if keep_vec:
            for i in range(n):
                if self.find(b, i) == merged_group:
                    for layer in group_vec:
                        self.W[i][layer] = self.base[layer] + group_vec[layer]

        return {
            "t": t,
            "block": b,
            "members_i": sorted(members_i),
            "members_j": sorted(members_j),
            "similarity": float(similarity),
            "store_params": float(self.store),
            "n_models": n * self.store / self.total,
        }

    # --- outputs ---------------------------------------------------------------------------
    def deployed(self) -> list[Params]:
        """Task models as the reference evaluates them: θ0 + (W_i − θ0) ⊙ Mask_i on masked
        tensors."""
        out = []
        for i in range(self.n):
            d: Params = {}
            for k, w in self.W[i].items():
                if k in self.masks[i]:
                    d[k] = self.base[k] + (w - self.base[k]) * self.masks[i][k]
                else:
                    d[k] = w.copy()
            out.append(d)
        return out

    def partition(self) -> dict[str, list[list[int]]]:
        out = {}
        for b in self.blocks:
            groups: dict[int, list[int]] = {}
            for i in range(self.n):
                groups.setdefault(self.find(b, i), []).append(i)
            out[b] = sorted(groups.values())
        return out


def _prepare(
    base: Params,
    finetuned: Sequence[Params],
    blocks: Sequence[str],
    method: str,
    keep: float,
    dare_p: float | None,
    dare_seed: int,
):
    """One-time preprocessing with the reference precedence (spec §3): DARE first; then for
    ``ties`` with K < 1 the trim of the ORIGINAL τ overwrites it; for ``pcb`` with K < 1 only the
    global thresholds are computed (from the original τ)."""
    tau = task_vectors(base, finetuned)
    param_names = list(tau[0])
    x = None
    if dare_p is not None:
        x = dare(tau, dare_p, np.random.default_rng(dare_seed))
    lohi = None
    if method == "ties" and keep < 1.0:
        x = ties_trim(tau, keep)
    elif method == "pcb" and keep < 1.0:
        lohi = pcb_thresholds(tau, keep)
    if x is None:
        x = [{k: v.copy() for k, v in tv.items()} for tv in tau]
    block_params = assign_blocks(param_names, blocks)
    return tau, x, lohi, block_params, param_names


def _snapshot(eng: _Engine, k: int, want: set[int], ckpts: dict, parts: dict) -> None:
    if k in want:
        ckpts[k] = eng.deployed()
        parts[k] = eng.partition()


def _check_common(method: str, linkage: str | None, distance: str) -> None:
    if method not in METHODS:
        raise ValueError(f"invalid method {method!r}")
    if linkage is not None and linkage not in LINKAGES:
        raise ValueError(f"invalid linkage {linkage!r}")
    if distance not in DISTANCES:
        raise ValueError(f"invalid distance {distance!r}")


# ---------------------------------------------------------------------------------------------
# The greedy loop (ref greedy_block_merge, spec §4)
# ---------------------------------------------------------------------------------------------


def greedy_reference(
    base: Params,
    finetuned: Sequence[Params],
    blocks: Sequence[str],
    method: str,
    *,
    scale: float = 1.0,
    keep: float = 1.0,
    consensus: float = 0.3,
    linkage: str | None = None,
    distance: str = "cosine",
    checkpoints: Sequence[int] = (),
    dare: float | None = None,
    dare_seed: int = 43,
) -> ReferenceRun:
    """Slow transcription of the reference ``greedy_block_merge`` (spec §4).

    Args:
      base, finetuned: θ0 and θ_i as one-level dicts.
      blocks: ordered block names (first-substring match, spec §2.1); empty blocks dropped.
      method: one of :data:`METHODS`.
      scale: λ (``--LAMBDA``), multiplies the merged vector of ta/ties/pcb/consensus_*.
      keep: ``--K`` (TIES keep fraction for the global trim; PCB threshold index).
      consensus: λc of the consensus masks.
      linkage: ``"single"|"average"|"complete"`` → constituent cosine (reference names:
        single = MIN, average = mean, complete = MAX); ``None`` → merged-group-vector
        ``distance``.
      distance: ``"cosine"|"euclidean"|"sign"`` (only used when ``linkage is None``).
      checkpoints: numbers of merges k (0..T) after which deployed params are recorded.
      dare: DARE drop probability p or None; ``dare_seed`` seeds ``np.random.default_rng``.

    In greedy the preprocessed vectors are used BOTH for similarity and merging (spec §1).
    Iterates exactly T = (n−1)·B times (B = non-empty blocks).  Only the block merged in the
    previous iteration is re-scored (spec §4.3).  The block with the highest best similarity wins;
    ties → first block in list order (``max`` over the insertion-ordered dict); NaN policy in the
    module docstring.
    """
    _check_common(method, linkage, distance)
    _, x, lohi, block_params, names = _prepare(base, finetuned, blocks, method, keep,
                                                dare, dare_seed)
    eng = _Engine(base, finetuned, block_params, x, x, method, scale, consensus, lohi, names)
    n = eng.n
    # NB the reference takes the init from --DISTANCE even in constituent mode (-1.1 for the default
    # cosine); constituent cosines are >= -1 and never NaN, so this only matters for the fallback.
    init = init_similarity(distance)
    T = (n - 1) * len(eng.blocks)
    want = set(int(k) for k in checkpoints)
    ckpts: dict[int, list[Params]] = {}
    parts: dict[int, dict[str, list[list[int]]]] = {}
    _snapshot(eng, 0, want, ckpts, parts)
    events: list[dict[str, Any]] = []
    blockwise_best: dict[str, tuple[int, int, float]] = {}
    block_max: str | None = None
    for t in range(T):
        to_update = eng.blocks if block_max is None else [block_max]
        for b in to_update:
            bp = eng.best_pair(b, linkage, distance, init)
            if bp is not None:
                blockwise_best[b] = bp  # existing keys keep their (block-list) position
            elif b in blockwise_best:
                del blockwise_best[b]
        # max(blockwise_best, key=sim): first maximal block in insertion (= block-list) order.
        block_max = None
        best_sim: float | None = None
        for b, (_, _, s) in blockwise_best.items():
            if block_max is None or _better(s, best_sim):
                block_max, best_sim = b, s
        assert block_max is not None
        A, B, sim = blockwise_best[block_max]
        events.append(eng.merge(block_max, A, B, t, sim))
        _snapshot(eng, t + 1, want, ckpts, parts)
    return ReferenceRun(events, ckpts, parts)


# ---------------------------------------------------------------------------------------------
# Baseline orderings (ref structured_block_merge / random_block_merge, spec §7)
# ---------------------------------------------------------------------------------------------


def structured_reference(
    base: Params,
    finetuned: Sequence[Params],
    blocks: Sequence[str],
    method: str,
    *,
    direction: str = "right-left",
    scale: float = 1.0,
    keep: float = 1.0,
    consensus: float = 0.3,
    distance: str = "cosine",
    checkpoints: Sequence[int] = (),
    dare: float | None = None,
    dare_seed: int = 43,
) -> ReferenceRun:
    """Transcription of ``structured_block_merge`` (spec §7).

    ``right-left`` = block-list order (output side first, ref direction 'backward');
    ``left-right`` = reversed list.  One block at a time: merge the most similar pair of GROUP
    VECTORS (``distance``; init −1.1 for every metric, strict ``>``) until one group remains, then
    the next block.
    Singleton group vectors are the RAW τ (merges use the preprocessed vectors).  If no pair beats
    −1.1 (the reference would crash), the NaN policy of the module docstring applies.
    """
    _check_common(method, None, distance)
    if direction not in ("right-left", "left-right"):
        raise ValueError(f"invalid direction {direction!r}")
    tau, x, lohi, block_params, names = _prepare(base, finetuned, blocks, method, keep,
                                                  dare, dare_seed)
    if direction == "left-right":
        block_params = dict(reversed(list(block_params.items())))
    eng = _Engine(base, finetuned, block_params, tau, x, method, scale, consensus, lohi, names)
    n = eng.n
    T = (n - 1) * len(eng.blocks)
    want = set(int(k) for k in checkpoints)
    ckpts: dict[int, list[Params]] = {}
    parts: dict[int, dict[str, list[list[int]]]] = {}
    _snapshot(eng, 0, want, ckpts, parts)
    events: list[dict[str, Any]] = []
    cur = 0
    for t in range(T):
        b = eng.blocks[cur]
        bp = eng.best_pair(b, None, distance, -1.1)
        assert bp is not None
        A, B, sim = bp
        events.append(eng.merge(b, A, B, t, sim))
        _snapshot(eng, t + 1, want, ckpts, parts)
        if len(eng.unique_groups(b)) == 1:
            cur += 1
    return ReferenceRun(events, ckpts, parts)


def random_reference(
    base: Params,
    finetuned: Sequence[Params],
    blocks: Sequence[str],
    method: str,
    *,
    seed: int = 43,
    scale: float = 1.0,
    keep: float = 1.0,
    consensus: float = 0.3,
    checkpoints: Sequence[int] = (),
    dare: float | None = None,
    dare_seed: int = 43,
) -> ReferenceRun:
    """Transcription of ``random_block_merge`` (spec §7) with ``np.random.default_rng(seed)``.

    Per step, exactly the reference's calls: ``rng.choice(blocks_remaining)`` (a list of block
    names, in block-list order, a block removed once it has one group), then
    ``rng.choice(unique_groups, size=2, replace=False)`` on the ``list(set(roots))`` order; the
    first drawn root is the first-listed group.  Reported similarity is 0.0 (the reference logs
    0.0).
    """
    _check_common(method, None, "cosine")
    tau, x, lohi, block_params, names = _prepare(base, finetuned, blocks, method, keep,
                                                  dare, dare_seed)
    eng = _Engine(base, finetuned, block_params, tau, x, method, scale, consensus, lohi, names)
    rng = np.random.default_rng(seed)
    n = eng.n
    T = (n - 1) * len(eng.blocks)
    want = set(int(k) for k in checkpoints)
    ckpts: dict[int, list[Params]] = {}
    parts: dict[int, dict[str, list[list[int]]]] = {}
    _snapshot(eng, 0, want, ckpts, parts)
    events: list[dict[str, Any]] = []
    remaining = list(eng.blocks)
    for t in range(T):
        b = str(rng.choice(remaining))
        groups = eng.unique_groups(b)
        if not len(groups) > 1:
            raise RuntimeError("No merge possible")
        picked = rng.choice(groups, size=2, replace=False)
        A, B = int(picked[0]), int(picked[1])
        events.append(eng.merge(b, A, B, t, 0.0))
        if len(eng.unique_groups(b)) == 1:
            remaining.remove(b)
        _snapshot(eng, t + 1, want, ckpts, parts)
    return ReferenceRun(events, ckpts, parts)
