"""EMR-Merging: unified vector, per-task masks and rescalers."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._common import Block, as_members, mask_members, member_count, per_task, task_sum
from ._contract import GroupMerge, Method, Traits


def _task_max(x: jax.Array) -> jax.Array:
    """Maximum over the leading task axis, as an unrolled elementwise chain.

    XLA's CPU reduction over the leading axis materializes its operand (one
    more pass over memory); the chain fuses with whatever computes ``x``.
    """
    acc = x[0]
    for k in range(1, x.shape[0]):
        acc = jnp.maximum(acc, x[k])
    return acc


class EmrResult(NamedTuple):
    """EMR output: unified vector, per-task boolean masks and rescalers."""

    unified: Block  # {name: f32[...]}
    masks: Block  # {name: bool[n, ...]} (False for non-members)
    rescalers: jax.Array  # f32[n] (1 for non-members)


def emr_merge(x: Block, members=None) -> EmrResult:
    r"""EMR-Merging of a group, with the reference's per-block rescalers.

    Per tensor :math:`\ell`: :math:`\mu=\mathrm{mean}_k x_k`, flag
    :math:`=+1` where :math:`\mu>0` else :math:`-1`;
    :math:`M_k=[x_k\cdot\mathrm{flag}>0]`;
    :math:`v=\mathrm{flag}\cdot\max_k|M_k x_k|`. Rescaler
    :math:`\gamma_k=\sum_\ell\mathrm{mean}|x_k[\ell]| /
    \sum_\ell\mathrm{mean}|v[\ell]\odot M_k[\ell]|` — a sum over the block's
    tensors of per-tensor means (the reference's quirk; the original EMR uses
    whole-model sums). Deployed: :math:`\theta_0+\gamma_k M_k\odot v`.

    Where the denominator is 0 (task vector zero on the block, e.g. a frozen
    layer) the reference yields NaN parameters; the rescaler is 1 here.

    Returns:
      :class:`EmrResult` with ``unified`` ``{name: f32[...]}``, ``masks``
      ``{name: bool[n, ...]}`` and ``rescalers`` ``f32[n]``.
    """
    members = as_members(x, members)
    m = member_count(members)
    unified, masks = {}, {}
    num = None
    den = None
    for k, v in x.items():
        vm = mask_members(v, members)
        mu = task_sum(vm) / m
        flag = jnp.where(mu > 0, jnp.float32(1), jnp.float32(-1))
        mk = ((v * flag[None]) > 0) & per_task(members, v)
        u = flag * _task_max(jnp.abs(jnp.where(mk, v, 0.0)))
        unified[k], masks[k] = u, mk
        red = tuple(range(1, v.ndim))
        a = jnp.mean(jnp.abs(v), axis=red) if red else jnp.abs(v)
        b = jnp.mean(jnp.abs(jnp.where(mk, u[None], 0.0)), axis=red) if red else jnp.abs(
            jnp.where(mk, u[None], 0.0)
        )
        num = a if num is None else num + a
        den = b if den is None else den + b
    # den == 0 (the task's mask selects nothing, e.g. a frozen, all-zero
    # block): the reference divides by zero and deploys NaN; M_k * v is 0
    # there whatever the rescaler, so we use 1 (deliberate deviation).
    ok = members & (den > 0)
    rescalers = jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.float32(1))
    return EmrResult(unified, masks, rescalers)


def _merge(x, members, state):
    del state
    r = emr_merge(x, members)
    return GroupMerge(r.unified, r.masks, r.rescalers)


def emr() -> Method:
    """EMR-Merging: unified vector, per-task masks and rescalers (no lambda).

    References:
      Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging,
      NeurIPS 2024 (arXiv:2405.17461).
    """
    return Method("emr", _merge, traits=Traits(uses_masks=True), builtin=True)
