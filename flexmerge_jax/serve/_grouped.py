"""Grouped matmuls: rows in segments, each segment multiplied by its own kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["grouped_matmul", "DENSE_IMPLS"]

DENSE_IMPLS = ("auto", "tiled", "scan", "ragged")


def _default_dense_impl(weight_entries: int | None = None) -> str:
    """TPU: ``ragged`` (a native grouped GEMM); CPU: ``scan`` (measured
    fastest, benchmarks/serve); GPU and others (not measured here): ``tiled``
    while the per-piece kernel gather stays under 2**24 entries, else ``scan``."""
    backend = jax.default_backend()
    if backend == "tpu":
        return "ragged"
    if backend == "cpu":
        return "scan"
    return "tiled" if weight_entries is None or weight_entries <= 2**24 else "scan"


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _auto_tile(rows: int, groups: int, impl: str = "tiled") -> int:
    # rows + (groups-1)*tile computed: a tile of rows/(4 groups) wastes <= 25%.
    return max(8, min(256 if impl == "scan" else 1024, _round_up(-(-rows // (4 * groups)), 8)))


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    group_ids: jax.Array | None = None,
    impl: str = "auto",
    tile: int | None = None,
) -> jax.Array:
    """``y[r] = x[r] @ w[group_ids[segment of r]]`` for rows in segments.

    Args:
      x: ``[m, k]`` rows in consecutive segments (segment j owns
        ``group_sizes[j]`` rows; ``sum(group_sizes) == m``).
      w: ``[g, k, n]`` kernels.
      group_sizes: ``int32[s]`` (data: any split of the rows, one compilation).
      group_ids: ``int32[s]`` the kernel of each segment (data; default
        ``arange(g)``, i.e. ``s == g`` segments sorted by kernel). Several
        segments may use one kernel (no copies, except for ``"ragged"``).
      impl: ``"tiled"`` (rows in static tiles; every (tile, group) piece is one
        batched matmul with its gathered kernel: ``m + (g-1)*tile`` rows of
        work), ``"scan"`` (the same pieces one after the other, no kernel
        gather), ``"ragged"`` (:func:`jax.lax.ragged_dot`: a grouped-GEMM
        kernel on TPU; elsewhere XLA expands it to a dense product over all
        g groups), ``"auto"`` (``ragged`` on TPU, ``scan`` on CPU, ``tiled``
        on GPU unless the kernel gather is large, then ``scan``).
      tile: rows per tile (tiled/scan); default ``~m / (4 s)``, a multiple of 8.

    Returns:
      ``[m, n]``.
    """
    if impl not in DENSE_IMPLS:
        raise ValueError(f"impl must be one of {DENSE_IMPLS}, got {impl!r}")
    m, k = x.shape
    g, _, nout = w.shape
    group_sizes = group_sizes.astype(jnp.int32)
    nseg = int(group_sizes.shape[0])
    if impl == "auto":
        c0 = int(tile) if tile else _auto_tile(m, nseg, "tiled")
        impl = _default_dense_impl((-(-m // c0) + nseg) * k * nout)
    if group_ids is None:
        if nseg != g:
            raise ValueError(f"{nseg} group sizes for {g} kernels: pass group_ids")
    else:
        group_ids = jnp.asarray(group_ids, jnp.int32)
    if impl == "ragged":
        ws = w if group_ids is None else w[group_ids]
        return jax.lax.ragged_dot(x, ws.astype(x.dtype), group_sizes)
    c = int(tile) if tile else _auto_tile(m, nseg, impl)
    t = -(-m // c)
    xp = jnp.pad(x, ((0, t * c - m), (0, 0)))
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    # Pieces: the intervals between all tile starts and all group starts; each
    # lies in one tile and one group (t + g of them, some empty).
    pts = jnp.sort(jnp.concatenate([jnp.arange(t, dtype=jnp.int32) * c, starts]))
    nxt = jnp.concatenate([pts[1:], jnp.full((1,), t * c, jnp.int32)])
    ptile = jnp.minimum(pts // c, t - 1)
    pgroup = jnp.minimum(jnp.searchsorted(ends, pts, side="right"), nseg - 1).astype(jnp.int32)
    if group_ids is not None:
        pgroup = group_ids[pgroup]
    offs = jnp.arange(c, dtype=jnp.int32)[None, :]
    if impl == "tiled":
        xt = xp.reshape(t, c, k)[ptile]
        y = jnp.einsum("ick,ikn->icn", xt, w[pgroup].astype(x.dtype))
        # Row r lies in the last piece starting at or before it (a gather,
        # not a scatter-add: every row is computed by exactly one piece).
        rows = jnp.arange(m, dtype=jnp.int32)
        piece = jnp.searchsorted(pts, rows, side="right").astype(jnp.int32) - 1
        return y.reshape(-1, nout)[piece * c + rows % c]

    # scan
    def body(i, out):
        r0 = ptile[i] * c
        xt = jax.lax.dynamic_slice_in_dim(xp, r0, c, axis=0)
        wi = jax.lax.dynamic_index_in_dim(w, pgroup[i], axis=0, keepdims=False).astype(x.dtype)
        y = xt @ wi
        row = r0 + offs[0]
        keep = (row >= pts[i]) & (row < nxt[i])
        cur = jax.lax.dynamic_slice_in_dim(out, r0, c, axis=0)
        new = jnp.where(keep[:, None], y, cur)
        return jax.lax.dynamic_update_slice_in_dim(out, new, r0, axis=0)

    out = jnp.zeros((t * c, nout), jnp.result_type(x.dtype, w.dtype))
    out = jax.lax.fori_loop(0, t + nseg, body, out)
    return out[:m]
