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


def set_positions(roots: jax.Array) -> jax.Array:
    """Position of each key in ``list(set(roots.tolist()))`` (CPython 3.11).

    Args:
      roots: ``int32[n]`` non-negative keys < n, inserted in this order
        (duplicates allowed).

    Returns:
      ``int32[n]``: ``pos[r]`` is the index of key ``r`` in the iteration
      order for keys present in ``roots``, and ``n`` for absent keys.
    """
    n = roots.shape[0]
    ts = max_table_size(n)
    roots = roots.astype(jnp.int32)

    def insert(i, state):
        table, mask, fill = state
        key = roots[i]
        e = _probe(table, mask, key, stop_on_key=True)
        new = table[e] < 0
        table = jnp.where(new, table.at[e].set(key), table)
        fill = fill + new.astype(jnp.int32)
        grow = new & (fill * 5 >= mask * 3)

        def resize(args):
            table, mask, fill = args
            newsize = jnp.int32(_MINSIZE)
            newsize = jax.lax.while_loop(
                lambda s: s <= fill * 4, lambda s: s << 1, newsize
            )
            nmask = newsize - 1
            fresh = jnp.full((ts,), -1, jnp.int32)

            def move(s, t):
                k = table[s]
                live = (s <= mask) & (k >= 0)
                kk = jnp.where(live, k, 0)
                slot = _probe(t, nmask, kk, stop_on_key=False)
                return jnp.where(live, t.at[slot].set(kk), t)

            return jax.lax.fori_loop(0, ts, move, fresh), nmask, fill

        return jax.lax.cond(grow, resize, lambda a: a, (table, mask, fill))

    table0 = jnp.full((ts,), -1, jnp.int32)
    table, _, _ = jax.lax.fori_loop(
        0, n, insert, (table0, jnp.int32(_MINSIZE - 1), jnp.int32(0))
    )
    occupied = table >= 0
    order = jnp.cumsum(occupied.astype(jnp.int32)) - 1
    pos = jnp.full((n + 1,), n, jnp.int32)
    pos = pos.at[jnp.where(occupied, table, n)].set(jnp.where(occupied, order, n))
    return pos[:n]
