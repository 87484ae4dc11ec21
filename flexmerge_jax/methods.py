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

Beyond the reference (kernels in :mod:`flexmerge_jax.kernels_extra`, same
contract, usable in ``merge`` and ``plan``)::

    task_arithmetic(scale, convention="sum")  # FusionBench/mergekit alpha * SUM
    ties(scale, keep, merge_func="sum"|"max") # TIES disjoint sum / max
    tsv(scale=1.0, k=None)                     # TSV-M (Gargiulo et al., CVPR 2025)
    iso_c(scale=1.0)                           # Iso-C (Marczak et al., ICML 2025)
    iso_cts(scale=1.0, common_fraction=0.8)    # Iso-CTS
    breadcrumbs(scale=1.0, top=0.01, bottom=0.85)  # Model Breadcrumbs
    della(scale=1.0, density=0.5, epsilon=0.15, seed=0)  # DELLA
    magmax(scale=1.0)                          # MagMax
    model_stock()                              # Model Stock
    slerp(t=0.5)                               # SLERP: two tasks only

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
import functools
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
    "tsv",
    "iso_c",
    "iso_cts",
    "breadcrumbs",
    "della",
    "magmax",
    "model_stock",
    "slerp",
    "get",
    "NAMES",
]

REFERENCE_NAMES = ("avg", "ta", "ties", "pcb", "consensus_ta", "consensus_ties", "emr")
EXTRA_NAMES = ("tsv", "iso_c", "iso_cts", "breadcrumbs", "della", "magmax", "model_stock", "slerp")
NAMES = REFERENCE_NAMES + EXTRA_NAMES
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
      options: method-specific settings as sorted ``(name, value)`` pairs
        (e.g. ``("convention", "sum")``, ``("k", 4)``); static under jit.
    """

    name: str
    scale: float = 1.0
    keep: float = 1.0
    consensus: float = 0.3
    drop: float | None = None
    seed: int = 43
    options: tuple = ()

    def option(self, key: str, default=None):
        """A method-specific option (see :attr:`options`)."""
        return dict(self.options).get(key, default)

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
    def shares_state(self) -> bool:
        """Groups of a block share group-independent work (:meth:`shared_state`)."""
        return self.name in ("tsv", "breadcrumbs", "della")

    @property
    def linear(self) -> bool:
        """Group vectors are linear in the task vectors (Gram-only paths)."""
        return self.name in ("avg", "ta", "consensus_ta")

    @property
    def group_scale(self) -> float:
        """Factor of a merged group's vector over the plain mean (linear)."""
        return 1.0 if self.name == "avg" else float(self.scale)

    @property
    def sums(self) -> bool:
        """Linear group vector is ``scale * SUM`` (not ``scale * mean``)."""
        return self.name == "ta" and self.option("convention") == "sum"

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
        if self.name in ("tsv", "iso_c", "iso_cts", "breadcrumbs", "della", "magmax"):
            d["scale"] = self.scale
        if self.name == "della":
            d["seed"] = self.seed
        d.update(dict(self.options))
        if self.drop is not None:
            d["drop"] = self.drop
            d["seed"] = self.seed
        return d

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["options"] = [list(kv) for kv in self.options]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Method":
        d = dict(d)
        d["options"] = tuple(tuple(kv) for kv in d.get("options", ()))
        m = cls(**d)
        _validate(m)
        return m

    # -- kernels ------------------------------------------------------------
    def merge_group(self, x: dict, members=None, extra=None) -> GroupMerge:
        """Merges one group of one block (pure, jit-able, vmap-able).

        Args:
          x: ``{name: f32[n, ...]}`` preprocessed task vectors of the block.
          members: ``bool[n]`` the group (``None``: all tasks).
          extra: per-block method state: PCB bounds and thresholds (see
            :func:`flexmerge_jax.prep.pcb_clip_bounds`), DELLA's ``{"key": ...}``,
            optionally with :meth:`shared_state` (TSV, Breadcrumbs, DELLA: then
            not recomputed for this group); ``None`` otherwise.

        Returns:
          :class:`GroupMerge`.
        """
        name = self.name
        if name in EXTRA_NAMES or self.sums or self.option("merge_func") not in (None, "mean"):
            return GroupMerge(self._extra_kernel(x, members, extra), None, None)
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

    def _extra_kernel(self, x, members, extra) -> dict:
        from . import kernels_extra as kx

        o, s = dict(self.options), self.scale
        if self.name == "ta":  # convention="sum"
            return kx.task_arithmetic_sum(x, members, scale=s)
        if self.name == "ties":  # merge_func in {"sum", "max"}
            return kx.ties_disjoint_merge(x, members, scale=s, merge_func=o["merge_func"])
        shared = extra or {}
        if self.name == "tsv":
            return kx.tsv_merge(x, members, scale=s, k=o.get("k"), svd=shared.get("svd"))
        if self.name == "iso_c":
            return kx.iso_c(x, members, scale=s)
        if self.name == "iso_cts":
            return kx.iso_cts(x, members, scale=s, common_fraction=o["common_fraction"])
        if self.name == "breadcrumbs":
            return kx.breadcrumbs(x, members, top=o["top"], bottom=o["bottom"], scale=s,
                                  masks=shared.get("masks"))
        if self.name == "della":
            if "pruned" in shared:
                return kx.della_fuse(shared["pruned"], members, scale=s)
            if "key" not in shared:
                raise ValueError("della needs its per-block PRNG key (extra={'key': ...})")
            return kx.della(x, members, key=shared["key"], density=o["density"],
                            epsilon=o["epsilon"], scale=s)
        if self.name == "magmax":
            return kx.magmax(x, members, scale=s)
        if self.name == "model_stock":
            return kx.model_stock(x, members)
        if self.name == "slerp":
            return kx.slerp(x, members, t=o["t"])
        raise ValueError(f"method {self.name!r} takes no options {self.options}")

    def shared_state(self, x: dict, key=None) -> dict | None:
        """What every group of a block would otherwise recompute: the
        group-independent part of TSV (each task's SVDs, ``"svd"``),
        Breadcrumbs (each task's masks, ``"masks"``) and DELLA (each task's
        pruned vector, ``"pruned"``, drawn with ``key``, the block's PRNG
        key), computed once per block (jitted) and passed to
        :meth:`merge_group` in ``extra``; the merges are the same.

        Args:
          x: ``{name: f32[n, ...]}`` preprocessed task vectors of the block.
          key: the block's PRNG key (DELLA; ignored otherwise).

        Returns:
          ``{"svd" | "masks" | "pruned": ...}``, or ``None`` for the other
          methods.
        """
        if not self.shares_state:
            return None
        if self.name == "della" and key is None:
            raise ValueError("della needs its per-block PRNG key to prune the task vectors")
        return _shared_state(x, key, static=self.split()[0])

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
        return Method(name=self.name, options=self.options), hp

    def join(self, hp: dict) -> "Method":
        """Inverse of :meth:`split` (``self`` is the static part)."""
        return dataclasses.replace(self, scale=hp["scale"], consensus=hp["consensus"])


@functools.partial(jax.jit, static_argnames=("static",))
def _shared_state(x: dict, key, *, static: Method) -> dict:
    from . import kernels_extra as kx

    o = dict(static.options)
    if static.name == "tsv":
        return {"svd": kx.task_svd(x)}
    if static.name == "breadcrumbs":
        return {"masks": kx.breadcrumbs_masks(x, top=o["top"], bottom=o["bottom"])}
    return {"pruned": kx.magprune(x, key=key, density=o["density"], epsilon=o["epsilon"])}


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
    o = dict(m.options)
    allowed = {
        "ta": {"convention"}, "ties": {"merge_func"}, "tsv": {"k"}, "iso_cts": {"common_fraction"},
        "breadcrumbs": {"top", "bottom"}, "della": {"density", "epsilon"}, "slerp": {"t"},
    }.get(m.name, set())
    if set(o) - allowed:
        raise ValueError(f"method {m.name!r} takes no option {sorted(set(o) - allowed)[0]!r}")
    if o.get("convention", "mean") not in ("mean", "sum"):
        raise ValueError(f"convention must be 'mean' or 'sum', got {o['convention']!r}")
    if o.get("merge_func", "mean") not in ("mean", "sum", "max"):
        raise ValueError(f"merge_func must be 'mean', 'sum' or 'max', got {o['merge_func']!r}")
    if o.get("k") is not None and (int(o["k"]) != o["k"] or o["k"] < 1):
        raise ValueError(f"k must be a positive integer or None, got {o['k']!r}")
    for key in ("common_fraction", "top", "bottom", "density", "t"):
        if key in o and not 0.0 <= _finite(key, o[key]) <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {o[key]}")
    if "top" in o and o["top"] + o["bottom"] >= 1.0:
        raise ValueError(f"breadcrumbs: top + bottom must be < 1, got {o['top']} + {o['bottom']}")
    if "epsilon" in o:
        eps, dens = _finite("epsilon", o["epsilon"]), o["density"]
        if eps < 0 or dens - eps <= 0 or dens + eps > 1:
            raise ValueError(f"della: need 0 < density - epsilon and density + epsilon <= 1, "
                             f"got density={dens}, epsilon={eps}")
    if m.name in ("tsv", "iso_c", "iso_cts", "breadcrumbs", "della", "magmax", "model_stock",
                  "slerp") and m.uses_masks:  # pragma: no cover - guard for future edits
        raise AssertionError
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
    for k in ("scale", "keep", "consensus"):
        if k in kw and isinstance(kw[k], (int, float)) and not isinstance(kw[k], bool):
            kw[k] = float(kw[k])
    m = Method(**kw)
    _validate(m)
    return m


def average() -> Method:
    """Plain average of the group's task vectors (reference ``avg``)."""
    return _make(name="avg")


def task_arithmetic(scale: float = 1.0, convention: str = "mean") -> Method:
    r"""Task arithmetic.

    Args:
      scale: ``convention="mean"`` (the reference's, default):
        :math:`\lambda` multiplying the **mean** of a merged group
        (singletons are not scaled); FusionBench/mergekit's
        ``scaling_factor`` :math:`\alpha` on the sum is ``scale / m``.
        ``convention="sum"``: :math:`\alpha` multiplying the **sum**
        (FusionBench/mergekit semantics).
      convention: ``"mean"`` or ``"sum"``.

    References:
      Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023.
    """
    if convention == "mean":
        return _make(name="ta", scale=scale)
    return _make(name="ta", scale=scale, options=(("convention", convention),))


def ties(scale: float = 1.0, keep: float = 1.0, merge_func: str = "mean") -> Method:
    r"""TIES-Merging with the reference's global trim.

    Args:
      scale: :math:`\lambda` on the disjoint mean.
      keep: fraction of each task's entries kept, trimmed once per task over
        the whole model (``int(d*keep)+1`` kept, ties kept); ``1.0`` disables
        trimming (the reference's vision default).
      merge_func: ``"mean"`` (the reference: disjoint mean), ``"sum"`` or
        ``"max"`` (FusionBench/mergekit's ``merge_func``; with ``"sum"``,
        ``scale`` is their ``scaling_factor``).

    References:
      Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708).
    """
    if merge_func == "mean":
        return _make(name="ties", scale=scale, keep=keep)
    return _make(name="ties", scale=scale, keep=keep, options=(("merge_func", merge_func),))


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


def tsv(scale: float = 1.0, k: int | None = None) -> Method:
    r"""TSV-M (Task Singular Vectors): per 2-D parameter, each member keeps its
    top ``k`` singular triplets (default ``floor(rank / m)``); the concatenated
    factors are orthogonalised and summed; other parameters: mean.

    References:
      Gargiulo et al., Task Singular Vectors: Reducing Task Interference in
      Model Merging, CVPR 2025 (arXiv:2412.00081).
    """
    return _make(name="tsv", scale=scale, options=(("k", k),) if k is not None else ())


def iso_c(scale: float = 1.0) -> Method:
    r"""Iso-C: flatten the spectrum of the summed task matrix (non-matrix: mean).

    References:
      Marczak et al., No Task Left Behind: Isotropic Model Merging with
      Common and Task-Specific Subspaces, ICML 2025 (arXiv:2502.04959).
    """
    return _make(name="iso_c", scale=scale)


def iso_cts(scale: float = 1.0, common_fraction: float = 0.8) -> Method:
    """Iso-CTS: Iso-C on a common subspace plus task-specific subspaces."""
    return _make(name="iso_cts", scale=scale, options=(("common_fraction", common_fraction),))


def breadcrumbs(scale: float = 1.0, top: float = 0.01, bottom: float = 0.85) -> Method:
    r"""Model Breadcrumbs: per tensor, drop the ``top`` largest and ``bottom``
    smallest magnitudes of each task vector, then ``scale * SUM``.

    References:
      Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv:2312.06795).
    """
    return _make(name="breadcrumbs", scale=scale,
                 options=(("bottom", bottom), ("top", top)))


def della(scale: float = 1.0, density: float = 0.5, epsilon: float = 0.15,
          seed: int = 0) -> Method:
    r"""DELLA: magnitude-ranked random drops (MagPrune), elect, fuse.

    The draws of a task depend only on ``seed``, the block and the parameter,
    so a task is pruned the same way in every group.

    References:
      Deep et al., DELLA-Merging, 2024 (arXiv:2406.11617).
    """
    return _make(name="della", scale=scale, seed=seed,
                 options=(("density", density), ("epsilon", epsilon)))


def magmax(scale: float = 1.0) -> Method:
    r"""MagMax: per parameter, the task-vector entry of largest magnitude.

    References:
      Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual
      Learning, ECCV 2024 (arXiv:2407.06322).
    """
    return _make(name="magmax", scale=scale)


def model_stock() -> Method:
    r"""Model Stock: :math:`t\cdot\mathrm{mean}(\tau)` with
    :math:`t = m\cos\theta/(1+(m-1)\cos\theta)` from the average angle
    between the group's task vectors, per tensor.

    References:
      Jang et al., Model Stock: All we need is just a few fine-tuned models,
      ECCV 2024 (arXiv:2403.19522).
    """
    return _make(name="model_stock")


def slerp(t: float = 0.5) -> Method:
    r"""SLERP of exactly **two** tasks' task vectors (``t``: 0 -> first task).

    SLERP is defined for pairs only (not symmetric, not associative): it
    merges two models; FlexMerge plans with it need ``n = 2``.
    """
    return _make(name="slerp", options=(("t", t),))


_FACTORIES = {
    "avg": average,
    "ta": task_arithmetic,
    "ties": ties,
    "pcb": pcb,
    "consensus_ta": consensus_ta,
    "consensus_ties": consensus_ties,
    "emr": emr,
    "tsv": tsv,
    "iso_c": iso_c,
    "iso_cts": iso_cts,
    "breadcrumbs": breadcrumbs,
    "della": della,
    "magmax": magmax,
    "model_stock": model_stock,
    "slerp": slerp,
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
