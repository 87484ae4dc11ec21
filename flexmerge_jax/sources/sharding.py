"""Running FlexMerge on a ``jax.sharding.Mesh``.

Task vectors are sharded over **parameter** dimensions with the task axis
unsharded (``P(None, ..., "model", ...)``): merges reduce over tasks, so
they stay local to each device; only whole-block reductions communicate
(Gram matrices and histograms as small all-reduces, block-level sums and
min/max in the kernels). No task vector is ever gathered on one device.

Use ``fm.plan(..., mesh=mesh)`` (or wrap any source in
:class:`ShardedSource`). Each parameter is sharded on its largest dimension
divisible by the mesh axis size (parameters with none stay replicated).
Arrays are placed with ``jax.make_array_from_callback`` from regions of the
inputs, so on several hosts (after ``jax.distributed.initialize()``) each
process reads (from safetensors: byte ranges), subtracts and places only its
own shards. Meshes with ``Auto`` or ``Explicit`` axis types both work.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._source import Source, host_task_vectors

__all__ = ["ShardedSource", "leaf_spec", "check_method"]

def check_axis(mesh: Mesh, axis: str) -> None:
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r} (axes {mesh.axis_names})")


def check_method(method, mesh: Mesh, axis: str = "model") -> None:
    """Raises if ``method`` cannot run with its parameters sharded on ``mesh``."""
    check_axis(mesh, axis)
    explicit = mesh.axis_types[mesh.axis_names.index(axis)] == jax.sharding.AxisType.Explicit
    # Kernels that factor, sort or contract whole parameters (SVD, per-parameter
    # ranks, an inner product over all entries): on ``Auto`` axes XLA gathers what
    # they need; on ``Explicit`` axes JAX makes the caller choose a layout first.
    if explicit and method.traits.whole_parameter:
        raise ValueError(
            f"method {method.name!r} needs whole parameters (SVD / ranks per parameter), which "
            f"a mesh axis of type Explicit does not gather implicitly; use AxisType.Auto for "
            f"{axis!r}"
        )


def leaf_spec(shape: Sequence[int], mesh: Mesh, axis: str = "model") -> P:
    """Spec sharding one parameter of ``shape`` on ``axis`` (largest divisible dim)."""
    size = mesh.shape[axis]
    best = None
    for d, s in enumerate(shape):
        if s % size == 0 and s >= size and (best is None or s > shape[best]):
            best = d
    spec = [None] * len(shape)
    if best is not None and size > 1:
        spec[best] = axis
    return P(*spec)


def spans_processes(mesh: Mesh) -> bool:
    """Whether ``mesh`` holds devices of other processes (``jax.distributed``)."""
    me = jax.process_index()
    return any(d.process_index != me for d in mesh.devices.flat)


class ShardedSource(Source):
    """Wraps a :class:`Source` so every array it returns lives on ``mesh``.

    Args:
      source: where parameters come from (memory or files).
      mesh: the device mesh.
      axis: the mesh axis parameters are sharded over.
    """

    host_capable = False  # its arrays live on the mesh

    def __init__(self, source: Source, mesh: Mesh, axis: str = "model"):
        check_axis(mesh, axis)
        self.inner, self.mesh, self.axis = source, mesh, axis
        # Files: later passes read (and place) the next block in a background
        # thread while this one is computed on, as without a mesh.
        self.prefetch = source.prefetch
        self.main_thread_only = spans_processes(mesh)
        self.layout = source.layout
        self.task_names = source.task_names
        self._shape = dict(zip(self.layout.names, self.layout.shapes))

    def _place(self, name: str, fetch, lead: tuple[int, ...] = ()) -> jax.Array:
        """The global array ``f[*lead, *shape(name)]`` whose shards this
        process holds come from ``fetch(index)`` (``index``: one slice per
        parameter dimension; returns ``[*lead, *region]``). Each distinct
        region is fetched once (devices holding replicas share it), and only
        this process's regions are fetched: on several hosts each reads its
        own slices."""
        spec = leaf_spec(self._shape[name], self.mesh, self.axis)
        sharding = NamedSharding(self.mesh, P(*([None] * len(lead)), *spec))
        shape = (*lead, *self._shape[name])
        fetched: dict = {}

        def shard(idx):
            region = idx[len(lead):]
            key = tuple(s.indices(n)[:2] for s, n in zip(region, self._shape[name]))
            if key not in fetched:
                fetched[key] = fetch(region)
            return fetched[key][idx[:len(lead)]]

        return jax.make_array_from_callback(shape, sharding, shard)

    def base(self, names):
        return {k: self._place(k, lambda idx, k=k: self.inner.base_region(k, idx)) for k in names}

    def finetuned(self, names):
        return list(self.finetuned_tasks(names, range(self.n)).values())

    def finetuned_tasks(self, names, tasks):
        return {int(t): {k: self._place(
            k, lambda idx, k=k, t=t: self.inner.finetuned_region(k, idx, [t])[0]) for k in names}
            for t in tasks}

    def task_vectors(self, names, threshold=None):
        # Per region: float32 subtraction (and trim) on the host, bit for bit
        # the same as on device, from only that region of the inputs.
        def fetch(k, idx):
            base = {k: self.inner.base_region(k, idx)}
            fts = [{k: r} for r in self.inner.finetuned_region(k, idx, range(self.n))]
            return host_task_vectors([k], base, fts, self.task_names, threshold)[k]

        return {k: self._place(k, lambda idx, k=k: fetch(k, idx), lead=(self.n,)) for k in names}

    def sample_runs(self, requests):
        return self.inner.sample_runs(requests)

    def inputs(self, names, tasks, threshold=None, task_vectors=True, out=None):
        del out  # each region is placed on its devices: no flat rows
        if not task_vectors:
            return None, self.finetuned_tasks(names, tasks), None
        reads: dict = {}  # each region of every input read once, for all three

        def read(k, idx):
            key = (k, tuple(s.indices(n)[:2] for s, n in zip(idx, self._shape[k])))
            if key not in reads:
                reads[key] = (self.inner.base_region(k, idx),
                              self.inner.finetuned_region(k, idx, range(self.n)))
            return reads[key]

        def tau(k, idx):  # as task_vectors() computes them
            b, fs = read(k, idx)
            return host_task_vectors([k], {k: b}, [{k: f} for f in fs], self.task_names,
                                     threshold)[k]

        return (
            {k: self._place(k, lambda idx, k=k: read(k, idx)[0]) for k in names},
            {int(t): {k: self._place(k, lambda idx, k=k, t=t: read(k, idx)[1][t]) for k in names}
             for t in tasks},
            {k: self._place(k, lambda idx, k=k: tau(k, idx), lead=(self.n,)) for k in names},
        )

    def describe(self) -> dict:
        return self.inner.describe()

    def changed(self) -> list[str]:
        return self.inner.changed()
