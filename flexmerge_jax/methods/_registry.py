"""Built-in methods by name: ``get``, and the saved record of a method."""

from __future__ import annotations

import inspect
from typing import Any

from ._contract import SAVED_FIELDS, Method, plain_value
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

FACTORIES = {
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
REFERENCE_NAMES = ("avg", "ta", "ties", "pcb", "consensus_ta", "consensus_ties", "emr")
EXTRA_NAMES = tuple(k for k in FACTORIES if k not in REFERENCE_NAMES)
NAMES = REFERENCE_NAMES + EXTRA_NAMES
ALIASES = {
    "average": "avg",
    "task_arithmetic": "ta",
    "consensus": "consensus_ta",
}


def get(method: Method | str, **hyperparameters) -> Method:
    """A :class:`Method` from a method or a built-in name (``"ta"``, ``"ties"``, ...).

    Keyword hyperparameters are the factory's (plus ``drop``/``seed`` for
    DARE); ones the method does not take raise ValueError.
    """
    if isinstance(method, Method):
        if hyperparameters:
            raise ValueError("hyperparameters are given with a Method object")
        return method
    if not isinstance(method, str):
        raise ValueError(f"method must be a Method or a name, got {method!r}")
    key = ALIASES.get(method, method)
    if key not in FACTORIES:
        raise ValueError(f"unknown method {method!r}; choose one of {list(NAMES)}")
    factory = FACTORIES[key]
    allowed = set(inspect.signature(factory).parameters)
    drop = hyperparameters.pop("drop", None)
    seed = hyperparameters.pop("seed", None) if "seed" not in allowed or drop is not None \
        else None
    bad = sorted(set(hyperparameters) - allowed)
    if bad:
        raise ValueError(
            f"method {key!r} takes no hyperparameter {bad[0]!r} "
            f"(it takes {sorted(allowed) or 'none'})"
        )
    m = factory(**hyperparameters)
    return dare(m, drop, 43 if seed is None else seed) if drop is not None else m


def from_json(d: dict[str, Any], method: Method | None = None) -> Method:
    """The method of a saved record.

    Args:
      d: the record (:meth:`Method.to_json`).
      method: the method to use instead (required for custom methods: a
        saved plan cannot rebuild user code); it must match the record.
    """
    if d.get("custom") or d["name"] not in FACTORIES:
        if method is None:
            raise ValueError(
                f"the saved plan uses the custom method {d['name']!r}, which cannot be "
                "rebuilt from the file: pass it again (load(..., method=...))")
        want = {"name": d["name"], **d.get("hyperparameters", {})}
        if d.get("drop") is not None:
            want.update(drop=d["drop"], seed=d["seed"])
    else:
        factory = FACTORIES[d["name"]]
        allowed = set(inspect.signature(factory).parameters)
        hp = {k: d[k] for k in (*SAVED_FIELDS, "seed") if k in allowed and k in d}
        hp.update({k: v for k, v in d.get("options", ())})
        m = factory(**hp)
        if d.get("drop") is not None:
            m = dare(m, d["drop"], d["seed"])
        if method is None:
            return m
        want = m.hyperparameters()
    got = {k: plain_value(v) for k, v in method.hyperparameters().items()}
    if got != want:
        raise ValueError(f"load(method=...): the plan was made with {want}, not {got}")
    return method
