"""Importers and exporters: Flax nnx / linen modules and Hugging Face files.

* :mod:`.flax_nnx` — :func:`from_nnx` / :func:`to_nnx`, :func:`nnx_block` (an nnx
  layer as a :mod:`flexmerge_jax.serve` block function; imports flax).
* :mod:`.linen` — :func:`from_linen` / :func:`to_linen` (imports flax).
* :mod:`.hf` — PyTorch / Hugging Face safetensors without torch: name
  mappings (:func:`bert_mapping`), Linear weight <-> Flax kernel transposition,
  :func:`load_hf` / :func:`save_hf`, a lazy :func:`hf_source` for ``fm.plan``.

All round trips are exact (bitwise). ``import flexmerge_jax.adapters`` does not
import flax: the flax functions are loaded on first use.
"""

from __future__ import annotations

import importlib

from . import hf as _hf
from .hf import (
    HFSource,
    NameMap,
    as_name_map,
    bert_mapping,
    from_hf,
    hf_source,
    kernel_to_flax,
    kernel_to_torch,
    load_hf,
    save_hf,
    to_hf,
)

_LAZY = {
    "from_nnx": "flax_nnx",
    "to_nnx": "flax_nnx",
    "nnx_block": "flax_nnx",
    "from_linen": "linen",
    "to_linen": "linen",
}

__all__ = [*_LAZY, *_hf.__all__]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
