"""Helpers to load the FlexMerge oracle fixtures (reference-implementation outputs).

Layout (see ``shared/oracle/README.md``):

* ``<case>.npz`` + ``<case>.json``: the synthetic case (``base/<param>``, ``ft/<i>/<param>``; JSON
  with ``n``, ``params`` in canonical order and the ordered ``blocks`` list).
* ``<case>__<config>.json``: a reference run (``trajectory``, ``checkpoints``, ``official_args``,
  optional ``error`` when the reference crashed).
* ``<case>__<config>.npz``: deployed parameters ``k<k>/task<i>/<param>`` at the checkpoints.

Files are looked up first in ``tests/fixtures/oracle`` (copied into the repo: all JSON files, both
case ``.npz`` files and the caseA checkpoint ``.npz`` files), then in the shared oracle directory
beside the checkout (``<repo>/../shared/oracle``), which also holds the caseB checkpoint ``.npz``.

Typical use::

    from oracle_utils import load_case, load_run, list_runs   # tests/ is on sys.path under pytest
    case = load_case("caseA")
    run = load_run("caseA", "ta_single")
    kwargs = run.reference_kwargs()          # method/scale/keep/consensus/linkage/distance/dare
    params = run.checkpoint_params(run.checkpoint_ks[0])   # None if the npz is not available
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FIXTURE_DIR",
    "SHARED_ORACLE_DIR",
    "CASES",
    "OracleCase",
    "OracleRun",
    "find_oracle_file",
    "list_runs",
    "load_case",
    "load_run",
    "reference_kwargs",
    "trajectory_key",
]

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "oracle"
"""Copied fixtures inside the repository."""

SHARED_ORACLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "oracle"
"""Full oracle directory beside the checkout (present on CI and dev machines, maybe not
elsewhere)."""

CASES = ("caseA", "caseB")

Params = dict[str, np.ndarray]


def find_oracle_file(filename: str) -> Path | None:
    """Path of an oracle file: the in-repo fixture copy if present, else the shared directory,
    else None."""
    for d in (FIXTURE_DIR, SHARED_ORACLE_DIR):
        p = d / filename
        if p.is_file():
            return p
    return None


def _require(filename: str) -> Path:
    p = find_oracle_file(filename)
    if p is None:
        raise FileNotFoundError(
            f"oracle file {filename} not found in {FIXTURE_DIR} or {SHARED_ORACLE_DIR}")
    return p


@dataclass(frozen=True)
class OracleCase:
    """A synthetic oracle case.

    Attributes:
      name: ``"caseA"`` / ``"caseB"``.
      n: number of tasks.
      params: ``[(name, shape), ...]`` in canonical (state-dict) order.
      blocks: ordered block names (cross-block tie-break order).
      block_params: ``{block: [param, ...]}`` as listed in the case JSON (the assignment the
        first-substring rule produces).
      base: θ0 as ``{param: float32 array}`` in canonical order.
      finetuned: ``[θ_i]`` likewise.
      meta: the raw case JSON.
    """

    name: str
    n: int
    params: list[tuple[str, tuple[int, ...]]]
    blocks: list[str]
    block_params: dict[str, list[str]]
    base: Params = field(repr=False)
    finetuned: list[Params] = field(repr=False)
    meta: dict[str, Any] = field(repr=False)

    @property
    def param_names(self) -> list[str]:
        return [p for p, _ in self.params]

    @property
    def params_per_model(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for _, s in self.params))


@cache
def load_case(name: str) -> OracleCase:
    """Load ``<name>.json`` + ``<name>.npz`` (cached; treat the arrays as read-only)."""
    meta = json.loads(_require(f"{name}.json").read_text())
    n = int(meta["n"])
    params = [(p, tuple(int(s) for s in shape)) for p, shape in meta["params"]]
    with np.load(_require(f"{name}.npz")) as z:
        base = {p: np.array(z[f"base/{p}"]) for p, _ in params}
        finetuned = [{p: np.array(z[f"ft/{i}/{p}"]) for p, _ in params} for i in range(n)]
    for arrs in [base, *finetuned]:
        for a in arrs.values():
            a.setflags(write=False)
    blocks = [b for b, _ in meta["blocks"]]
    block_params = {b: list(ps) for b, ps in meta["blocks"]}
    return OracleCase(name, n, params, blocks, block_params, base, finetuned, meta)


def reference_kwargs(official_args: dict[str, Any]) -> dict[str, Any]:
    """Map the reference CLI arguments (``official_args``) to keyword arguments of
    ``tests.reference.greedy_reference`` (and, by the same names, of the library)."""
    return {
        "method": official_args["MERGE_METHOD"],
        "scale": float(official_args["LAMBDA"]),
        "keep": float(official_args["K"]),
        "consensus": float(official_args["CONSENSUS_LAMBDA"]),
        "linkage": official_args["LINKAGE"] if official_args["USE_CONSTITUENTS_DISTANCE"] else None,
        "distance": official_args["DISTANCE"],
        "dare": float(official_args["DARE_P"]) if official_args["DARE"] else None,
    }


def trajectory_key(row: dict[str, Any]) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """``(block, members_i, members_j)`` of a trajectory/event row (members as sorted tuples)."""
    return row["block"], tuple(sorted(row["members_i"])), tuple(sorted(row["members_j"]))


@dataclass(frozen=True)
class OracleRun:
    """One reference run ``<case>__<config>``.

    Attributes:
      case, config: identifiers.
      meta: the raw JSON (``official_args``, ``T``, ``params_per_model``, ...).
      trajectory: list of rows ``{"t", "block", "root_i", "root_j", "members_i", "members_j",
        "similarity", "store_params", "n_models"}``.  When the reference crashed the last row is
        the partial row of the failing iteration (no ``store_params``/``n_models``).
      checkpoints: ``[{"k", "n_models", "final", "targets", "partition"}, ...]``.
      error: the reference's exception text, or None.
    """

    case: str
    config: str
    meta: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.case}__{self.config}"

    @property
    def trajectory(self) -> list[dict[str, Any]]:
        return self.meta["trajectory"]

    @property
    def complete_rows(self) -> list[dict[str, Any]]:
        """Trajectory rows of merges the reference completed (have ``n_models``)."""
        return [r for r in self.trajectory if "n_models" in r]

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        return self.meta["checkpoints"]

    @property
    def checkpoint_ks(self) -> list[int]:
        return [int(c["k"]) for c in self.checkpoints]

    @property
    def error(self) -> str | None:
        return self.meta.get("error")

    @property
    def official_args(self) -> dict[str, Any]:
        return self.meta["official_args"]

    def reference_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``greedy_reference`` (see :func:`reference_kwargs`)."""
        return reference_kwargs(self.official_args)

    @property
    def npz_path(self) -> Path | None:
        """Checkpoint ``.npz`` (fixture copy, else shared directory), or None if unavailable."""
        return find_oracle_file(f"{self.name}.npz")

    def checkpoint_params(self, k: int) -> list[Params] | None:
        """Deployed parameters ``[task0, task1, ...]`` after ``k`` merges (float32 arrays, canonical
        param order), or None if the checkpoint ``.npz`` is not available."""
        return _load_checkpoints(self.name).get(int(k)) if self.npz_path is not None else None


@cache
def _load_checkpoints(run_name: str) -> dict[int, list[Params]]:
    path = find_oracle_file(f"{run_name}.npz")
    if path is None:
        return {}
    out: dict[int, dict[int, Params]] = {}
    with np.load(path) as z:
        for key in z.files:
            kpart, tpart, param = key.split("/", 2)
            k = int(kpart[1:])
            i = int(tpart[len("task") :])
            arr = np.array(z[key])
            arr.setflags(write=False)
            out.setdefault(k, {}).setdefault(i, {})[param] = arr
    return {k: [tasks[i] for i in sorted(tasks)] for k, tasks in out.items()}


@cache
def load_run(case: str, config: str) -> OracleRun:
    """Load the JSON of run ``<case>__<config>`` (cached)."""
    meta = json.loads(_require(f"{case}__{config}.json").read_text())
    return OracleRun(case, config, meta)


def list_runs(case: str | None = None) -> list[tuple[str, str]]:
    """All ``(case, config)`` pairs with a run JSON (fixture copy or shared dir), sorted."""
    found: set[tuple[str, str]] = set()
    for d in (FIXTURE_DIR, SHARED_ORACLE_DIR):
        if not d.is_dir():
            continue
        for p in d.glob("*__*.json"):
            c, cfg = p.stem.split("__", 1)
            if case is None or c == case:
                found.add((c, cfg))
    return sorted(found)
