"""Ordered block specifications: which parameters form a FlexMerge block.

A *block* is a named set of parameters that is always merged as a unit (an
attention module, an MLP, a LayerNorm, an embedding). A block specification
is ordered; the order matters three times (spec §2.1): it resolves substring
ambiguity (first match wins), it is the cross-block tie-break of the greedy
schedule, and it defines the left-right / right-left orders.

Specifications:

* :func:`from_substrings` — the reference rule: a parameter belongs to the
  first listed name that is a substring of its path name.
* :func:`from_regex` — the first pattern that ``re.search``-es the name; the
  matched text is the block name (one pattern can make many blocks).
* :func:`per_leaf` — every parameter is its own block.
* :func:`by_layer` — one block per layer index, then one per other leaf.
* :func:`vit` — ViT/CLIP layout of spec §2.2 (``ln_post``; per layer, last
  layer first: ``mlp``, ``ln_2``, ``ln_1``, ``attn``; then ``ln_pre``, patch
  embedding, ``proj``, positional and class embeddings), detected from the
  parameter names.
* :func:`preset` — named lists of the reference (``clip-vit-b32``,
  ``clip-vit-l14``, ``t5-base``, ...), usable from the CLI.
* :func:`from_json` — a JSON file holding the ordered list of block names
  (substring rule), the file ``flexmerge --blocks`` takes; ``blocks=`` takes
  its path too.

Parameters matched by no block stay per task (never merged) but are counted
in the size, as in the reference; :func:`resolve` warns with their names.
Empty blocks are dropped.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "Block",
    "Partition",
    "BlockSpec",
    "from_substrings",
    "from_regex",
    "per_leaf",
    "by_layer",
    "vit",
    "bert",
    "preset",
    "from_json",
    "PRESETS",
    "resolve",
    "UnmatchedParametersWarning",
    "ShadowedBlockWarning",
]


class UnmatchedParametersWarning(UserWarning):
    """Some parameters match no block: they stay per task (counted in size)."""


@dataclasses.dataclass(frozen=True)
class Block:
    """One block: its name, its parameters (layout order) and their count."""

    name: str
    leaves: tuple[str, ...]
    numel: int


@dataclasses.dataclass(frozen=True)
class Partition:
    """A block specification resolved against concrete parameter names.

    Attributes:
      blocks: the non-empty blocks, in specification order.
      unmatched: parameters in no block (kept per task, counted in size).
      unmatched_numel: their number of entries (per model).
      total: parameters of one model (blocks + unmatched).
    """

    blocks: tuple[Block, ...]
    unmatched: tuple[str, ...]
    unmatched_numel: int
    total: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    @property
    def numels(self) -> np.ndarray:
        return np.array([b.numel for b in self.blocks], np.int64)

    def __len__(self) -> int:
        return len(self.blocks)

    def block_of(self) -> dict[str, str]:
        """Map parameter name -> block name (matched parameters only)."""
        return {leaf: b.name for b in self.blocks for leaf in b.leaves}

    def to_json(self) -> dict:
        return {
            "blocks": [[b.name, list(b.leaves), b.numel] for b in self.blocks],
            "unmatched": list(self.unmatched),
            "unmatched_numel": self.unmatched_numel,
            "total": self.total,
        }

    @classmethod
    def from_json(cls, d: dict) -> Partition:
        return cls(
            tuple(Block(n, tuple(lv), int(k)) for n, lv, k in d["blocks"]),
            tuple(d["unmatched"]),
            int(d["unmatched_numel"]),
            int(d["total"]),
        )


class BlockSpec(abc.ABC):
    """An ordered rule assigning parameter names to blocks."""

    @abc.abstractmethod
    def assign(self, names: Sequence[str]) -> list[tuple[str, list[str]]]:
        """Ordered ``(block_name, [parameter names])``, possibly empty blocks."""

    def describe(self) -> str:
        return type(self).__name__


@dataclasses.dataclass(frozen=True)
class _Substrings(BlockSpec):
    names: tuple[str, ...]
    #: Warn about names whose every match an earlier name takes (presets
    #: reproduce the reference's lists as they are, so they do not).
    warn_shadowed: bool = True

    def assign(self, names):
        groups: dict[str, list[str]] = {b: [] for b in self.names}
        for p in names:
            for b in self.names:
                if b in p:
                    groups[b].append(p)
                    break
        return list(groups.items())

    def describe(self):
        return f"substrings({len(self.names)} names)"


def from_substrings(names: Sequence[str]) -> BlockSpec:
    """The reference rule: first listed name that is a substring of the path.

    Args:
      names: ordered block names. Order is the substring-priority order, the
        cross-block tie-break order and the right-left order (list the output
        side first, as the reference does).

    Examples:
      >>> spec = from_substrings(["layers.1", "layers.0"])
      >>> spec.assign(["layers.0.w", "layers.1.w", "head"])
      [('layers.1', ['layers.1.w']), ('layers.0', ['layers.0.w'])]
    """
    if isinstance(names, str):
        raise ValueError("from_substrings takes a list of block names, not a str")
    names = tuple(str(n) for n in names)
    if not names:
        raise ValueError("a block specification needs at least one block name")
    dup = [n for i, n in enumerate(names) if n in names[:i]]
    if dup:
        raise ValueError(f"block name {dup[0]!r} is listed twice")
    if any(n == "" for n in names):
        raise ValueError("an empty block name would match every parameter")
    return _Substrings(names)


@dataclasses.dataclass(frozen=True)
class _Regex(BlockSpec):
    patterns: tuple[str, ...]

    def assign(self, names):
        compiled = [re.compile(p) for p in self.patterns]
        per_pattern: list[dict[str, list[str]]] = [{} for _ in compiled]
        for p in names:
            for k, rx in enumerate(compiled):
                m = rx.search(p)
                if m:
                    per_pattern[k].setdefault(m.group(0), []).append(p)
                    break
        return [item for d in per_pattern for item in d.items()]

    def describe(self):
        return f"regex({list(self.patterns)})"


def from_regex(patterns: Sequence[str]) -> BlockSpec:
    """Blocks from ordered regular expressions.

    A parameter belongs to the first pattern that ``re.search``-es its name;
    the block is named by the matched text, so one pattern such as
    ``r"layers/\\d+/(attn|mlp)"`` makes one block per layer and module. Blocks
    are ordered by pattern, then by first appearance in the parameter order.

    Examples:
      >>> spec = from_regex([r"l\\d+/(a|b)"])
      >>> spec.assign(["l0/a/w", "l0/b/w", "l1/a/w"])
      [('l0/a', ['l0/a/w']), ('l0/b', ['l0/b/w']), ('l1/a', ['l1/a/w'])]
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = tuple(patterns)
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"invalid block regex {p!r}: {e}") from None
        if rx.search("") is not None and rx.pattern == "":
            raise ValueError("an empty block regex would match every parameter")
    if not patterns:
        raise ValueError("a block specification needs at least one pattern")
    return _Regex(patterns)


@dataclasses.dataclass(frozen=True)
class _PerLeaf(BlockSpec):
    def assign(self, names):
        return [(p, [p]) for p in names]

    def describe(self):
        return "per_leaf"


def per_leaf() -> BlockSpec:
    """Every parameter is its own block (in parameter order)."""
    return _PerLeaf()


_LAYER_RX = r"(?:^|[./])(?P<container>[A-Za-z_]*?)(?P<sep>[./_])(?P<idx>\d+)(?=[./])"


@dataclasses.dataclass(frozen=True)
class _ByLayer(BlockSpec):
    pattern: str

    def assign(self, names):
        rx = re.compile(self.pattern)
        layers: dict[int, tuple[str, list[str]]] = {}
        rest: list[tuple[str, list[str]]] = []
        for p in names:
            m = rx.search(p)
            if m:
                idx = int(m.group("idx"))
                key = p[: m.end("idx")]
                name, members = layers.setdefault(idx, (key, []))
                if key != name:
                    raise ValueError(
                        f"by_layer: layer {idx} appears under two prefixes "
                        f"({name!r} and {key!r}); use from_regex instead"
                    )
                members.append(p)
            else:
                rest.append((p, [p]))
        ordered = [layers[i] for i in sorted(layers, reverse=True)]
        return ordered + rest

    def describe(self):
        return f"by_layer({self.pattern!r})"


def by_layer(pattern: str | None = None) -> BlockSpec:
    """One block per layer index (last layer first), then one per other leaf.

    Args:
      pattern: a regex with a named group ``idx`` (the layer number); the
        block is named by the parameter name up to the end of ``idx``. By
        default any ``<container><sep><digits><sep>`` path segment, e.g.
        ``blocks/3/...``, ``layers.3.``, ``layer_3/``.
    """
    pattern = pattern or _LAYER_RX
    if "(?P<idx>" not in pattern:
        raise ValueError("by_layer pattern needs a named group (?P<idx>\\d+)")
    return _ByLayer(pattern)


_VIT_SUB = ("mlp", "ln_2", "ln_1", "attn")
# Pre/post classification of non-layer modules, reference order (spec §2.2):
# post: ln_post;  pre: ln_pre, conv1 (patch embedding), proj, positional, class.
_VIT_PRE_KINDS = (
    ("ln_pre", ("ln_pre", "pre_layrnorm", "pre_norm")),
    ("patch", ("conv1", "patch")),
    ("proj", ("proj", "head")),
    ("pos", ("pos",)),
    ("cls", ("cls", "class")),
)
_PARAM_SUFFIXES = ("kernel", "bias", "scale", "weight", "embedding")


def _module_of(name: str, sep: str) -> str:
    parts = name.split(sep)
    if len(parts) > 1 and parts[-1] in _PARAM_SUFFIXES:
        parts = parts[:-1]
    return sep.join(parts)


@dataclasses.dataclass(frozen=True)
class _Vit(BlockSpec):
    sub: tuple[str, ...]

    def block_names(self, names: Sequence[str]) -> list[str]:
        sub = "|".join(re.escape(s) for s in self.sub)
        rx = re.compile(
            rf"^(?P<pre>.*?)(?P<sep>[./])(?P<idx>\d+)(?P=sep)(?P<sub>{sub})(?:[./]|$)"
        )
        layers: dict[int, dict[str, str]] = {}
        others: list[str] = []
        sep_seen = None
        for p in names:
            m = rx.match(p)
            if m:
                sep_seen = m.group("sep")
                idx = int(m.group("idx"))
                key = p[: m.end("sub")]
                layers.setdefault(idx, {})[m.group("sub")] = key
            else:
                others.append(p)
        if not layers:
            raise ValueError(
                "vit(): found no per-layer parameters like 'blocks/0/attn/...' "
                f"(sub-modules {list(self.sub)})"
            )
        sep = sep_seen or "/"
        modules: list[str] = []
        for p in others:
            mod = _module_of(p, sep)
            if mod not in modules:
                modules.append(mod)
        post = [m for m in modules if "post" in m.split(sep)[-1]]
        pre_sorted: list[str] = []
        for _, keys in _VIT_PRE_KINDS:
            for m in modules:
                last = m.split(sep)[-1]
                if m not in post and m not in pre_sorted and any(
                    k in last for k in keys
                ):
                    pre_sorted.append(m)
        rest = [m for m in modules if m not in post and m not in pre_sorted]
        out = list(post)
        for idx in sorted(layers, reverse=True):
            out += [layers[idx][s] for s in self.sub if s in layers[idx]]
        return out + pre_sorted + rest

    def assign(self, names):
        return _Substrings(tuple(self.block_names(names))).assign(names)

    def describe(self):
        return "vit"


def vit(sub_blocks: Sequence[str] = _VIT_SUB) -> BlockSpec:
    """ViT/CLIP-style blocks (spec §2.2), detected from parameter names.

    Layers are path segments ``<prefix><sep><i><sep><sub>`` with ``sep`` one
    of ``.``/``/`` and ``sub`` in ``sub_blocks`` (default ``mlp``, ``ln_2``,
    ``ln_1``, ``attn``, the reference's within-layer order). The resulting
    order is the reference's: post modules (``ln_post``) first; then layers,
    last first; then ``ln_pre``, the patch embedding, ``proj``, the
    positional and the class embedding; then any other module. Each module
    (a parameter path without its trailing ``kernel``/``bias``/``scale``/
    ``weight``) outside the layers is one block. The block names are plain
    substrings, so ``vit().block_names(names)`` can be saved as a JSON list.
    """
    return _Vit(tuple(sub_blocks))


def _clip_vit(layers: int, fine: bool = True) -> list[str]:
    out = ["ln_post"]
    for i in range(layers - 1, -1, -1):
        if fine:
            out += [f"resblocks.{i}.{s}" for s in ("mlp", "ln_2", "ln_1", "attn")]
        else:
            out.append(f"resblocks.{i}")
    return out + [
        "visual.ln_pre",
        "visual.conv1",
        "visual.proj",
        "visual.positional_embedding",
        "visual.class_embedding",
    ]


def _t5(layers: int, embeddings: Sequence[str] = ()) -> list[str]:
    out = [
        f"transformer.decoder.block.{i}.layer.{j}"
        for i in range(layers - 1, -1, -1)
        for j in (2, 1, 0)
    ]
    out += [
        f"transformer.encoder.block.{i}.layer.{j}"
        for i in range(layers - 1, -1, -1)
        for j in (1, 0)
    ]
    return out + [f"transformer.{e}" for e in embeddings]


_T5_BASE_EMB = (
    "decoder.final_layer_norm.weight",
    "lm_head.weight",
    "encoder.final_layer_norm.weight",
    "decoder.embed_tokens.weight",
    "shared.weight",
    "encoder.embed_tokens.weight",
)
_T5_LARGE_EMB = (
    "shared.weight",
    "encoder.embed_tokens.weight",
    "encoder.final_layer_norm.weight",
    "decoder.embed_tokens.weight",
    "decoder.final_layer_norm.weight",
    "lm_head.weight",
)

_BERT_LAYER_SUB = ("output.LayerNorm", "output.dense", "intermediate", "attention.output.LayerNorm",
                   "attention")
_BERT_EMB = ("embeddings.LayerNorm", "embeddings.position_embeddings",
             "embeddings.token_type_embeddings", "embeddings.word_embeddings")


@dataclasses.dataclass(frozen=True)
class _Bert(BlockSpec):
    num_layers: int | None

    def block_names(self, names: Sequence[str]) -> list[str]:
        rx = re.compile(r"(?:^|[./])encoder(?P<sep>[./])layer(?P=sep)(?P<idx>\d+)(?P=sep)")
        seps = {m.group("sep") for m in map(rx.search, names) if m}
        if len(seps) > 1:
            raise ValueError("bert(): parameter names mix '.' and '/' separators")
        sep = seps.pop() if seps else ("/" if any("/" in n for n in names) else ".")
        n = self.num_layers
        if n is None:
            found = {int(m.group("idx")) for m in map(rx.search, names) if m}
            if not found:
                raise ValueError("bert(): found no 'encoder.layer.<i>.' (or 'encoder/layer/<i>/') "
                                 "parameters; pass num_layers or use another block spec")
            n = max(found) + 1
        out = [f"pooler{sep}dense"]
        for i in range(n - 1, -1, -1):
            out += [sep.join(("encoder", "layer", str(i), *s.split("."))) for s in _BERT_LAYER_SUB]
        return out + [e.replace(".", sep) for e in _BERT_EMB]

    def assign(self, names):
        return _Substrings(tuple(self.block_names(names))).assign(names)

    def describe(self):
        return f"bert(num_layers={self.num_layers})"


def bert(num_layers: int | None = None) -> BlockSpec:
    """BERT-style encoder blocks (HF ``BertModel`` names or their Flax layout).

    Output side first, as the reference's lists: ``pooler.dense`` (when
    present); then per layer, last layer first, ``output.LayerNorm``,
    ``output.dense``, ``intermediate``, ``attention.output.LayerNorm`` and
    ``attention`` (self-attention query/key/value + the attention output
    dense); then the embeddings' ``LayerNorm``, position, token-type and word
    embeddings: ``5 * num_layers + 4`` blocks (+1 with a pooler). Works on
    ``encoder.layer.3.attention.self.query.weight`` as on
    ``encoder/layer/3/attention/self/query/kernel`` (the separator is detected;
    a prefix such as ``bert.`` is fine). Task heads (``classifier``) match
    nothing and stay per task.

    Args:
      num_layers: number of encoder layers; ``None`` detects it from names.
    """
    if num_layers is not None and int(num_layers) < 1:
        raise ValueError(f"bert(): num_layers must be >= 1, got {num_layers}")
    return _Bert(None if num_layers is None else int(num_layers))


PRESETS: dict[str, Callable[[], BlockSpec]] = {
    # The reference's lists (spec §2.2), open_clip / HF flat names.
    "clip-vit-b32": lambda: from_substrings(_clip_vit(12)),
    "clip-vit-l14": lambda: from_substrings(_clip_vit(24)),
    "clip-vit-b32-coarse": lambda: from_substrings(_clip_vit(12, fine=False)),
    "t5-base": lambda: from_substrings(_t5(12, _T5_BASE_EMB)),
    "t5-large": lambda: from_substrings(_t5(24, _T5_LARGE_EMB)),
    "t0-3b-ia3": lambda: from_substrings(_t5(24)),
    # Generic rules.
    "vit": vit,
    "bert": bert,  # HF BertModel names or the Flax layout; layers detected
    "per-leaf": per_leaf,
    "by-layer": by_layer,
}
PRESET_ALIASES = {
    "MTL-transformer+PP": "clip-vit-b32",
    "MTL-transformer-L+PP": "clip-vit-l14",
    "MTL-transformerPP": "clip-vit-b32-coarse",
    "MTL-t5-base": "t5-base",
    "MTL-t5-large": "t5-large",
    "MTL-IA3": "t0-3b-ia3",
}


def preset(name: str) -> BlockSpec:
    """A named block specification (see ``PRESETS``; reference names accepted).

    ``clip-vit-b32`` is the reference's ``MTL-transformer+PP`` (54 blocks),
    ``clip-vit-l14`` its ``MTL-transformer-L+PP`` (102), ``t5-base``
    ``MTL-t5-base`` (66), ``t5-large`` (126), ``t0-3b-ia3`` ``MTL-IA3`` (120);
    ``vit``, ``bert`` (BERT-style encoders, HF or Flax names), ``per-leaf``
    and ``by-layer`` are the generic rules.
    """
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(
            f"unknown block preset {name!r}; choose one of {sorted(PRESETS)}"
        )
    spec = PRESETS[key]()
    return dataclasses.replace(spec, warn_shadowed=False) if isinstance(spec, _Substrings) else spec


def from_json(path) -> BlockSpec:
    """:func:`from_substrings` of the JSON list of block names in a file.

    Raises:
      ValueError: the file is missing, not JSON, or not a list of strings.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: block list file not found")
    try:
        names = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{p}: must hold a JSON list of block names (strings)")
    return from_substrings(names)


def as_spec(blocks) -> BlockSpec:
    """Coerces ``None`` / preset name / path of a JSON block list / list of
    substrings / spec to a spec (a string ending in ``.json``, or naming an
    existing file, is a path)."""
    if blocks is None:
        return per_leaf()
    if isinstance(blocks, BlockSpec):
        return blocks
    if isinstance(blocks, os.PathLike) or (isinstance(blocks, str) and (
            blocks.endswith(".json") or os.path.isfile(blocks))):
        return from_json(blocks)
    if isinstance(blocks, str):
        return preset(blocks)
    if isinstance(blocks, Sequence):
        return from_substrings(blocks)
    raise ValueError(
        "blocks must be a BlockSpec, a preset name, a JSON file path or a list of block names, "
        f"got {type(blocks).__name__}"
    )


class ShadowedBlockWarning(UserWarning):
    """A listed block name matches only parameters an earlier name takes."""


def _warn_shadowed(listed, assigned, names) -> None:
    """Warns for each substring block left empty although it occurs in
    parameter names: every such parameter went to an earlier block."""
    owner = {m: b for b, members in assigned for m in members}
    for b, members in assigned:
        hits = [p for p in names if b in p] if not members else []
        if hits:
            warnings.warn(
                f"block {b!r} is empty: every parameter containing it ({hits[0]!r}"
                f"{f' and {len(hits) - 1} more' if len(hits) > 1 else ''}) belongs to the "
                f"earlier block {owner[hits[0]]!r} (the first listed substring wins; list "
                "the longer name first)", ShadowedBlockWarning, stacklevel=4)


def resolve(
    blocks, names: Sequence[str], sizes: Sequence[int], *, warn: bool = True
) -> Partition:
    """Resolves a block specification against parameter names.

    Args:
      blocks: a :class:`BlockSpec`, a preset name, a list of substrings or
        ``None`` (one block per leaf).
      names: parameter names (layout order).
      sizes: number of entries of each parameter.
      warn: emit :class:`UnmatchedParametersWarning` listing unmatched names.

    Returns:
      The :class:`Partition` (empty blocks dropped).

    Raises:
      ValueError: if the specification matches no parameter at all.
    """
    spec = as_spec(blocks)
    size_of = dict(zip(names, (int(s) for s in sizes)))
    assigned = spec.assign(list(names))
    seen: set[str] = set()
    out = []
    for bname, members in assigned:
        if not members:
            continue
        for m in members:
            if m in seen:
                raise ValueError(f"parameter {m!r} is assigned to two blocks")
            seen.add(m)
        order = [p for p in names if p in set(members)]
        out.append(Block(bname, tuple(order), sum(size_of[p] for p in order)))
    if not out:
        raise ValueError(
            f"the block specification {spec.describe()} matches none of the "
            f"{len(names)} parameters (first names: {list(names)[:3]})"
        )
    if warn and isinstance(spec, _Substrings) and spec.warn_shadowed:
        _warn_shadowed(spec.names, assigned, names)
    unmatched = tuple(p for p in names if p not in seen)
    if unmatched and warn:
        shown = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        warnings.warn(
            f"{len(unmatched)} parameter(s) match no block; they stay per task "
            f"and are counted in the size: {shown}",
            UnmatchedParametersWarning,
            stacklevel=3,
        )
    total = sum(size_of[p] for p in names)
    return Partition(
        tuple(out), unmatched, sum(size_of[p] for p in unmatched), total
    )
