"""Accuracy-size sweeps: evaluate cuts of one plan per method at many sizes.

``sweep(plans_or_inputs, eval_fn, sizes=...)`` returns a :class:`SweepResult`
with per-task and average accuracy and *normalized* accuracy (accuracy /
fine-tuned accuracy, as in the paper) for every method and size; it writes
JSON, CSV and a PNG plot (normalized accuracy vs deployed size, one line per
method, the 1x and nx ends marked).
"""

from __future__ import annotations

import csv
import dataclasses
import io as _io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import methods as methods_lib
from ._plan import plan as make_plan
from .progress import Progress

__all__ = ["sweep", "SweepResult", "SweepPoint", "default_sizes", "Progress"]

EvalFn = Callable[[Any, int], float]


def default_sizes(n: int) -> list[float]:
    """1, 1.1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, ..., n (dense near 1x)."""
    sizes = [1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0] + [float(k) for k in range(4, n + 1)]
    return sorted({s for s in sizes if s <= n} | {float(n)})


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One evaluated model: a method at one size."""

    method: str
    requested_size: float
    n_models: float
    step: int
    accuracy: tuple[float, ...]
    normalized: tuple[float, ...]

    @property
    def avg_accuracy(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def avg_normalized(self) -> float:
        return float(np.mean(self.normalized))


@dataclasses.dataclass
class SweepResult:
    """Sweep results: ``points`` (all methods and sizes) and the references.

    Attributes:
      task_names: the n tasks.
      ft_accuracy: per-task accuracy of the fine-tuned models (size n).
      points: one :class:`SweepPoint` per (method, requested size).
      methods: ``{label: method hyperparameters}``.
    """

    task_names: tuple[str, ...]
    ft_accuracy: tuple[float, ...]
    points: list[SweepPoint]
    methods: dict[str, dict]

    def curve(self, method: str) -> list[SweepPoint]:
        """Points of one method, sorted by size."""
        return sorted((p for p in self.points if p.method == method), key=lambda p: p.n_models)

    def at(self, method: str, size: float) -> SweepPoint:
        """The point of ``method`` evaluated for the requested ``size``."""
        for p in self.points:
            if p.method == method and p.requested_size == size:
                return p
        raise KeyError(f"no point for {method!r} at size {size}")

    def gap_recovered(self, method: str, size: float = 2.0) -> float:
        """Fraction of the 1x -> nx normalized-accuracy gap recovered at ``size``.

        NaN when the method has no 1x model (mask methods stop at 2 + n/32).
        """
        try:
            lo = self.at(method, 1.0).avg_normalized
            at = self.at(method, size).avg_normalized
        except KeyError:
            return float("nan")
        return (at - lo) / (1.0 - lo) if lo < 1.0 else float("nan")

    # -- output ---------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "task_names": list(self.task_names),
            "ft_accuracy": list(self.ft_accuracy),
            "methods": self.methods,
            "points": [
                {
                    "method": p.method,
                    "requested_size": p.requested_size,
                    "n_models": p.n_models,
                    "step": p.step,
                    "accuracy": list(p.accuracy),
                    "normalized": list(p.normalized),
                    "avg_accuracy": p.avg_accuracy,
                    "avg_normalized": p.avg_normalized,
                }
                for p in self.points
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> SweepResult:
        pts = [
            SweepPoint(p["method"], p["requested_size"], p["n_models"], p["step"],
                       tuple(p["accuracy"]), tuple(p["normalized"]))
            for p in d["points"]
        ]
        return cls(tuple(d["task_names"]), tuple(d["ft_accuracy"]), pts, d["methods"])

    def to_csv(self) -> str:
        buf = _io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "requested_size", "n_models", "step", "avg_accuracy",
                    "avg_normalized"]
                   + [f"acc/{t}" for t in self.task_names] + [f"norm/{t}" for t in self.task_names])
        for p in self.points:
            w.writerow([p.method, p.requested_size, f"{p.n_models:.6f}", p.step,
                        f"{p.avg_accuracy:.6f}", f"{p.avg_normalized:.6f}"]
                       + [f"{a:.6f}" for a in p.accuracy] + [f"{a:.6f}" for a in p.normalized])
        return buf.getvalue()

    def table(self) -> str:
        """Average normalized accuracy (%) per method and requested size.

        Each cell is ``accuracy (deployed size)``: the model is the first step
        of the plan at or below the requested size; ``-`` where the method
        cannot be that small (mask methods: 2 + n/32 models).
        """
        methods = list(self.methods)
        sizes = sorted({p.requested_size for p in self.points} | {
            s for s in self._requested})
        w = max(14, *(len(m) + 1 for m in methods))
        head = f"{'size':>7} " + "".join(f"{m:>{w}}" for m in methods)
        lines = [head, "-" * len(head)]
        for s in sizes:
            cells = []
            for m in methods:
                try:
                    p = self.at(m, s)
                    cells.append(f"{100 * p.avg_normalized:.1f} ({p.n_models:.2f}x)".rjust(w))
                except KeyError:
                    cells.append("-".rjust(w))
            lines.append(f"{s:>6.2f}x " + "".join(cells))
        lines.append(
            "normalized accuracy (%) = accuracy / fine-tuned accuracy, averaged over "
            f"{len(self.task_names)} tasks (deployed size in parentheses)"
        )
        return "\n".join(lines)

    def rankings(self) -> list[tuple[float, list[str]]]:
        """Per requested size, the methods available there, best first."""
        out = []
        for s in sorted(self._requested):
            here = []
            for m in self.methods:
                try:
                    here.append((self.at(m, s).avg_normalized, m))
                except KeyError:
                    pass
            out.append((s, [m for _, m in sorted(here, key=lambda t: -t[0])]))
        return out

    def ranking_table(self, max_swaps: int = 3) -> str:
        """Method ranking at each size; ``<-`` marks sizes where two methods
        present at both sizes swap places (strictly better before, strictly
        worse now): the paper's finding that rankings are not consistent as
        size increases."""
        lines = ["   size  ranking (best first, normalized accuracy %)"]
        history: list[dict[str, float]] = []
        for s, order in self.rankings():
            acc = {m: self.at(m, s).avg_normalized for m in order}
            cells = " > ".join(f"{m} {100 * acc[m]:.1f}" for m in order)
            swaps = []
            for i, a in enumerate(order):
                for b in order[i + 1:]:
                    # the last smaller size where both were evaluated
                    past = next((h for h in reversed(history) if a in h and b in h), None)
                    if past is not None and acc[a] > acc[b] and past[b] > past[a]:
                        swaps.append(f"{a} passes {b}")
            shown = ", ".join(swaps[:max_swaps])
            more = f" (+{len(swaps) - max_swaps} more)" if len(swaps) > max_swaps else ""
            mark = f"  <- {shown}{more}" if swaps else ""
            lines.append(f"{s:>6.2f}x  {cells}{mark}")
            history.append(acc)
        return "\n".join(lines)

    @property
    def _requested(self) -> set[float]:
        return {p.requested_size for p in self.points}

    def write(self, out_dir, *, plot: bool = True) -> dict[str, Path]:
        """Writes ``sweep.json``, ``sweep.csv`` and (``plot``) ``sweep.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "sweep.json", "csv": out / "sweep.csv"}
        paths["json"].write_text(json.dumps(self.to_json(), indent=1) + "\n")
        paths["csv"].write_text(self.to_csv())
        if plot:
            paths["png"] = self.plot(out / "sweep.png")
        return paths

    def plot(self, path, *, title: str | None = None) -> Path:
        """PNG of average normalized accuracy vs deployed size, one line per method."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        n = len(self.task_names)
        many = len(self.methods) > 6
        fig, ax = plt.subplots(figsize=(9.5 if many else 7, 5 if many else 4.5), dpi=120)
        styles = ["-", "--", "-.", ":"]
        for i, m in enumerate(self.methods):
            pts = self.curve(m)
            xs = [p.n_models for p in pts]
            ys = [100 * p.avg_normalized for p in pts]
            ax.plot(xs, ys, marker="o", ms=3.5, lw=1.6, label=m, ls=styles[(i // 10) % 4])
        ax.axvline(1.0, color="0.6", ls=":", lw=1)
        ax.axvline(float(n), color="0.6", ls=":", lw=1)
        ax.axhline(100.0, color="0.3", ls="--", lw=1)
        ax.text(1.0, ax.get_ylim()[0], " 1x: one merged model", va="bottom", fontsize=8,
                color="0.4")
        ax.text(float(n), ax.get_ylim()[0], f"{n}x: all fine-tuned ", va="bottom", ha="right",
                fontsize=8, color="0.4")
        ax.set_xscale("log", base=2)
        ticks = [t for t in (1, 1.25, 1.5, 2, 3, 4, 6, 8, 16, 32) if t <= n]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}x" for t in ticks])
        ax.set_xlabel("deployed size (models)")
        ax.set_ylabel("normalized accuracy (%)")
        ax.set_title(title or f"FlexMerge accuracy-size trade-off ({n} tasks)")
        ax.grid(alpha=0.3)
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        else:
            ax.legend(loc="lower right", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path


def _label(p) -> str:
    name = p.method.label
    baseline = getattr(p, "config", {}).get("baseline")
    return f"{baseline}:{name}" if baseline else name


def _planlike(p) -> bool:
    """A Plan, or a baseline with the same cut interface."""
    return all(hasattr(p, a) for a in ("at_step", "sizes", "step_for_size", "task_names"))


def sweep(
    plans_or_inputs,
    eval_fn: EvalFn,
    sizes: Sequence[float] | None = None,
    *,
    methods: Sequence[methods_lib.Method | str] | None = None,
    ft_accuracy: Sequence[float] | None = None,
    progress: bool | None = None,
    **plan_kwargs,
) -> SweepResult:
    """Evaluates FlexMerge models at several sizes, for several methods.

    Args:
      plans_or_inputs: a :class:`Plan` (or a baseline from
        :mod:`flexmerge_jax.baselines`), a list of them, a ``{label: plan}``
        dict, or ``(base, finetuned)`` — then one plan per ``methods`` entry
        is made with ``plan_kwargs`` (``blocks``, ``linkage``, ...).
      eval_fn: ``eval_fn(params, task_index) -> accuracy`` for one task's
        full params pytree.
      sizes: requested sizes (models); each is cut from its plan at the first
        step with ``n_models <= size``. Sizes below a plan's smallest model
        (mask methods: 2 + n/32) are skipped for that plan, but its smallest
        model is always evaluated. Default :func:`default_sizes`.
      methods: methods for ``(base, finetuned)`` inputs (default avg, ta,
        ties, emr).
      ft_accuracy: per-task accuracy of the fine-tuned models; evaluated
        (step 0) when omitted.
      progress: report the models evaluated on stderr (see
        :mod:`flexmerge_jax.progress`; default: a bar when stderr is a terminal).

    Returns:
      A :class:`SweepResult`.
    """
    if _planlike(plans_or_inputs):
        plans = {_label(plans_or_inputs): plans_or_inputs}
    elif isinstance(plans_or_inputs, Mapping):
        plans = dict(plans_or_inputs)
    elif isinstance(plans_or_inputs, (list, tuple)) and plans_or_inputs and all(
        _planlike(p) for p in plans_or_inputs
    ):
        plans = {}
        for p in plans_or_inputs:
            label = _label(p)
            if label in plans:
                label = f"{label}[{p.method.describe()}]"
            plans[label] = p
    elif isinstance(plans_or_inputs, tuple) and len(plans_or_inputs) == 2:
        base, finetuned = plans_or_inputs
        ms = [methods_lib.get(m) for m in (methods or ("avg", "ta", "ties", "emr"))]
        plans = {}
        for m in ms:
            p = make_plan(base, finetuned, method=m, **plan_kwargs)
            plans[_label(p) if _label(p) not in plans else m.describe()] = p
    else:
        raise ValueError("sweep() takes a Plan, a list/dict of Plans, or (base, finetuned)")
    if not plans:
        raise ValueError("nothing to sweep")
    first = next(iter(plans.values()))
    n, names = first.n, first.task_names
    for label, p in plans.items():
        if p.task_names != names:
            raise ValueError(f"plan {label!r} has different tasks")
    sizes = default_sizes(n) if sizes is None else [float(s) for s in sizes]
    for s in sizes:
        if not (1.0 <= s <= n):
            raise ValueError(f"size {s} outside [1, {n}]")
    jobs = []
    for label, p in plans.items():
        steps = {}
        for s in sizes:
            if s >= p.min_size - 1e-12:
                steps[s] = p.step_for_size(s)
        if not any(k == p.num_steps for k in steps.values()):
            steps[round(p.min_size, 6)] = p.num_steps  # always show the smallest model
        jobs.append((label, p, steps))
    distinct = sum(len(set(st.values())) for _, _, st in jobs)
    bar = Progress((distinct + (ft_accuracy is None)) * n, "sweep", progress,
                   unit="evaluations")
    if ft_accuracy is None:
        model0 = first.at_step(0)
        ft = []
        for i in range(n):
            ft.append(float(eval_fn(model0.params_for_task(i), i)))
            bar.update(1, "fine-tuned")
    else:
        ft = [float(a) for a in ft_accuracy]
        if len(ft) != n:
            raise ValueError(f"ft_accuracy has {len(ft)} entries for {n} tasks")
    points = []
    for label, p, steps in jobs:
        cache: dict[int, tuple] = {}
        for s, k in sorted(steps.items()):
            if k not in cache:
                if k == 0:
                    acc = tuple(ft) if ft_accuracy is None else None
                else:
                    acc = None
                if acc is None:
                    model = p.at_step(k)
                    acc = []
                    for i in range(n):
                        acc.append(float(eval_fn(model.params_for_task(i), i)))
                        bar.update(1, f"{label} {p.sizes[k]:.2f}x")
                    acc = tuple(acc)
                else:
                    bar.update(n)
                cache[k] = acc
            acc = cache[k]
            norm = tuple(a / f if f > 0 else math.nan for a, f in zip(acc, ft))
            points.append(SweepPoint(label, s, float(p.sizes[k]), int(k), acc, norm))
    bar.close()
    return SweepResult(
        tuple(names), tuple(ft), points,
        {label: {**p.method.hyperparameters(),
                 **{k: v for k, v in p.config.items() if v is not None}}
         for label, p in plans.items()},
    )
