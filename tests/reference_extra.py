"""Slow float64 NumPy transcriptions of the "beyond the reference" merge methods (test ground
truth).

NOT part of the package and never imported by it. Each function is written from the method's
paper (equations / pseudo-code; where the paper is silent, from the authors' released code, as
noted) and deliberately differs in structure from the kernels in :mod:`flexmerge_jax.methods`: it
works on the *gathered* group (a list of member dicts in task order, float64), concatenates
compactly (no fixed-width buffers), ranks with Python sorts and loops per element where that is
clearer.

Conventions: a task vector is a one-level ``dict[str, np.ndarray]``; ``xs`` is the list of the
group's members in ascending task order. "Matrix" = a 2-D parameter not in ``exclude``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Params = dict[str, np.ndarray]

__all__ = [
    "ta_sum_ref",
    "ties_merge_func_ref",
    "tsv_m_ref",
    "iso_c_ref",
    "iso_cts_ref",
    "breadcrumbs_ref",
    "magprune_ref",
    "della_ref",
    "magmax_ref",
    "model_stock_ref",
    "slerp_ref",
]


def _f64(xs: Sequence[Params]) -> list[Params]:
    return [{k: np.asarray(v, np.float64) for k, v in x.items()} for x in xs]


def _mean(xs: Sequence[Params], k: str) -> np.ndarray:
    return sum(x[k] for x in xs) / len(xs)


def _polar(a: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def _is_matrix(k: str, v: np.ndarray, exclude) -> bool:
    return v.ndim == 2 and k not in exclude


# ----------------------------------------------------------------------------- sum conventions


def ta_sum_ref(xs: Sequence[Params], alpha: float) -> Params:
    """Task arithmetic, sum convention: alpha * sum_i tau_i (Ilharco et al. 2023)."""
    xs = _f64(xs)
    return {k: alpha * sum(x[k] for x in xs) for k in xs[0]}


def ties_merge_func_ref(xs: Sequence[Params], scale: float, merge_func: str) -> Params:
    """TIES elect + disjoint merge (Yadav et al. 2023: elect + disjoint merge), per block.

    Elected sign = sign of the column sum; zero -> sign of the sum of the block's elected signs
    (+1 if 0), the FlexMerge reference's fallback. Disjoint set = entries with exactly that sign.
    """
    xs = _f64(xs)
    keys = list(xs[0])
    col = {k: np.sign(sum(x[k] for x in xs)) for k in keys}
    total = sum(float(c.sum()) for c in col.values())
    maj = -1.0 if total < 0 else 1.0
    out = {}
    for k in keys:
        sg = np.where(col[k] == 0, maj, col[k])
        X = np.stack([x[k] for x in xs])
        keep = np.where(sg[None] > 0, X > 0, X < 0)
        sel = np.where(keep, X, 0.0)
        if merge_func == "mean":
            v = sel.sum(0) / np.maximum(keep.sum(0), 1)
        elif merge_func == "sum":
            v = sel.sum(0)
        elif merge_func == "max":
            v = np.abs(sel).max(0) * sg
        else:
            raise ValueError(merge_func)
        out[k] = scale * v
    return out


# ----------------------------------------------------------------------------- TSV-M


def tsv_m_ref(xs: Sequence[Params], alpha: float = 1.0, k: int | None = None, exclude=()) -> Params:
    """TSV-M (Gargiulo et al., CVPR 2025): per matrix, keep the top k = floor(r/T)
    singular triplets of each task, concatenate U_hat = [U_1..U_T], S_hat, V_hat = [V_1..V_T],
    orthogonalise U_hat, V_hat by their polar factors (SVD: P Q^T), merged = U_perp S_hat V_perp^T,
    times alpha. Non-matrix parameters: mean (the authors' / FusionBench's choice)."""
    xs = _f64(xs)
    T = len(xs)
    out = {}
    for name, v0 in xs[0].items():
        if not _is_matrix(name, v0, exclude):
            out[name] = alpha * _mean(xs, name)
            continue
        r = min(v0.shape)
        kk = r // T if k is None else min(k, r // T)
        Us, Ss, Vs = [], [], []
        for x in xs:
            u, s, vh = np.linalg.svd(x[name], full_matrices=False)
            Us.append(u[:, :kk])
            Ss.append(s[:kk])
            Vs.append(vh[:kk].T)
        U = np.concatenate(Us, axis=1)
        S = np.concatenate(Ss)
        V = np.concatenate(Vs, axis=1)
        if U.shape[1] == 0:
            out[name] = np.zeros_like(v0)
            continue
        out[name] = alpha * (_polar(U) @ np.diag(S) @ _polar(V).T)
    return out


# ----------------------------------------------------------------------------- Iso-C / Iso-CTS


def iso_c_ref(xs: Sequence[Params], alpha: float = 1.0, exclude=()) -> Params:
    """Iso-C (Marczak et al., ICML 2025, Sec. 4): Delta = sum_t tau_t = U S V^T;
    Delta_iso = mean(S) U V^T, times alpha. Non-matrix: mean (authors' code)."""
    xs = _f64(xs)
    out = {}
    for name, v0 in xs[0].items():
        if not _is_matrix(name, v0, exclude):
            out[name] = alpha * _mean(xs, name)
            continue
        u, s, vh = np.linalg.svd(sum(x[name] for x in xs), full_matrices=False)
        out[name] = alpha * s.mean() * (u @ vh)
    return out


def iso_cts_sizes(r: int, T: int, frac: float) -> tuple[int, int]:
    """(common size c, per-task size s) of Iso-CTS: c0 = int(r frac), s = round((r-c0)/T)
    (Python round: half to even) clipped to [0, r // T], c = r - T s (authors' code)."""
    c0 = int(r * frac)
    s = min(max(round((r - c0) / T), 0), r // T)
    return r - T * s, s


def iso_cts_ref(
    xs: Sequence[Params], frac: float = 0.8, alpha: float = 1.0, exclude=()
) -> Params:
    """Iso-CTS (Marczak et al., ICML 2025, Sec. 4): common subspace = top-c left singular vectors
    of sum_t tau_t; each task projected off it keeps its top-s triplets; the concatenation
    [U_common, U_1..U_T] (and V's) is orthogonalised (polar), the spectrum flattened to the mean
    of the r concatenated singular values; times alpha. Non-matrix: mean."""
    xs = _f64(xs)
    T = len(xs)
    out = {}
    for name, v0 in xs[0].items():
        if not _is_matrix(name, v0, exclude):
            out[name] = alpha * _mean(xs, name)
            continue
        r = min(v0.shape)
        c, s = iso_cts_sizes(r, T, frac)
        u, sv, vh = np.linalg.svd(sum(x[name] for x in xs), full_matrices=False)
        Uc, Sc, Vc = u[:, :c], sv[:c], vh[:c].T
        Us, Ss, Vs = [Uc], [Sc], [Vc]
        for x in xs:
            w = x[name] - Uc @ (Uc.T @ x[name])
            ut, st, vth = np.linalg.svd(w, full_matrices=False)
            Us.append(ut[:, :s])
            Ss.append(st[:s])
            Vs.append(vth[:s].T)
        U = np.concatenate(Us, axis=1)
        S = np.concatenate(Ss)
        V = np.concatenate(Vs, axis=1)
        out[name] = alpha * S.mean() * (_polar(U) @ _polar(V).T)
    return out


# ----------------------------------------------------------------------------- rankings


def _groups(shape: tuple, granularity: str) -> list[list[tuple]]:
    """Index tuples of each ranking group: the whole tensor, or (``"node"``, ndim >= 2) the
    entries t[..., j] for each last-axis index j."""
    idx = list(np.ndindex(*shape)) if shape else [()]
    if granularity == "tensor" or len(shape) < 2:
        return [idx]
    return [[i for i in idx if i[-1] == j] for j in range(shape[-1])]


def _ascending_ranks(t: np.ndarray, group: list[tuple]) -> dict[tuple, int]:
    order = sorted(range(len(group)), key=lambda q: (abs(t[group[q]]), q))
    return {group[q]: rank for rank, q in enumerate(order)}


# ----------------------------------------------------------------------------- Breadcrumbs


def breadcrumbs_ref(
    xs: Sequence[Params], top: float, bottom: float, alpha: float, granularity: str = "tensor"
) -> Params:
    """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): per task and layer, sort by
    |tau|, mask the int(top N) largest and int(bottom N) smallest;
    merged = alpha * sum_t m_t tau_t."""
    xs = _f64(xs)
    out = {}
    for name, v0 in xs[0].items():
        acc = np.zeros_like(v0)
        for x in xs:
            t = x[name]
            mask = np.zeros(t.shape, bool)
            for g in _groups(t.shape, granularity):
                N = len(g)
                n_top, n_bot = int(N * top), int(N * bottom)
                for i, rank in _ascending_ranks(t, g).items():
                    mask[i] = n_bot <= rank < N - n_top
            acc = acc + np.where(mask, t, 0.0)
        out[name] = alpha * acc
    return out


# ----------------------------------------------------------------------------- DELLA


def magprune_ref(
    t: np.ndarray, u: np.ndarray, density: float, eps: float, rescale: bool, granularity: str
) -> np.ndarray:
    """MagPrune (Deep et al. 2024, as the authors' ``rank_magnitude`` code): in each group of N
    entries, ascending magnitude rank r in 0..N-1, keep probability
    p = (density - eps) + 2 eps r / (N - 1) (N = 1: density), keep iff u < p, rescale 1/p."""
    t = np.asarray(t, np.float64)
    out = np.zeros_like(t)
    for g in _groups(t.shape, granularity):
        N = len(g)
        for i, rank in _ascending_ranks(t, g).items():
            norm = rank / (N - 1) if N > 1 else 0.5
            p = (density - eps) + 2.0 * eps * norm
            if u[i] < p:
                out[i] = t[i] / p if rescale else t[i]
    return out


def della_ref(
    xs: Sequence[Params],
    us: Sequence[Params],
    density: float,
    eps: float,
    scale: float,
    rescale: bool = True,
    granularity: str = "node",
) -> Params:
    """DELLA (Deep et al. 2024): MagPrune each task, elect (sign of the sum, + if >= 0, as the
    authors' code), fuse (mean of the entries with the elected sign), times lambda."""
    xs = _f64(xs)
    out = {}
    for name in xs[0]:
        P = [magprune_ref(x[name], u[name], density, eps, rescale, granularity)
             for x, u in zip(xs, us)]
        tot = sum(P)
        res = np.zeros_like(tot)
        for i in np.ndindex(*tot.shape) if tot.shape else [()]:
            sg = 1.0 if tot[i] >= 0 else -1.0
            vals = [p[i] for p in P if np.sign(p[i]) == sg]
            res[i] = sum(vals) / len(vals) if vals else 0.0
        out[name] = scale * res
    return out


# ----------------------------------------------------------------------------- MagMax


def magmax_ref(xs: Sequence[Params], scale: float) -> Params:
    """MagMax (Marczak et al., ECCV 2024): per entry the value of max |tau| over tasks;
    a later task wins ties (the official code folds with >=)."""
    xs = _f64(xs)
    out = {}
    for name, v0 in xs[0].items():
        res = np.zeros_like(v0)
        for i in np.ndindex(*v0.shape) if v0.shape else [()]:
            best = xs[0][name][i]
            for x in xs[1:]:
                if abs(x[name][i]) >= abs(best):
                    best = x[name][i]
            res[i] = best
        out[name] = scale * res
    return out


# ----------------------------------------------------------------------------- Model Stock


def model_stock_ref(xs: Sequence[Params], angle_average: str = "angle") -> tuple[Params, dict]:
    """Model Stock (Jang et al., ECCV 2024) per layer: theta = angle between the
    fine-tuned task vectors (pairs averaged: as angles, FusionBench, or as cosines),
    t = N cos / (1 + (N-1) cos), merged task vector = t * mean. Returns (merged, {name: t})."""
    xs = _f64(xs)
    N = len(xs)
    out, ts = {}, {}
    for name in xs[0]:
        if N == 1:
            t = 1.0
        else:
            vals = []
            for i in range(N):
                for j in range(i + 1, N):
                    a, b = xs[i][name].ravel(), xs[j][name].ravel()
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    c = float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
                    c = min(1.0, max(-1.0, c))
                    vals.append(math.acos(c) if angle_average == "angle" else c)
            mean = sum(vals) / len(vals)
            c = math.cos(mean) if angle_average == "angle" else mean
            t = N * c / (1 + (N - 1) * c)
        ts[name] = t
        out[name] = t * _mean(xs, name)
    return out, ts


# ----------------------------------------------------------------------------- SLERP


def slerp_ref(
    a: Params,
    b: Params,
    t: float,
    base: Params | None = None,
    dot_threshold: float = 0.9995,
    eps: float = 1e-8,
) -> Params:
    """SLERP (Shoemake 1985) per tensor of v0 -> v1 (task vectors, or theta_0 + tau when base is
    given, minus theta_0 after); lerp when |cos| > dot_threshold (mergekit/FusionBench)."""
    out = {}
    for name in a:
        v0 = np.asarray(a[name], np.float64)
        v1 = np.asarray(b[name], np.float64)
        b0 = 0.0 if base is None else np.asarray(base[name], np.float64)
        v0, v1 = v0 + b0, v1 + b0
        n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
        u0 = v0 / n0 if n0 > eps else v0
        u1 = v1 / n1 if n1 > eps else v1
        dot = float(np.sum(u0 * u1))
        if abs(dot) > dot_threshold:
            res = (1 - t) * v0 + t * v1
        else:
            om = math.acos(dot)
            res = (math.sin((1 - t) * om) * v0 + math.sin(t * om) * v1) / math.sin(om)
        out[name] = res - b0
    return out
