r"""Merge methods of FlexMerge: one module each, one contract.

A method is a :class:`Method` value built by a factory (see
:mod:`._contract` and ``docs/adding_a_method.md``)::

    average()                               # avg
    task_arithmetic(scale=1.0)              # ta: scale * MEAN (lambda)
    ties(scale=1.0, keep=1.0)               # TIES, global per-task trim
    pcb(scale=1.0, keep=0.2)                # PCB-Merging (reference thresholds)
    consensus_ta(scale=1.0, consensus=0.3)  # TALL masks on task arithmetic
    consensus_ties(scale=1.0, consensus=0.3)# TALL masks on TIES (no trim)
    emr()                                   # EMR-Merging
    dare(method, drop=0.9, seed=43)         # DARE preprocessing + any method

Beyond the reference::

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
:math:`p` -> ``drop``. Numeric hyperparameters (``scale``, ``consensus``,
``t``) are ``jax.typing.ArrayLike`` and may be traced (``jit``, ``vmap``,
``grad``); each factory's docstring says which others are static and why.

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

from ._contract import BlockInfo, Dare, GroupMerge, Method, Traits
from ._registry import NAMES, from_json, get
from .average import average
from .breadcrumbs import breadcrumbs
from .consensus import consensus_ta, consensus_ties
from .dare import dare
from .della import della
from .emr import emr
from .iso import iso_c, iso_cts
from .magmax import magmax
from .model_stock import model_stock
from .pcb import pcb
from .slerp import slerp
from .task_arithmetic import task_arithmetic
from .ties import ties
from .tsv import tsv

__all__ = [
    "Method",
    "GroupMerge",
    "BlockInfo",
    "Traits",
    "Dare",
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
    "from_json",
    "NAMES",
]
