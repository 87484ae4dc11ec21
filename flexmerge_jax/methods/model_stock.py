r"""Model Stock: the mean scaled by a ratio from the members' angles."""

from __future__ import annotations

import jax.numpy as jnp

from ._common import HIGHEST, Block, as_members, group_mean, mask_members, member_count_i32
from ._contract import GroupMerge, Method, Traits


def model_stock_ratio(x: Block, members=None, *, angle_average="angle") -> dict:
    r"""Model Stock's per-tensor interpolation ratio :math:`t` of a group.

    :math:`\cos\theta_{ij}=\langle\tau_i,\tau_j\rangle/(\|\tau_i\|\|\tau_j\|)` (0 if a norm is
    0), averaged over the member pairs :math:`i<j` as angles (``"angle"``: FusionBench,
    :math:`\cos\bar\theta`) or as cosines (``"cosine"``); then

    .. math:: t=\frac{m\cos\theta}{1+(m-1)\cos\theta},

    and :math:`t=1` for a single task. Not clipped: :math:`t` is negative for obtuse angles and
    singular at :math:`\cos\theta=-1/(m-1)` (the paper assumes acute angles).

    Returns:
      ``{name: f32[]}``.
    """
    if angle_average not in ("angle", "cosine"):
        raise ValueError(f"angle_average must be 'angle' or 'cosine', got {angle_average!r}")
    members = as_members(x, members)
    n = members.shape[0]
    mf = member_count_i32(members).astype(jnp.float32)
    ar = jnp.arange(n)
    pair = members[:, None] & members[None, :] & (ar[:, None] < ar[None, :])
    npairs = jnp.sum(pair, dtype=jnp.int32)
    out = {}
    for k, v in x.items():
        f = mask_members(v, members).reshape(n, -1)
        G = jnp.matmul(f, f.T, precision=HIGHEST)
        nrm = jnp.sqrt(jnp.diagonal(G))
        den = nrm[:, None] * nrm[None, :]
        cos = jnp.clip(jnp.where(den > 0, G / jnp.where(den > 0, den, 1.0), 0.0), -1.0, 1.0)
        npf = jnp.maximum(npairs, 1).astype(jnp.float32)
        if angle_average == "angle":
            c = jnp.cos(jnp.sum(jnp.where(pair, jnp.arccos(cos), 0.0)) / npf)
        else:
            c = jnp.sum(jnp.where(pair, cos, 0.0)) / npf
        t = mf * c / (1.0 + (mf - 1.0) * c)
        out[k] = jnp.where(npairs > 0, t, jnp.float32(1.0))
    return out


def model_stock_merge(x: Block, members=None, *, angle_average="angle") -> Block:
    r"""Model Stock in task-vector form: per tensor,
    :math:`\Delta=t\cdot\mathrm{mean}_{i\in G}\tau_i`.

    The paper's :math:`w_H=t\,\bar w+(1-t)\,w_0` with the pretrained :math:`w_0=\theta_0` as
    anchor is :math:`\theta_0+t\,\bar\tau`: the kernel needs nothing from the base beyond the
    task vectors themselves (which must be taken w.r.t. the model the fine-tunes started from,
    the anchor of the angle). :math:`t` from :func:`model_stock_ratio`; no scale
    hyperparameter. One task in gives itself out (:math:`t=1`).

    Args:
      x: ``{name: f32[n, ...]}``; members: ``bool[n]`` (``None``: all).
      angle_average: static; ``"angle"`` (FusionBench: mean of the pairwise angles) or
        ``"cosine"`` (mean of the pairwise cosines).

    Choices: the paper derives :math:`t` for m models assuming one common angle between all
    pairs (its "thin shell" observation) and does not say how to estimate it; FusionBench
    averages the pairwise angles in degrees, mergekit averages cosines (per row). Default:
    FusionBench. FusionBench adds ``1e-8`` to both denominators; we do not (the paper's
    formula; relative difference :math:`\sim10^{-8}/\|\tau\|^2`). "Layer" = one parameter
    tensor (FusionBench: one state-dict key). FusionBench's CLIP config ignores some keys
    (they get :math:`t=1`, the plain group_mean): select them out in the block spec instead.

    References:
      Jang, Yun & Han, Model Stock, ECCV 2024 (arXiv:2403.19522).
    """
    members = as_members(x, members)
    t = model_stock_ratio(x, members, angle_average=angle_average)
    mean = group_mean(x, members)
    return {k: t[k] * mean[k] for k in x}


def _merge(x, members, state):
    del state
    return GroupMerge(model_stock_merge(x, members), None, None)


def model_stock() -> Method:
    r"""Model Stock: :math:`t\cdot\mathrm{mean}(\tau)` with
    :math:`t = m\cos\theta/(1+(m-1)\cos\theta)` from the average angle
    between the group's task vectors, per tensor. No hyperparameters.

    References:
      Jang et al., Model Stock: All we need is just a few fine-tuned models,
      ECCV 2024 (arXiv:2403.19522).
    """
    return Method("model_stock", _merge, traits=Traits(whole_parameter=True), builtin=True)
