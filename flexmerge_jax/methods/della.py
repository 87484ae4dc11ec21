r"""DELLA: magnitude-ranked random drops (MagPrune), elect, fuse."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp

from ._common import (
    Block,
    as_members,
    check_granularity,
    elected_mean,
    fraction,
    mask_members,
    numeric,
    rank_within,
    static_number,
    task_sum,
)
from ._contract import GroupMerge, Method, Traits


def della_noise(x: Block, key: jax.Array) -> Block:
    """The uniform draws of :func:`magprune`: ``{name: f32[n, ...]}`` in ``[0, 1)``.

    Per parameter key ``fold_in(key, crc32(name))``, per task ``fold_in(., task index)``: a
    task's drops do not depend on the group, on the block's other parameters or on their order.
    """
    out = {}
    for name, v in x.items():
        kp = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        keys = jax.vmap(lambda t, kp=kp: jax.random.fold_in(kp, t))(jnp.arange(v.shape[0]))
        out[name] = jax.vmap(
            lambda kk, shape=v.shape[1:]: jax.random.uniform(kk, shape, jnp.float32)
        )(keys)
    return out


def magprune(
    x: Block,
    *,
    key=None,
    noise=None,
    density=0.5,
    epsilon=0.15,
    rescale=True,
    granularity="node",
) -> Block:
    r"""DELLA's MagPrune on every task (group-independent preprocessing, like DARE).

    In each ranking group of N entries, with :math:`r_j\in\{0..N-1\}` the ascending rank of
    :math:`|\tau_j|`, the keep probability is

    .. math:: p_j=(d-\epsilon)+2\epsilon\,\frac{r_j}{N-1}\quad(N=1:\ p=d),

    the entry is kept iff :math:`u_j<p_j` (:math:`u_j\sim U[0,1)`) and rescaled by
    :math:`1/p_j` (the paper's :math:`1/(1-p^{drop}_j)`).

    Args:
      x: ``{name: f32[n, ...]}``.
      key: PRNG key (see :func:`della_noise`); or
      noise: explicit uniforms ``{name: f32[n, ...]}`` (tests, custom streams).
      density: :math:`d`, the mean keep probability (1 - drop rate). Traceable.
      epsilon: :math:`\epsilon`, half-width of the keep-probability window (mergekit's
        ``epsilon``; the authors' code passes ``epsilon = window_size / 2``). The caller must
        keep :math:`0<d\pm\epsilon\le1`. Traceable.
      rescale: static; ``False`` returns the masked vectors unscaled.
      granularity: ``"node"`` (the authors' code: each row of a torch weight, i.e. each output
        unit) or ``"tensor"`` (their ``rank_magnitude_layer_sampling``). Static.

    Returns:
      ``{name: f32[n, ...]}``.
    """
    check_granularity(granularity)
    if noise is None:
        if key is None:
            raise ValueError("magprune needs a PRNG key (key=jax.random.key(seed)) or noise=")
        noise = della_noise(x, key)
    d = jnp.asarray(density, jnp.float32)
    eps = jnp.asarray(epsilon, jnp.float32)
    out = {}
    for name, v in x.items():
        rank, N = rank_within(jnp.abs(v), granularity)
        if N > 1:
            norm = rank.astype(jnp.float32) / jnp.float32(N - 1)
        else:
            norm = jnp.full(v.shape, 0.5, jnp.float32)
        p = (d - eps) + norm * 2.0 * eps
        keep = noise[name] < p
        val = v / jnp.where(keep, p, 1.0) if rescale else v
        out[name] = jnp.where(keep, val, 0.0)
    return out


def della_fuse(x: Block, members=None, *, scale=1.0) -> Block:
    r"""DELLA's elect + fuse on (pruned) task vectors.

    Elected sign :math:`s=+1` where :math:`\sum_{i\in G}\tau_i\ge0`, else :math:`-1`; the
    entries with exactly that sign (zeros never) are averaged, times :math:`\lambda`.
    """
    members = as_members(x, members)
    s = jnp.asarray(scale, jnp.float32)
    out = {}
    for k, v in x.items():
        sg = jnp.where(task_sum(mask_members(v, members)) >= 0, jnp.float32(1), jnp.float32(-1))
        out[k] = s * elected_mean(v, sg, members)
    return out


def della_merge(
    x: Block,
    members=None,
    *,
    key=None,
    noise=None,
    density=0.5,
    epsilon=0.15,
    scale=1.0,
    rescale=True,
    granularity="node",
) -> Block:
    r"""DELLA-Merging: MagPrune (:func:`magprune`), then elect + fuse (:func:`della_fuse`).

    Args:
      x: ``{name: f32[n, ...]}``; members: ``bool[n]`` (``None``: all).
      key: PRNG key (required unless ``noise`` is given); the draws of a task are the same in
        every group (:func:`della_noise`).
      density, epsilon, rescale, granularity: see :func:`magprune` (defaults: mean drop 0.5,
        mergekit's ``epsilon=0.15``).
      scale: :math:`\lambda` on the fused vector (the authors' ``lambda``, default 1).

    Returns:
      ``{name: f32[...]}``.

    Choices: FusionBench has no DELLA. We follow the authors' code (declare-lab/della_merge, the
    paper's implementation, its ``rank_magnitude`` sparsifier with the ``della_merge`` merge
    method): per-row (per-node) ranks, rank-linear keep probabilities with ranks normalised to
    [0, 1] by ``N - 1``, rescaling of the kept entries by ``1/p`` (the paper's
    :math:`1/(1-p^{drop})`; upstream mergekit's ``della_merge`` rescales by the L1 norm instead),
    sign election "``sum >= 0`` -> +" per entry (not the reference TIES block-majority
    fallback) and the disjoint mean. The mask and probabilities are compared with mergekit's
    ``della_magprune`` (same formula). A singleton ranking group (N = 1) gets
    ``p = density`` (the authors' code divides 0 by 0 there).

    References:
      Deep et al., DELLA-Merging, 2024 (arXiv:2406.11617).
    """
    pruned = magprune(
        x,
        key=key,
        noise=noise,
        density=density,
        epsilon=epsilon,
        rescale=rescale,
        granularity=granularity,
    )
    return della_fuse(pruned, members, scale=scale)


@functools.partial(jax.jit, static_argnames=("density", "epsilon"))
def _pruned(x, key, *, density, epsilon):
    return {"pruned": magprune(x, key=key, density=density, epsilon=epsilon)}


def _block_state(x, info, *, density, epsilon):
    return _pruned(x, info.key, density=density, epsilon=epsilon)


def _merge(x, members, state, *, scale, density, epsilon):
    state = state or {}
    if "pruned" in state:
        return GroupMerge(della_fuse(state["pruned"], members, scale=scale),
                          None, None)
    if "key" not in state:
        raise ValueError("della needs its per-block PRNG key (extra={'key': ...})")
    return GroupMerge(della_merge(x, members, key=state["key"], density=density,
                                          epsilon=epsilon, scale=scale), None, None)


def della(scale=1.0, density: float = 0.5, epsilon: float = 0.15, seed: int = 0) -> Method:
    r"""DELLA: magnitude-ranked random drops (MagPrune), elect, fuse.

    The draws of a task depend only on ``seed``, the block and the parameter,
    so a task is pruned the same way in every group (once per block, shared).

    Args:
      scale: ``jax.typing.ArrayLike`` (traceable, differentiable).
      density, epsilon: keep probabilities ``density +- epsilon`` by
        magnitude rank; static: ranks are order statistics.
      seed: integer seed of the per-block keys.

    References:
      Deep et al., DELLA-Merging, 2024 (arXiv:2406.11617).
    """
    why = "ranks are order statistics"
    fraction("density", density, "della", why)
    eps = static_number("epsilon", epsilon, "della", why)
    if eps < 0 or density - eps <= 0 or density + eps > 1:
        raise ValueError(f"della: need 0 < density - epsilon and density + epsilon <= 1, "
                         f"got density={density}, epsilon={eps}")
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return Method("della", _merge, numeric=(("scale", numeric("scale", scale)),),
                  static=(("density", density), ("epsilon", epsilon)),
                  traits=Traits(whole_parameter=True), block_state=_block_state,
                  seed=int(seed), builtin=True)
