"""PyTorch / Hugging Face checkpoints without torch: names and kernel layout.

A Hugging Face ``model.safetensors`` names its tensors with dotted module
paths (``encoder.layer.0.attention.self.query.weight``) and stores
``torch.nn.Linear`` weights as ``(out, in)``. A Flax model names the same
tensor ``encoder/layer/0/attention/self/query/kernel`` and wants ``(in, out)``.
This module converts both ways, exactly (bitwise), with numpy and safetensors
only:

* :func:`from_hf` / :func:`to_hf` — a ``{hf_name: array}`` dict <-> params.
* :func:`load_hf` / :func:`save_hf` — the same from/to a file (``.safetensors``
  or ``.npz``, through :mod:`flexmerge_jax.sources.files`).
* :func:`hf_source` — a lazy :class:`~flexmerge_jax.Source` over HF files, so
  ``fm.plan`` reads one block at a time straight from the checkpoints.
* :func:`bert_mapping` — the mapping for BERT-style encoders (``BertModel``
  names <-> the Flax layout of ``FlaxBertModel``).

Name mappings
-------------
A *mapping* turns an HF name into a params name (``"/"`` nests dicts) or
``None`` (drop the tensor, e.g. the ``embeddings.position_ids`` buffer). It is
any of:

* ``None`` — identity (names kept as they are: a one-level dict);
* a ``dict`` ``{hf_name: params_name_or_None}`` (names absent from the dict
  are kept unchanged);
* a list of regex rewrites ``[(pattern, replacement), ...]`` applied in order
  with :func:`re.sub`, like a sed script; a ``None`` replacement drops every
  name the pattern matches (``re.search``);
* a callable ``hf_name -> params_name | None``;
* a :class:`NameMap`, which also carries the inverse (for export).

Exporting needs the inverse. A ``dict`` is inverted automatically; for rules or
callables give ``NameMap(forward, inverse)`` (``inverse``: rules or callable)
or pass ``like=`` (an HF file or a list of HF names: the inverse is then read
off the forward mapping of those names). Writing your own mapping for, say, a
GPT-2-style model::

    gpt2 = NameMap.rules(
        [(r"\\.attn\\.bias$", None),              # drop the causal-mask buffer
         (r"\\.weight$", ".kernel"), (r"\\.", "/")],
        inverse=[(r"/", "."), (r"\\.kernel$", ".weight")])
    params = load_hf("model.safetensors", gpt2, transpose=False)  # Conv1D: (in, out) already

Transposition
-------------
``transpose=True`` (default) transposes every tensor whose **params name ends
in** ``kernel`` (last path component) and that has 2 or more dimensions:
2-D ``(out, in)`` -> ``(in, out)``; N-D convolution weights
``(out, in, *spatial)`` -> ``(*spatial, in, out)``. Embeddings (``embedding``)
and norms (``scale``/``bias``) are never transposed, nor is anything when the
mapping keeps PyTorch's ``weight`` names. ``transpose=False`` transposes
nothing; a callable ``(params_name, ndim) -> bool`` decides per tensor. Export
applies the exact inverse permutation, so round trips are bitwise.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import jax
import numpy as np

from ..sources import files as _io
from ..sources._source import Source, check_names
from ..tree import Layout, flatten, nest

__all__ = [
    "NameMap",
    "as_name_map",
    "bert_mapping",
    "from_hf",
    "to_hf",
    "load_hf",
    "save_hf",
    "hf_source",
    "HFSource",
    "kernel_to_flax",
    "kernel_to_torch",
]

PyTree = Any
Rules = Sequence[tuple[str, str | None]]
MappingLike = Union[  # noqa: UP007 (a runtime alias: "NameMap" is a forward reference)
    None, "NameMap", Mapping[str, str | None], Rules, Callable[[str], str | None]]
TransposeLike = bool | Callable[[str, int], bool]


def _apply_rules(rules: tuple[tuple[re.Pattern, str | None], ...], name: str) -> str | None:
    for rx, repl in rules:
        if repl is None:
            if rx.search(name):
                return None
        else:
            name = rx.sub(repl, name)
    return name


def _compile_rules(rules: Rules) -> tuple[tuple[re.Pattern, str | None], ...]:
    out = []
    for r in rules:
        if not (isinstance(r, (tuple, list)) and len(r) == 2):
            raise ValueError(f"a rewrite rule is a (pattern, replacement) pair, got {r!r}")
        pat, repl = r
        try:
            out.append((re.compile(pat), repl))
        except re.error as e:
            raise ValueError(f"invalid rewrite pattern {pat!r}: {e}") from None
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class NameMap:
    """HF name -> params name (``None``: drop), and optionally the inverse.

    Attributes:
      forward: ``hf_name -> params_name | None``.
      inverse: ``params_name -> hf_name`` (``None`` when unknown; export then
        needs ``like=``).
      description: a short text for messages.
    """

    forward: Callable[[str], str | None]
    inverse: Callable[[str], str] | None = None
    description: str = "mapping"

    @classmethod
    def rules(cls, forward: Rules, inverse: Rules | Callable[[str], str] | None = None,
              description: str = "rules") -> NameMap:
        """Regex rewrites applied in order (``re.sub``); ``None`` drops."""
        fwd = _compile_rules(forward)
        inv = None
        if callable(inverse):
            inv = inverse
        elif inverse is not None:
            inv_rules = _compile_rules(inverse)
            if any(r is None for _, r in inv_rules):
                raise ValueError("inverse rules cannot drop names")
            inv = lambda n: _apply_rules(inv_rules, n)  # noqa: E731
        return cls(lambda n: _apply_rules(fwd, n), inv, description)

    @classmethod
    def from_dict(cls, table: Mapping[str, str | None]) -> NameMap:
        """A table; names it lacks are kept. Inverted automatically."""
        table = dict(table)
        inv: dict[str, str] = {}
        for k, v in table.items():
            if v is None:
                continue
            if v in inv:
                raise ValueError(f"mapping sends both {inv[v]!r} and {k!r} to {v!r}")
            inv[v] = k
        return cls(lambda n: table.get(n, n), lambda n: inv.get(n, n), "dict")

    def map_names(self, hf_names: Iterable[str]) -> dict[str, str]:
        """``{hf_name: params_name}`` for the kept names; checks injectivity."""
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for h in hf_names:
            p = self.forward(h)
            if p is None:
                continue
            if not isinstance(p, str) or not p:
                raise ValueError(f"{self.description}: {h!r} maps to {p!r}, not a name")
            if p in seen:
                raise ValueError(f"{self.description}: both {seen[p]!r} and {h!r} map to {p!r}")
            seen[p] = h
            out[h] = p
        return out


def as_name_map(mapping: MappingLike) -> NameMap:
    """Coerces ``None`` / dict / rules / callable / :class:`NameMap`."""
    if mapping is None:
        return NameMap(lambda n: n, lambda n: n, "identity")
    if isinstance(mapping, NameMap):
        return mapping
    if isinstance(mapping, Mapping):
        return NameMap.from_dict(mapping)
    if callable(mapping):
        return NameMap(mapping, None, getattr(mapping, "__name__", "callable"))
    if isinstance(mapping, Sequence) and not isinstance(mapping, str):
        return NameMap.rules(mapping)
    raise ValueError(
        "mapping must be None, a dict, a list of (pattern, replacement) rules, "
        f"a callable or a NameMap, got {type(mapping).__name__}"
    )


def bert_mapping(prefix: str = "") -> NameMap:
    """HF ``BertModel`` names <-> the Flax layout (as ``FlaxBertModel``).

    ``embeddings.word_embeddings.weight`` <-> ``embeddings/word_embeddings/embedding``,
    ``*.LayerNorm.weight``/``.bias`` (also the old ``gamma``/``beta``) <->
    ``*/LayerNorm/scale``/``bias``, every other ``*.weight`` <-> ``*/kernel``
    (transposed by ``transpose=True``), dots <-> ``/``. The
    ``embeddings.position_ids`` buffer is dropped (re-add it on export with
    ``save_hf(..., extra=...)``).

    Args:
      prefix: an HF prefix to strip on import and restore on export, e.g.
        ``"bert."`` for ``BertForSequenceClassification`` checkpoints (other
        names, such as ``classifier.weight``, get the same rewrites without
        it).

    Examples:
      >>> m = bert_mapping()
      >>> m.forward("encoder.layer.0.attention.self.query.weight")
      'encoder/layer/0/attention/self/query/kernel'
      >>> m.inverse("embeddings/LayerNorm/scale")
      'embeddings.LayerNorm.weight'
    """
    p = re.escape(prefix)
    fwd: list[tuple[str, str | None]] = [(rf"^(?:{p})?embeddings\.position_ids$", None)]
    if prefix:
        fwd.append((rf"^{p}", ""))
    fwd += [
        (r"LayerNorm\.(?:weight|gamma)$", "LayerNorm.scale"),
        (r"LayerNorm\.beta$", "LayerNorm.bias"),
        (r"_embeddings\.weight$", "_embeddings.embedding"),
        (r"\.weight$", ".kernel"),
        (r"\.", "/"),
    ]
    inv = _compile_rules([
        (r"/", "."),
        (r"LayerNorm\.scale$", "LayerNorm.weight"),
        (r"_embeddings\.embedding$", "_embeddings.weight"),
        (r"\.kernel$", ".weight"),
    ])
    heads = ("classifier", "cls", "qa_outputs")  # task heads outside the encoder

    def inverse(name: str) -> str:
        h = _apply_rules(inv, name)
        if prefix and not h.startswith(heads):
            h = prefix + h
        return h

    return NameMap.rules(fwd, inverse, f"bert_mapping(prefix={prefix!r})")


# --------------------------------------------------------------------------- layout


def _transpose_rule(transpose: TransposeLike) -> Callable[[str, int], bool]:
    if transpose is True:
        return lambda name, ndim: (ndim >= 2
                                   and name.rsplit("/", 1)[-1].rsplit(".", 1)[-1] == "kernel")
    if transpose is False or transpose is None:
        return lambda name, ndim: False
    if callable(transpose):
        return transpose
    raise ValueError(
        f"transpose must be a bool or a callable (name, ndim) -> bool, got {transpose!r}")


def _perm_to_flax(ndim: int) -> tuple[int, ...]:
    # torch (out, in, *spatial) -> flax (*spatial, in, out)
    return tuple(range(2, ndim)) + (1, 0)


def kernel_to_flax(w: np.ndarray) -> np.ndarray:
    """PyTorch ``(out, in, *spatial)`` -> Flax ``(*spatial, in, out)`` (a copy, C order)."""
    w = np.asarray(w)
    return np.ascontiguousarray(np.transpose(w, _perm_to_flax(w.ndim)))


def kernel_to_torch(k: np.ndarray) -> np.ndarray:
    """Inverse of :func:`kernel_to_flax`."""
    k = np.asarray(k)
    return np.ascontiguousarray(np.transpose(k, np.argsort(_perm_to_flax(k.ndim))))


def _host(x) -> np.ndarray:
    if hasattr(x, "__array__") and not isinstance(x, np.ndarray):
        x = jax.device_get(x)
    return np.asarray(x)


# --------------------------------------------------------------------------- dicts


def from_hf(state_dict: Mapping[str, Any], mapping: MappingLike = None, *,
            transpose: TransposeLike = True, nested: bool = True) -> PyTree:
    """``{hf_name: array}`` -> params (numpy arrays, dtypes kept).

    Args:
      state_dict: HF-named tensors (numpy arrays or anything ``np.asarray``
        takes; torch tensors: pass ``{k: v.numpy()}``).
      mapping: see the module docstring (``None``: keep the names).
      transpose: see the module docstring.
      nested: nest the params names at ``"/"`` into dicts (the params names of
        the result are then exactly the mapped names); ``False`` returns a
        one-level ``{params_name: array}``.

    Raises:
      ValueError: two HF names map to one params name, or a mapped name is
        both a leaf and a prefix of another.
    """
    nm = as_name_map(mapping)
    rule = _transpose_rule(transpose)
    names = nm.map_names(state_dict.keys())
    flat = {}
    for h, p in names.items():
        a = np.asarray(state_dict[h])
        flat[p] = kernel_to_flax(a) if rule(p, a.ndim) else a
    return nest(flat) if nested else flat


def _inverse_from(nm: NameMap, like) -> Callable[[str], str]:
    if like is not None:
        if isinstance(like, (str, Path)):
            like = _io._Reader(like).names
        table = {p: h for h, p in nm.map_names(like).items()}

        def inv(name):
            if name not in table:
                raise ValueError(f"parameter {name!r} is the image of no name in like= "
                                 f"(under {nm.description})")
            return table[name]

        return inv
    if nm.inverse is None:
        raise ValueError(
            f"exporting needs the inverse of {nm.description}: use NameMap(forward, inverse), "
            "a dict mapping, or pass like= (the HF file or names to export to)"
        )
    return nm.inverse


def to_hf(params: PyTree, mapping: MappingLike = None, *, transpose: TransposeLike = True,
          like=None, extra: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """params -> ``{hf_name: np.ndarray}``, the exact inverse of :func:`from_hf`.

    Args:
      params: a params pytree (jax or numpy leaves).
      mapping: the *forward* mapping used by :func:`from_hf` (its inverse is
        applied; see the module docstring).
      transpose: the same value as on import (decided on the params name).
      like: an HF file or a list of HF names; gives the inverse by mapping
        them forward (needed when the mapping has no inverse).
      extra: HF-named tensors added as they are (e.g. the dropped
        ``embeddings.position_ids``).

    Raises:
      ValueError: no inverse, or two parameters land on one HF name.
    """
    nm = as_name_map(mapping)
    inv = _inverse_from(nm, like)
    rule = _transpose_rule(transpose)
    names, leaves, _ = flatten(params)
    out: dict[str, np.ndarray] = {}
    for p, x in zip(names, leaves):
        h = inv(p)
        if h in out:
            raise ValueError(f"two parameters map to the HF name {h!r}")
        a = _host(x)
        out[h] = kernel_to_torch(a) if rule(p, a.ndim) else np.ascontiguousarray(a)
    for h, a in (extra or {}).items():
        if h in out:
            raise ValueError(f"extra tensor {h!r} is also a parameter")
        out[h] = np.ascontiguousarray(_host(a))
    return out


# --------------------------------------------------------------------------- files


def load_hf(path, mapping: MappingLike = None, *, transpose: TransposeLike = True,
            nested: bool = True) -> PyTree:
    """Reads an HF-named ``.safetensors`` / ``.npz`` file into params.

    Reading goes through :func:`flexmerge_jax.load_params`; see
    :func:`from_hf` for the arguments.

    Examples:
      >>> params = load_hf("model.safetensors", bert_mapping())  # doctest: +SKIP
      >>> layer = params["encoder"]["layer"]["0"]  # doctest: +SKIP
      >>> layer["attention"]["self"]["query"]["kernel"].shape  # doctest: +SKIP
      (384, 384)
    """
    names, leaves, _ = flatten(_io.load_params(path))
    return from_hf(dict(zip(names, leaves)), mapping, transpose=transpose, nested=nested)


def save_hf(path, params: PyTree, mapping: MappingLike = None, *, transpose: TransposeLike = True,
            like=None, extra: Mapping[str, Any] | None = None) -> Path:
    """Writes params as an HF-named ``.safetensors`` (or ``.npz``) file.

    The inverse of :func:`load_hf` (see :func:`to_hf` for the arguments);
    atomic, through :func:`flexmerge_jax.save_params`. Loading the result
    with ``transformers`` (``BertModel.from_pretrained(dir)``) needs the
    model's ``config.json`` beside it, named ``model.safetensors``.
    """
    if Path(path).suffix not in (".safetensors", ".npz"):
        raise ValueError(f"{path}: save_hf writes .safetensors or .npz files")
    flat = to_hf(params, mapping, transpose=transpose, like=like, extra=extra)
    return _io.save_params(path, flat)


# --------------------------------------------------------------------------- lazy source


class HFSource(_io.FileInputs, Source):
    """Base + n HF-named files, mapped and transposed lazily, block by block.

    The layout (params names, Flax shapes) comes from the headers; only the
    tensors asked for are read. Tensors the mapping drops are never read, so
    integer buffers such as ``embeddings.position_ids`` are fine. Every file
    must have the base's names, shapes and dtypes.
    """

    prefetch = True  # files: the streaming passes read the next block ahead

    def __init__(self, base, finetuned: Sequence, mapping: MappingLike = None, *,
                 transpose: TransposeLike = True, task_names=None):
        if _io.is_path(finetuned) or not isinstance(finetuned, Sequence):
            raise ValueError("finetuned must be a list of paths")
        if len(finetuned) < 2:
            raise ValueError(f"FlexMerge needs at least 2 fine-tuned models, got {len(finetuned)}")
        self._nm = as_name_map(mapping)
        self._rule = _transpose_rule(transpose)
        self._base = _io._Reader(base)
        self._ft = [_io._Reader(p) for p in finetuned]
        hf_names = self._nm.map_names(self._base.names)
        shapes = dict(zip(self._base.names, self._base.shapes))
        dtypes = dict(zip(self._base.names, self._base.dtypes))
        names, shp, dts = [], [], []
        for h in sorted(hf_names, key=hf_names.get):
            p = hf_names[h]
            s = shapes[h]
            if self._rule(p, len(s)):
                s = tuple(s[i] for i in _perm_to_flax(len(s)))
            if dtypes[h] != "bfloat16" and not np.issubdtype(np.dtype(dtypes[h]), np.floating):
                raise ValueError(f"{self._base.path}: {h!r} has dtype {dtypes[h]}; "
                                 "FlexMerge merges floating-point parameters only "
                                 "(drop it in the mapping)")
            names.append(p)
            shp.append(tuple(s))
            dts.append(dtypes[h])
        self._to_hf = {p: h for h, p in hf_names.items()}
        self.layout = Layout(tuple(names), tuple(shp), tuple(dts))
        for i, r in enumerate(self._ft):
            for h in hf_names:
                if h not in r.names:
                    raise ValueError(f"task {i} ({r.path}): lacks {h!r}")
            rs = dict(zip(r.names, r.shapes))
            rd = dict(zip(r.names, r.dtypes))
            for h in hf_names:
                if rs[h] != shapes[h] or rd[h] != dtypes[h]:
                    raise ValueError(f"task {i} ({r.path}): {h!r} is {rd[h]}{list(rs[h])}, "
                                     f"base has {dtypes[h]}{list(shapes[h])}")
        default = [_io.task_name(p) for p in finetuned]
        if task_names is None and len(set(default)) == len(default):
            task_names = default
        self.task_names = check_names(task_names, len(finetuned))
        self._record_inputs(base, finetuned, self.task_names, "fast")

    def _read(self, reader, names):
        got = reader.read([self._to_hf[n] for n in names])
        out = {}
        for n in names:
            a = got[self._to_hf[n]]
            out[n] = kernel_to_flax(a) if self._rule(n, a.ndim) else a
        return out

    def base(self, names):
        return self._read(self._base, names)

    def finetuned(self, names):
        return [self._read(r, names) for r in self._ft]

    def finetuned_tasks(self, names, tasks):
        return {int(t): self._read(self._ft[t], names) for t in tasks}

    def describe(self) -> dict:
        return {
            "kind": "hf",
            "mapping": self._nm.description,
            "base": str(self._base.path.absolute()),
            "finetuned": [str(r.path.absolute()) for r in self._ft],
            "task_names": list(self.task_names),
            "fingerprints": self._fingerprints,
        }


def hf_source(base, finetuned: Sequence, mapping: MappingLike = None, *,
              transpose: TransposeLike = True, task_names=None) -> HFSource:
    """A lazy :class:`HFSource`: ``fm.plan(hf_source(b, [f1, f2], bert_mapping()), ...)``."""
    return HFSource(base, finetuned, mapping, transpose=transpose, task_names=task_names)
