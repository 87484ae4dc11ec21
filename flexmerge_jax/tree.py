"""Pytree layer: leaf names, layouts, task vectors and their inverse.

Every parameter (leaf) of a params pytree is named by its key path joined with
``"/"`` (``jax.tree_util.keystr(path, simple=True, separator="/")``). A
one-level dict ``{"a.b": x}`` therefore keeps its key ``"a.b"`` as the name,
and a nested ``{"blocks": {"0": {"attn": x}}}`` gives ``"blocks/0/attn"``.

Task vectors are one params-shaped pytree whose every leaf has a leading task
axis ``[n, *leaf_shape]`` (struct of arrays), built by :func:`task_vectors`;
:func:`apply_task_vector` is its inverse (``base + tau``).

All checks raise :class:`ValueError` naming the task index and the parameter
path at fault.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Layout",
    "leaf_names",
    "flatten",
    "layout_of",
    "check_finetuned",
    "task_vectors",
    "apply_task_vector",
    "stack",
    "unstack",
    "canonical",
    "named",
    "host_resident",
    "trim",
]

PyTree = Any


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """Flattens a params pytree into ``(names, leaves, treedef)``.

    Args:
      tree: a params pytree (nested dicts/lists/tuples or any registered node).

    Returns:
      ``names`` (one ``"/"``-joined key path per leaf, in ``jax.tree`` order),
      the leaves, and the treedef to rebuild the tree.

    Raises:
      ValueError: if two leaves get the same name (e.g. keys ``"a/b"`` and
        nested ``a -> b``).
    """
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [_name(p) for p, _ in pairs]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise ValueError(f"two parameters share the name {dup!r}; rename one")
    return names, [leaf for _, leaf in pairs], treedef


def leaf_names(tree: PyTree) -> list[str]:
    """The ``"/"``-joined key-path name of every leaf, in ``jax.tree`` order."""
    return flatten(tree)[0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of a params pytree: names, shapes, dtypes, treedef.

    Attributes:
      names: leaf names in ``jax.tree`` order.
      shapes: one shape tuple per leaf.
      dtypes: one ``numpy`` dtype name per leaf (e.g. ``"float32"``).
      treedef: the pytree structure (``None`` when unknown, e.g. read from
        disk; trees are then rebuilt as nested dicts from the names).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    treedef: Any = None

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of every leaf."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def total(self) -> int:
        """Number of parameters of one model."""
        return int(sum(self.sizes))

    def index(self) -> dict[str, int]:
        """Map name -> position."""
        return {n: i for i, n in enumerate(self.names)}

    def unflatten(self, leaves: Sequence[Any]) -> PyTree:
        """Rebuilds a pytree from leaves in ``names`` order.

        Uses the stored treedef when present; otherwise builds nested dicts by
        splitting names on ``"/"``.
        """
        if self.treedef is not None:
            return jax.tree_util.tree_unflatten(self.treedef, list(leaves))
        return nest(dict(zip(self.names, leaves)))

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
        }

    @classmethod
    def from_json(cls, d: dict) -> Layout:
        return cls(
            tuple(d["names"]),
            tuple(tuple(int(x) for x in s) for s in d["shapes"]),
            tuple(d["dtypes"]),
        )


def nest(flat: dict[str, Any]) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}`` (names without "/" stay flat)."""
    out: dict = {}
    for name, leaf in flat.items():
        parts = name.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"parameter name {name!r} clashes with a leaf")
        node[parts[-1]] = leaf
    return out


def _dtype_name(x) -> str:
    return np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype).name


def layout_of(tree: PyTree) -> Layout:
    """The :class:`Layout` of a params pytree (shapes and dtypes of leaves).

    Raises:
      ValueError: a leaf is not floating-point (naming it).
    """
    layout = _layout(tree)
    for name, dt in zip(layout.names, layout.dtypes):
        if not np.issubdtype(np.dtype(dt), np.floating) and dt != "bfloat16":
            raise ValueError(
                f"parameter {name!r} has dtype {dt}; FlexMerge merges "
                "floating-point parameters only (remove it from the pytree)"
            )
    return layout


def _layout(tree: PyTree) -> Layout:
    names, leaves, treedef = flatten(tree)
    shapes = tuple(tuple(int(d) for d in np.shape(x)) for x in leaves)
    return Layout(tuple(names), shapes, tuple(_dtype_name(x) for x in leaves), treedef)


def check_finetuned(base: PyTree, finetuned: Sequence[PyTree]) -> Layout:
    """Checks that every fine-tuned pytree matches ``base``; returns its layout.

    Raises:
      ValueError: fewer than 2 tasks, or a task whose structure, shapes or
        dtypes differ from ``base`` (naming the task index and the path).
    """
    if isinstance(finetuned, dict) or not isinstance(finetuned, Sequence):
        raise ValueError(
            "finetuned must be a sequence (list/tuple) of params pytrees, "
            f"got {type(finetuned).__name__}"
        )
    if len(finetuned) < 2:
        raise ValueError(
            f"FlexMerge needs at least 2 fine-tuned models, got {len(finetuned)}"
        )
    layout = layout_of(base)
    for i, ft in enumerate(finetuned):
        msg = layout_mismatch(layout, _layout(ft))
        if msg:
            raise ValueError(f"task {i}: {msg}")
    return layout


def layout_mismatch(ref: Layout, other: Layout, ref_name: str = "base") -> str | None:
    """The first difference of ``other`` from ``ref`` as an error message
    fragment (``"parameter 'w' has shape (3,), base has (4,)"``), or
    ``None`` when names, shapes and dtypes all match."""
    if other.names != ref.names:
        have, want = set(other.names), set(ref.names)
        missing = [n for n in ref.names if n not in have]
        extra = [n for n in other.names if n not in want]
        if missing:
            return (f"parameter {missing[0]!r} of {ref_name} is missing "
                    f"({len(missing)} missing in total)")
        if extra:
            return f"parameter {extra[0]!r} is not in {ref_name} ({len(extra)} extra in total)"
        return f"tree structure differs from {ref_name}"
    for name, s1, s0, d1, d0 in zip(ref.names, other.shapes, ref.shapes, other.dtypes, ref.dtypes):
        if s1 != s0:
            return f"parameter {name!r} has shape {s1}, {ref_name} has {s0}"
        if d1 != d0:
            return f"parameter {name!r} has dtype {d1}, {ref_name} has {d0}"
    return None


def task_vectors(base: PyTree, finetuned: Sequence[PyTree]) -> PyTree:
    r"""Stacked task vectors :math:`\tau_i = \theta_i - \theta_0`.

    Args:
      base: params pytree :math:`\theta_0`.
      finetuned: sequence of n params pytrees :math:`\theta_i` of the same
        structure, shapes and dtypes.

    Returns:
      A params-shaped pytree whose leaves are float32 ``[n, *leaf_shape]``.
      The subtraction is done in float32 (as the reference does).

    Raises:
      ValueError: mismatched trees, or a non-finite task vector entry (names
        the task index and the parameter path).

    Examples:
      >>> import numpy as np
      >>> tv = task_vectors({"w": np.zeros(2)}, [{"w": np.ones(2)},
      ...                                        {"w": -np.ones(2)}])
      >>> tv["w"].shape
      (2, 2)
    """
    layout = check_finetuned(base, finetuned)
    names, base_leaves, treedef = flatten(base)
    ft_leaves = [flatten(ft)[1] for ft in finetuned]
    out = []
    for j, name in enumerate(names):
        b = jnp.asarray(base_leaves[j], jnp.float32)
        tv = jnp.stack([jnp.asarray(f[j], jnp.float32) for f in ft_leaves]) - b[None]
        check_finite(tv, name)
        out.append(tv)
    del layout
    return jax.tree_util.tree_unflatten(treedef, out)


def check_finite(tv: jax.Array, name: str) -> None:
    """Raises ValueError naming the first task with a NaN/Inf in ``tv[i]``."""
    ok = np.asarray(
        jnp.all(jnp.isfinite(tv), axis=tuple(range(1, tv.ndim)))
    )
    if not ok.all():
        i = int(np.argmin(ok))
        raise ValueError(
            f"task {i}: the task vector of parameter {name!r} has NaN or Inf "
            "entries (check the fine-tuned and base checkpoints)"
        )


def apply_task_vector(base: PyTree, tv: PyTree) -> PyTree:
    """Inverse of :func:`task_vectors`: ``base + tv`` leaf-wise.

    ``tv`` may be a single params-shaped task vector or a stacked one with a
    leading ``[n]`` axis (the result then has that axis too). The result is
    cast back to each leaf's dtype.
    """
    def add(b, t):
        b, t = jnp.asarray(b), jnp.asarray(t)
        if t.ndim == b.ndim + 1:  # stacked task vectors [n, ...]
            return (b.astype(jnp.float32)[None] + t).astype(b.dtype)
        if t.shape != b.shape:
            raise ValueError(f"task vector shape {t.shape} does not fit {b.shape}")
        return (b.astype(jnp.float32) + t).astype(b.dtype)

    return jax.tree.map(add, base, tv)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks pytrees of identical structure on a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: splits the leading axis into a list."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    n = leaves[0].shape[0]
    return [
        jax.tree_util.tree_unflatten(treedef, [x[i] for x in leaves])
        for i in range(n)
    ]


# ---------------------------------------------------------------------------- blocks as jit inputs


def canonical(x: dict) -> dict:
    """Renames a block's leaves to positional keys for jitted code.

    The jit cache is keyed by pytree structure, dict keys included: with
    positional keys, blocks of identical shapes (every layer's attention,
    every LayerNorm) share one compilation.
    """
    return {f"{i:05d}": v for i, v in enumerate(x.values())}


def named(out: dict, names) -> dict:
    """Inverse of :func:`canonical` for a dict produced from canonical keys."""
    return dict(zip(names, (out[f"{i:05d}"] for i in range(len(names)))))


@jax.jit
def trim(x: jax.Array, threshold: jax.Array) -> jax.Array:
    """The TIES trim of stacked task vectors ``x: f32[n, ...]``: zeroes the
    entries with ``|x[i]| < threshold[i]`` (``threshold: f32[n]``)."""
    t = threshold.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(jnp.abs(x) >= t, x, jnp.zeros((), x.dtype))


def host_resident(x) -> bool:
    """Whether ``x`` is a NumPy array or a JAX array on one CPU device (its
    data can be read on the host without a transfer)."""
    if isinstance(x, np.ndarray):
        return True
    sh = getattr(x, "sharding", None)
    return (
        isinstance(x, jax.Array) and sh is not None and len(sh.device_set) == 1
        and next(iter(sh.device_set)).platform == "cpu"
    )
