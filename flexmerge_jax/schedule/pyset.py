"""CPython set iteration order of small non-negative ints, in ``lax``.

The reference enumerates a block's groups as ``list(set(find(i) for i in
range(n)))``; the pair enumeration order derived from it decides exact ties
(spec §4.2). For small ints ``hash(i) == i``; the order is the slot order of
CPython's open-addressing table (3.11: 8 initial slots, resize to the next
power of two above ``4*used`` when ``5*fill >= 3*mask``, probing that
checks 10 consecutive slots when they fit, then jumps to
``(5*i + 1 + perturb) & mask`` with ``perturb >>= 5``). For n <= 8 (or >= 5
distinct roots with n <= 32) this is ascending root order; otherwise roots
wrap modulo the table size and collide. This module reproduces it exactly,
with fixed shapes, so the greedy loops can be jitted; tests compare it with
real CPython sets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_LINEAR_PROBES = 9
_PERTURB_SHIFT = 5
_MINSIZE = 8


def max_table_size(n: int) -> int:
    """Largest table a set of up to n distinct keys reaches (static bound)."""
    size, fill = _MINSIZE, 0
    for _ in range(n):
        fill += 1
        if fill * 5 >= (size - 1) * 3:
            new = _MINSIZE
            while new <= fill * 4:
                new <<= 1
            size = new
    return size


def _probe(table, mask, key, stop_on_key: bool):
    """First slot, along CPython's probe sequence, that is empty (or == key)."""

    def cond(s):
        e, _, _, _, done = s
        return ~done

    def body(s):
        e, base, perturb, left, _ = s
        hit = (table[e] < 0) | ((table[e] == key) if stop_on_key else False)

        def advance():
            jump = left <= 0
            nperturb = jnp.where(jump, perturb >> _PERTURB_SHIFT, perturb)
            nbase = jnp.where(jump, (base * 5 + 1 + nperturb) & mask, base)
            ne = jnp.where(jump, nbase, e + 1)
            nleft = jnp.where(
                jump,
                jnp.where(nbase + _LINEAR_PROBES <= mask, _LINEAR_PROBES, 0),
                left - 1,
            )
            return ne, nbase, nperturb, nleft

        ne, nbase, nperturb, nleft = advance()
        return (
            jnp.where(hit, e, ne),
            jnp.where(hit, base, nbase),
            jnp.where(hit, perturb, nperturb),
            jnp.where(hit, left, nleft),
            hit,
        )

    start = key & mask
    left0 = jnp.where(start + _LINEAR_PROBES <= mask, _LINEAR_PROBES, 0)
    init = (start, start, key, left0, jnp.bool_(False))
    return jax.lax.while_loop(cond, body, init)[0]


def _resize_points(n: int) -> list[tuple[int, int]]:
    """``(fill, new_size)`` for each resize a set of up to n distinct keys
    goes through: inserting the ``fill``-th key triggers a rebuild into a
    table of ``new_size`` slots (static: it depends on the count only)."""
    out, size = [], _MINSIZE
    for fill in range(1, n + 1):
        if fill * 5 >= (size - 1) * 3:
            new = _MINSIZE
            while new <= fill * 4:
                new <<= 1
            out.append((fill, new))
            size = new
    return out


def set_positions(roots: jax.Array) -> jax.Array:
    """Position of each key in ``list(set(roots.tolist()))`` (CPython 3.11).

    Args:
      roots: ``int32[n]`` non-negative keys < n, inserted in this order
        (duplicates allowed).

    Returns:
      ``int32[n]``: ``pos[r]`` is the index of key ``r`` in the iteration
      order for keys present in ``roots``, and ``n`` for absent keys.

    Duplicates never change a set, so the distinct keys are inserted in
    order of first appearance; the table is rebuilt (CPython's
    ``set_table_resize``: old slots in order, reinserted by probing) at fill
    counts known statically, so the loop is a fixed sequence of insert
    phases and rebuilds, with no data-dependent ``cond`` (which ``vmap``
    would turn into running every rebuild at every insertion).
    """
    n = roots.shape[0]
    ts = max_table_size(n)
    roots = roots.astype(jnp.int32)
    idx = jnp.arange(n, dtype=jnp.int32)
    first = jnp.full((n,), n, jnp.int32).at[roots].min(idx)  # first appearance of each key
    distinct = jnp.argsort(first).astype(jnp.int32)  # present keys first, in insertion order
    count = jnp.sum(first < n)

    def insert_range(table, mask, lo, hi):
        def body(j, t):
            key = distinct[j]
            slot = _probe(t, mask, key, stop_on_key=False)
            return jnp.where(j < count, t.at[slot].set(key), t)

        return jax.lax.fori_loop(lo, hi, body, table)

    def rebuild(table, old_size, new_size):
        fresh = jnp.full((ts,), -1, jnp.int32)

        def move(s, t):
            k = table[s]
            slot = _probe(t, jnp.int32(new_size - 1), jnp.maximum(k, 0), stop_on_key=False)
            return jnp.where(k >= 0, t.at[slot].set(k), t)

        return jax.lax.fori_loop(0, old_size, move, fresh)

    table = jnp.full((ts,), -1, jnp.int32)
    size, lo = _MINSIZE, 0
    for fill, new_size in _resize_points(n):
        table = insert_range(table, jnp.int32(size - 1), lo, fill)
        table = jnp.where(count >= fill, rebuild(table, size, new_size), table)
        size, lo = new_size, fill
    table = insert_range(table, jnp.int32(size - 1), lo, n)
    occupied = table >= 0
    order = jnp.cumsum(occupied.astype(jnp.int32)) - 1
    pos = jnp.full((n + 1,), n, jnp.int32)
    pos = pos.at[jnp.where(occupied, table, n)].set(jnp.where(occupied, order, n))
    return pos[:n]
