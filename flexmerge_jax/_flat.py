"""Elementwise merges over a block's parameters flattened into one padded row.

A cut merges every block's groups. Compiled per block structure (the
parameters' shapes) and per number of groups, the merge kernels made a
plan and its cut compile dozens of XLA programs. For methods whose merge
is elementwise (:attr:`~.methods.Traits.elementwise`: each output entry
depends on that entry of the task vectors only, plus block-wide
reductions that zero entries leave unchanged), the block's parameters are
laid end to end in one ``f32[n, P]`` row per task, zero padded to a width
``P`` from a few sizes (:func:`bucket`), and each group is merged by one
program per width: every block structure and group composition of a plan
shares it, and the merged parameters (base added, in the inputs' dtype)
come back as one array sliced into the block's parameters. The arithmetic
is the kernels' own, entry by entry, so the results are bit for bit those
of the per-parameter programs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from .methods._contract import is_traced
from .sources._source import aligned_empty
from .tree import host_resident

# Widths below this share one program (LayerNorms, biases, embeddings of a
# few thousand entries: padding them costs nothing).
MIN_WIDTH = 1 << 14


def bucket(d: int) -> int:
    """The padded width of a block of ``d`` entries: ``MIN_WIDTH``, or
    ``m * 2^e`` with ``m`` in 4..8 (``4 * 2^e <= d``), so less than a fifth
    of a row is padding and blocks within a factor of two of each other
    share at most five widths (programs)."""
    if d <= MIN_WIDTH:
        return MIN_WIDTH
    e = max(0, d.bit_length() - 3)
    return -(-d // (1 << e)) << e


class Layout(NamedTuple):
    """Where each parameter of a block lies in its flat row.

    Attributes:
      names: the block's parameters, in order.
      shapes: their shapes (without the task axis).
      offsets: each one's first column.
      width: the padded width ``P`` (:func:`bucket` of the entries).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    width: int

    @staticmethod
    def of(names, shapes) -> Layout:
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
        offsets = tuple(int(o) for o in np.cumsum([0] + sizes[:-1]))
        return Layout(tuple(names), shapes, offsets, bucket(sum(sizes)))

    @property
    def used(self) -> int:
        """Columns that hold parameters (the rest is padding)."""
        if not self.names:
            return 0
        return self.offsets[-1] + int(np.prod(self.shapes[-1], dtype=np.int64))

    def views(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: [..., *shape]}`` views of ``row: [..., P]`` (no copies;
        slices if ``row`` is a JAX array)."""
        lead = row.shape[:-1]
        return {k: row[..., o:o + int(np.prod(s, dtype=np.int64))].reshape(lead + s)
                for k, o, s in zip(self.names, self.offsets, self.shapes)}

    def pack(self, leaves: dict, lead: tuple[int, ...], out: np.ndarray | None = None):
        """``leaves`` (``{name: [*lead, *shape]}``) as one ``f32[*lead, P]``
        array, zero padded: ``out`` if the leaves are already its views
        (:meth:`views`, as a source that wrote into it hands them back),
        else a fresh 64-byte aligned copy."""
        if out is not None and all(isinstance(v, np.ndarray) and np.may_share_memory(v, out)
                                   for v in leaves.values()):
            out[..., self.used:] = 0
            return out
        flat = aligned_empty(lead + (self.width,), np.float32)
        flat[..., self.used:] = 0
        for k, v in self.views(flat).items():
            v[...] = np.asarray(leaves[k])
        return flat


def rows(method, n: int, numel: int) -> np.ndarray | None:
    """An ``f32[n, P]`` buffer for a block of ``numel`` entries, for the
    source to write the task vectors into (:meth:`~.sources.Source.inputs`
    ``out``), if ``method`` merges flat on this backend; else ``None``."""
    if not (_flat_method(method) and method.sparsify is None):  # DARE's drop makes new arrays
        return None
    return aligned_empty((n, bucket(numel)), np.float32)


def _flat_method(method) -> bool:
    """An elementwise method without per-block state, on the CPU backend."""
    return (method.traits.elementwise and method.block_state is None
            and jax.default_backend() == "cpu")


def applies(method, x: dict) -> bool:
    """Whether ``method`` may merge the block ``x`` flat: an elementwise
    method without per-block state, on host-resident task vectors (a
    sharded or device-resident block keeps its per-parameter programs)."""
    return _flat_method(method) and all(host_resident(v) for v in x.values())


@functools.partial(jax.jit, static_argnames=("static", "dtype"))
def _merge(x, base, members, hp, *, static, dtype):
    """One group's merged parameters ``base + vector`` (``dtype[P]``), masks
    (``bool[n, P]`` or ``None``) and rescalers, from flat rows."""
    gm = static.join(hp).merge_group({"": x}, members, None)
    params = (base + gm.vector[""]).astype(dtype)
    return params, None if gm.masks is None else gm.masks[""], gm.rescalers


def merge(x: np.ndarray, base: np.ndarray, members: np.ndarray, method, scale=None,
          dtype=np.float32):
    """Merges one group of a flat block (see the module docstring).

    Args:
      x: ``f32[n, P]`` the block's preprocessed task vectors (:meth:`Layout.pack`).
      base: ``f32[P]`` the base model's parameters, zero padded.
      members: ``bool[n]`` the group.
      method: an elementwise method (:func:`applies`).
      scale: the group's :math:`\\lambda`, or ``None`` for ``method.scale``.
      dtype: the merged parameters' dtype.

    Returns:
      ``(params dtype[P], masks bool[n, P] or None, rescalers f32[n] or None)``
      as NumPy arrays (tracers when called under ``jit``, ``vmap`` or ``grad``).
    """
    static, hp = method.split()
    if scale is not None and "scale" in hp:
        hp = {**hp, "scale": np.float32(scale)}
    out = _merge(x, base, np.asarray(members, bool), hp, static=static,
                 dtype=np.dtype(dtype).name)
    if any(is_traced(a) for a in jax.tree.leaves(out)):
        return out  # under the caller's jit/vmap/grad: stay traced (Layout.views slices it)
    return jax.tree.map(np.asarray, out)


def row_dtype(dtypes) -> np.dtype:
    """The dtype a block's merged row is computed in, from its parameters'
    dtypes: their common dtype (float64: float32, as the per-parameter
    programs compute them without ``jax_enable_x64``), float32 if they
    differ (then each parameter is cast on the host)."""
    dts = {np.dtype(d) for d in dtypes}
    dt = dts.pop() if len(dts) == 1 else np.dtype(np.float32)
    return np.dtype(np.float32) if dt == np.float64 else dt
