"""Gram matrices of task vectors: the one statistic similarities need.

:func:`block_gram` computes ``G[i, j] = <tau_i, tau_j>`` of one block (host
arrays through BLAS in cache-sized pieces, :class:`GramSum`; device or
sharded arrays through XLA, per-shard products all-reduced);
:func:`streamed_gram` computes it from base and fine-tuned parameters
without materializing the task vectors. Products and sums are float64 by
default so that near-equal similarities are ordered exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg.blas import dgemm, sgemm  # scipy: declared in pyproject.toml

from ..sources._source import tv_chunks
from ..tree import host_resident

__all__ = ["GRAM_PRECISIONS", "gram_dot", "replicated_like", "block_gram", "GramSum",
           "chunked_gram", "streamed_gram", "columns"]

GRAM_PRECISIONS = ("float64", "float32")


@jax.jit
def _gram(leaves: tuple) -> jax.Array:
    g = None
    for x in leaves:
        part = gram_dot(x.astype(jnp.float64), x.astype(jnp.float64))
        g = part if g is None else g + part
    return g


@jax.jit
def _gram32(leaves: tuple) -> jax.Array:
    g = None
    for x in leaves:
        part = gram_dot(x, x)
        g = part if g is None else g + part
    return g


def gram_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """``[n, ...] x [m, ...] -> [n, m]`` contracting every non-task axis.

    No reshape (illegal on explicitly sharded arrays); on a mesh each device
    contracts its shard and the ``[n, m]`` partial sums are all-reduced into
    a replicated result, so no task vector is gathered on one device.
    """
    axes = tuple(range(1, a.ndim))
    return jax.lax.dot_general(
        a, b, ((axes, axes), ((), ())), precision=jax.lax.Precision.HIGHEST,
        out_sharding=replicated_like(a),
    )


def replicated_like(x: jax.Array):
    """A replicated sharding on ``x``'s mesh (``None`` off a mesh)."""
    sh = getattr(x, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
    aval = getattr(x, "aval", None)
    sh = getattr(aval, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding) and sh.mesh.axis_names:
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
    return None


def block_gram(x: dict[str, jax.Array], precision: str = "float64") -> np.ndarray:
    """Gram matrix ``f64[n, n]`` of one block's (preprocessed) task vectors.

    Args:
      x: ``{name: f32[n, ...]}``.
      precision: ``"float64"`` (products and sums in float64: exact decisions
        between near-equal similarities; the default) or ``"float32"``
        (HIGHEST-precision float32 matmul, as the reference computes; much
        faster, relative error ~1e-7).

    Host-resident blocks use the BLAS behind NumPy in cache-sized pieces
    (:class:`GramSum`; XLA's CPU dot reads this ``[n, d] x [d, n]`` shape
    from memory as a whole); device or sharded
    arrays use XLA (sharded: per-shard products, all-reduced).
    """
    if precision not in GRAM_PRECISIONS:
        raise ValueError(f"gram precision must be one of {GRAM_PRECISIONS}, got {precision!r}")
    leaves = tuple(x.values())
    if all(host_resident(v) for v in leaves):
        n = leaves[0].shape[0]
        cols = columns(n)

        def chunks():
            for v in leaves:
                a = np.asarray(v).reshape(n, -1).astype(np.float32, copy=False)
                for j in range(0, a.shape[1], cols):
                    yield a[:, j:j + cols]

        return chunked_gram(chunks(), n, precision)
    if precision == "float32":
        return np.asarray(_gram32(leaves), np.float64)
    with jax.enable_x64(True):
        return np.asarray(_gram(leaves), np.float64)


# Entries (all tasks together) of one host chunk, ~1 MB of float32: small
# enough to stay in cache between computing a chunk and using it, large
# enough that the per-chunk Python overhead stays small.
CHUNK_ENTRIES = 1 << 18
# Entries of one BLAS piece of :class:`GramSum` (256 KB in float64): the
# operands of one ``gemm`` stay in L2.
GEMM_ENTRIES = 1 << 15


def columns(n: int) -> int:
    """Columns per host chunk of ``n`` tasks (see :data:`CHUNK_ENTRIES`)."""
    return max(4096, CHUNK_ENTRIES // n)


def streamed_gram(inputs, names, n: int, precision: str) -> np.ndarray:
    """Gram ``f64[n, n]`` of the raw task vectors of ``names`` from host
    inputs, chunk by chunk.

    NaN/Inf anywhere in a task vector makes its diagonal entry non-finite
    (squares summed in float64 cannot overflow); callers then read the block
    the checked way, which raises naming the parameter.
    """
    return chunked_gram((t for _, t in tv_chunks(*inputs, names, columns(n))), n, precision)


class GramSum:
    """Accumulates ``sum a a^T`` over chunks ``a [n, c]`` (host arrays).

    Each chunk is cut into pieces of at most :attr:`width` columns, copied
    (and widened to float64 for ``precision="float64"``) into one reused
    contiguous buffer of ~256 KB, and multiplied there with BLAS ``gemm``:
    OpenBLAS's ``syrk``, and its ``gemm`` on operands larger than the L2
    cache, stream this ``[n, big] x [big, n]`` shape through memory. Products
    are float64 (``"float64"``) or float32 (``"float32"``), sums across
    pieces float64; the result is mirrored from the upper triangle, so it
    is exactly symmetric.
    """

    def __init__(self, n: int, precision: str = "float64"):
        self._sum = np.zeros((n, n), np.float64)
        self._wide = precision == "float64"
        self.width = max(256, GEMM_ENTRIES // n)
        self._buf = np.empty(n * self.width, np.float64 if self._wide else np.float32)

    def add(self, a: np.ndarray) -> None:
        """Adds ``a a^T`` (``a [n, c]``)."""
        n, c = a.shape
        gemm = dgemm if self._wide else sgemm
        for j in range(0, c, self.width):
            w = min(self.width, c - j)
            s = self._buf[:n * w].reshape(n, w)
            s[...] = a[:, j:j + w]
            self._sum += gemm(1.0, s.T, s.T, trans_a=1)  # s.T: Fortran order, no copy

    def result(self) -> np.ndarray:
        """The symmetric ``f64[n, n]`` sum."""
        u = np.triu(self._sum)
        return u + np.triu(u, 1).T


def chunked_gram(chunks, n: int, precision: str) -> np.ndarray:
    """``sum c c^T`` over float32 chunks ``[n, c]`` (see :class:`GramSum`)."""
    g = GramSum(n, precision)
    for t in chunks:
        g.add(t)
    return g.result()
