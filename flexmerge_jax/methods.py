r"""Data-free merge methods of FlexMerge, as hashable :class:`Method` values.

Factories (hyperparameters keep the reference's names and conventions)::

    average()                               # avg
    task_arithmetic(scale=1.0)              # ta: scale * MEAN (lambda)
    ties(scale=1.0, keep=1.0)               # TIES, global per-task trim
    pcb(scale=1.0, keep=0.2)                # PCB-Merging (reference thresholds)
    consensus_ta(scale=1.0, consensus=0.3)  # TALL masks on task arithmetic
    consensus_ties(scale=1.0, consensus=0.3)# TALL masks on TIES (no trim)
    emr()                                   # EMR-Merging
    dare(method, drop=0.9, seed=43)         # DARE preprocessing + any method

Paper symbol -> argument: :math:`\lambda` -> ``scale``; TIES top-k fraction
:math:`K` -> ``keep``; consensus :math:`\lambda_c` -> ``consensus``; DARE
:math:`p` -> ``drop``.

Where the reference differs from the original method papers (we follow the
reference; each is tested against its outputs):

* ``task_arithmetic``: ``scale`` multiplies the **mean** of the group, not
  the sum (sum-convention coefficient :math:`\alpha = \lambda/m`); singletons
  are never scaled.
* ``ties``: trimming is done once per task over the **whole model** (not per
  block or per tensor); the merge itself is elect + disjoint mean.
* ``pcb``: ``keep`` is used by the reference's thresholds as a **drop**
  fraction (index ``int(d*keep)`` of the sorted scores), and the global
  whole-model thresholds are applied to group-local scores.
* ``consensus_ties`` never trims (the reference only trims for ``ties``).
* mask methods (``consensus_*``, ``emr``) do not merge two singletons: a
  2-task group keeps both individual models (size floor ``2 + n/32``).
* ``emr``: rescalers are ratios of sums of per-tensor means over a block.
* ``dare`` + ``ties(keep<1)``: the reference silently discards DARE; we
  raise instead (use ``keep=1.0``: DARE then replaces the magnitude trim).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import kernels

__all__ = [
    "Method",
    "GroupMerge",
    "average",
    "task_arithmetic",
    "ties",
    "pcb",
    "consensus_ta",
    "consensus_ties",
    "emr",
    "dare",
    "get",
    "NAMES",
]

NAMES = ("avg", "ta", "ties", "pcb", "consensus_ta", "consensus_ties", "emr")
_ALIASES = {
    "average": "avg",
    "task_arithmetic": "ta",
    "consensus": "consensus_ta",
}


class GroupMerge(NamedTuple):
    """Result of merging one group of one block.

    Attributes:
      vector: ``{name: f32[...]}`` the merged task vector (including
        :math:`\\lambda`); the group vector used for similarities.
      masks: ``{name: bool[n, ...]}`` per-task masks (mask methods), else
        ``None``; rows of non-members are all False.
      rescalers: ``f32[n]`` (EMR; 1 for consensus), else ``None``.
    """

    vector: dict
    masks: dict | None
    rescalers: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Method:
    """A FlexMerge merge method with its hyperparameters (hashable, JSON-able).

    Build it with the factories of this module rather than directly.

    Attributes:
      name: one of ``avg, ta, ties, pcb, consensus_ta, consensus_ties, emr``.
      scale: :math:`\\lambda` (``ta``, ``ties``, ``pcb``, ``consensus_*``).
      keep: TIES keep fraction / PCB threshold fraction.
      consensus: :math:`\\lambda_c` of the TALL masks.
      drop: DARE drop probability, or ``None`` (no DARE).
      seed: DARE seed (``jax.random.key(seed)``).
    """

    name: str
    scale: float = 1.0
    keep: float = 1.0
    consensus: float = 0.3
    drop: float | None = None
    seed: int = 43

    # -- properties used by the planner ------------------------------------
    @property
    def uses_masks(self) -> bool:
        """Mask methods store boolean masks; 2-task groups are not merged."""
        return self.name in ("consensus_ta", "consensus_ties", "emr")

    @property
    def min_merged(self) -> int:
        """Smallest group that is actually merged (3 for mask methods)."""
        return 3 if self.uses_masks else 2

    @property
    def linear(self) -> bool:
        """Group vectors are linear in the task vectors (Gram-only paths)."""
        return self.name in ("avg", "ta", "consensus_ta")

    @property
    def group_scale(self) -> float:
        """Factor of a merged group's vector over the plain mean (linear)."""
        return 1.0 if self.name == "avg" else float(self.scale)

    @property
    def trims(self) -> bool:
        """TIES global trimming is on."""
        return self.name == "ties" and self.keep < 1.0

    def describe(self) -> str:
        hp = {k: v for k, v in self.hyperparameters().items() if k != "name"}
        inner = ", ".join(f"{k}={v}" for k, v in hp.items())
        return f"{self.name}({inner})"

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters that matter for this method (JSON-able)."""
        d: dict[str, Any] = {"name": self.name}
        if self.name in ("ta", "ties", "pcb", "consensus_ta", "consensus_ties"):
            d["scale"] = self.scale
        if self.name in ("ties", "pcb"):
            d["keep"] = self.keep
        if self.name in ("consensus_ta", "consensus_ties"):
            d["consensus"] = self.consensus
        if self.drop is not None:
            d["drop"] = self.drop
            d["seed"] = self.seed
        return d

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Method":
        m = cls(**d)
        _validate(m)
        return m

    # -- kernels ------------------------------------------------------------
    def merge_group(self, x: dict, members=None, extra=None) -> GroupMerge:
        """Merges one group of one block (pure, jit-able, vmap-able).

        Args:
          x: ``{name: f32[n, ...]}`` preprocessed task vectors of the block.
          members: ``bool[n]`` the group (``None``: all tasks).
          extra: per-block method state (PCB bounds and thresholds, see
            :func:`flexmerge_jax.prep.pcb_clip_bounds`); ``None`` otherwise.

        Returns:
          :class:`GroupMerge`.
        """
        name = self.name
        if name == "avg":
            return GroupMerge(kernels.average(x, members), None, None)
        if name == "ta":
            return GroupMerge(kernels.task_arithmetic(x, members, scale=self.scale), None, None)
        if name == "ties":
            return GroupMerge(kernels.ties_merge(x, members, scale=self.scale), None, None)
        if name == "pcb":
            if extra is None:
                raise ValueError("pcb needs its thresholds (extra=...)")
            return GroupMerge(
                kernels.pcb_merge(x, members, scale=self.scale, **extra), None, None
            )
        if name in ("consensus_ta", "consensus_ties"):
            if name == "consensus_ta":
                v = kernels.task_arithmetic(x, members, scale=self.scale)
            else:
                v = kernels.ties_merge(x, members, scale=self.scale)
            masks = kernels.consensus_masks(x, v, members, consensus=self.consensus)
            n = next(iter(x.values())).shape[0]
            return GroupMerge(v, masks, jnp.ones((n,), jnp.float32))
        if name == "emr":
            r = kernels.emr(x, members)
            return GroupMerge(r.unified, r.masks, r.rescalers)
        raise ValueError(f"unknown method {name!r}")  # pragma: no cover

    def group_vector(self, x: dict, members, extra) -> dict:
        """The merged group vector only (what similarities compare)."""
        return self.merge_group(x, members, extra).vector

    # -- jit plumbing ---------------------------------------------------------
    def split(self) -> tuple["Method", dict]:
        """``(static part, traced hyperparameters)`` for jitted callers.

        The static part only carries the method's kind, so one compilation
        serves every ``scale`` / ``consensus``; :meth:`join` rebuilds the
        method from both inside the traced function.
        """
        hp = {
            "scale": jnp.asarray(self.scale, jnp.float32),
            "consensus": jnp.asarray(self.consensus, jnp.float32),
        }
        return Method(name=self.name), hp

    def join(self, hp: dict) -> "Method":
        """Inverse of :meth:`split` (``self`` is the static part)."""
        return dataclasses.replace(self, scale=hp["scale"], consensus=hp["consensus"])


def _finite(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def _validate(m: Method) -> None:
    if m.name not in NAMES:
        raise ValueError(f"unknown method {m.name!r}; choose one of {list(NAMES)}")
    _finite("scale", m.scale)
    keep = _finite("keep", m.keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {m.keep}")
    if m.name == "pcb" and keep >= 1.0:
        raise ValueError(
            "pcb needs keep < 1 (its thresholds use keep as a fraction of "
            "sorted scores; the reference asserts on keep = 1)"
        )
    c = _finite("consensus", m.consensus)
    if c < 0:
        raise ValueError(f"consensus must be >= 0, got {m.consensus}")
    if m.drop is not None:
        p = _finite("drop", m.drop)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {m.drop}")
        if m.trims:
            raise ValueError(
                "dare(ties(keep<1)): the reference computes the TIES trim from the "
                "original task vectors and silently discards DARE; use "
                "ties(keep=1.0) so that DARE replaces the magnitude trim"
            )
        if int(m.seed) != m.seed:
            raise ValueError(f"seed must be an integer, got {m.seed!r}")


def _make(**kw) -> Method:
    m = Method(**kw)
    _validate(m)
    return m


def average() -> Method:
    """Plain average of the group's task vectors (reference ``avg``)."""
    return _make(name="avg")


def task_arithmetic(scale: float = 1.0) -> Method:
    r"""Task arithmetic, reference convention: :math:`\lambda\cdot\mathrm{mean}`.

    Args:
      scale: :math:`\lambda`, multiplying the **mean** of a merged group
        (singletons are not scaled). FusionBench/mergekit's
        ``scaling_factor`` :math:`\alpha` on the sum is ``scale / m``.

    References:
      Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023.
    """
    return _make(name="ta", scale=scale)


def ties(scale: float = 1.0, keep: float = 1.0) -> Method:
    r"""TIES-Merging with the reference's global trim.

    Args:
      scale: :math:`\lambda` on the disjoint mean.
      keep: fraction of each task's entries kept, trimmed once per task over
        the whole model (``int(d*keep)+1`` kept, ties kept); ``1.0`` disables
        trimming (the reference's vision default).

    References:
      Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708).
    """
    return _make(name="ties", scale=scale, keep=keep)


def pcb(scale: float = 1.0, keep: float = 0.2) -> Method:
    r"""PCB-Merging with the reference's global per-task thresholds.

    Args:
      scale: :math:`\lambda`.
      keep: in (0, 1); the reference uses it as the fraction of sorted
        whole-model scores below the lower clamp threshold (a *drop*
        fraction, inconsistent with PCB's own trim — reproduced as is).

    References:
      Du et al., Parameter Competition Balancing for Model Merging,
      NeurIPS 2024.
    """
    return _make(name="pcb", scale=scale, keep=keep)


def consensus_ta(scale: float = 1.0, consensus: float = 0.3) -> Method:
    r"""TALL masks on task arithmetic (reference ``consensus_ta``).

    Merged groups of at least 3 tasks store :math:`v=\lambda\,\mathrm{mean}`
    and per-task boolean masks :math:`M_k=|x_k|>\lambda_c|v-x_k|`; task k is
    deployed as :math:`\theta_0+M_k\odot v`.

    References:
      Wang et al., Localizing Task Information for Improved Model Merging
      and Compression, ICML 2024.
    """
    return _make(name="consensus_ta", scale=scale, consensus=consensus)


def consensus_ties(scale: float = 1.0, consensus: float = 0.3) -> Method:
    """TALL masks on TIES (elect + disjoint mean; never trims, as the reference)."""
    return _make(name="consensus_ties", scale=scale, consensus=consensus)


def emr() -> Method:
    """EMR-Merging: unified vector, per-task masks and rescalers (no lambda).

    References:
      Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging,
      NeurIPS 2024 (arXiv:2405.17461).
    """
    return _make(name="emr")


def dare(method: Method, drop: float = 0.9, seed: int = 43) -> Method:
    r"""DARE preprocessing before ``method``.

    Each task-vector entry is kept iff :math:`U(0,1) > p` and rescaled by
    :math:`1/(1-p)`, with an explicit ``jax.random.key(seed)`` (per task and
    parameter keys, so the result is independent of how parameters are
    read). The reference uses a torch generator: results match it in
    distribution only.

    References:
      Yu et al., Language Models are Super Mario (DARE), ICML 2024.
    """
    if not isinstance(method, Method):
        raise ValueError(f"dare() wraps a Method, got {type(method).__name__}")
    if method.drop is not None:
        raise ValueError("dare() applied twice")
    return _make(**{**dataclasses.asdict(method), "drop": drop, "seed": seed})


_FACTORIES = {
    "avg": average,
    "ta": task_arithmetic,
    "ties": ties,
    "pcb": pcb,
    "consensus_ta": consensus_ta,
    "consensus_ties": consensus_ties,
    "emr": emr,
}


def get(method: "Method | str", **hyperparameters) -> Method:
    """A :class:`Method` from a method or a name (``"ta"``, ``"ties"``, ...).

    Keyword hyperparameters that the method does not take raise ValueError.
    """
    if isinstance(method, Method):
        if hyperparameters:
            raise ValueError("hyperparameters are given with a Method object")
        return method
    if not isinstance(method, str):
        raise ValueError(f"method must be a Method or a name, got {method!r}")
    key = _ALIASES.get(method, method)
    if key not in _FACTORIES:
        raise ValueError(f"unknown method {method!r}; choose one of {list(NAMES)}")
    drop = hyperparameters.pop("drop", None)
    seed = hyperparameters.pop("seed", 43)
    import inspect

    allowed = set(inspect.signature(_FACTORIES[key]).parameters)
    bad = sorted(set(hyperparameters) - allowed)
    if bad:
        raise ValueError(
            f"method {key!r} takes no hyperparameter {bad[0]!r} "
            f"(it takes {sorted(allowed) or 'none'})"
        )
    m = _FACTORIES[key](**hyperparameters)
    return dare(m, drop, seed) if drop is not None else m
