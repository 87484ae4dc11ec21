"""The zoo ViT served by :mod:`flexmerge_jax.serve`: its mixed-task forward and heads.

``serve.Server(model, zoo.vit_forward, per_task={"head": zoo.padded_heads(z.heads)})``
serves any cut of the zoo (any block specification) in one batch of mixed tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..serve import Router
from . import apply as F

__all__ = ["vit_forward", "padded_heads"]


def padded_heads(heads: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The zoo's per-task heads padded to the most classes: zero kernel
    columns and ``-inf`` biases, so padded logits are ``-inf`` (argmax and
    softmax ignore them)."""
    c = max(int(np.shape(h["bias"])[0]) for h in heads)
    out = []
    for h in heads:
        k = np.asarray(h["kernel"], np.float32)
        b = np.asarray(h["bias"], np.float32)
        kp = np.zeros((k.shape[0], c), np.float32)
        kp[:, : k.shape[1]] = k
        bp = np.full((c,), -np.inf, np.float32)
        bp[: b.shape[0]] = b
        out.append({"kernel": kp, "bias": bp})
    return out


def vit_forward(r: Router, images: jax.Array, *, num_heads: int | None = None,
                head: str | None = "head") -> jax.Array:
    """Mixed-task forward of the zoo ViT (:mod:`flexmerge_jax.zoo.apply`).

    Linear layers (patch embedding, qkv, attention output, MLP, ``proj``,
    the head) are grouped matmuls; LayerNorms (``r.apply`` of the zoo's
    :func:`~flexmerge_jax.zoo.apply.layer_norm`) and the class/position
    embeddings are per-row gathers (two vectors a row cost less than grouping
    the rows); attention scores are parameter-free.
    Works with any block specification of the zoo's parameters.

    Args:
      r: the router.
      images: ``[batch, 28, 28]`` pixel values 0..255.
      num_heads: attention heads (default: the zoo's).
      head: per-task head name in the state (``None`` or absent: return the
        backbone features ``[batch, feat_dim]``).

    Returns:
      Logits ``[batch, max classes]`` (``-inf`` beyond a task's classes with
      :func:`padded_heads`) or features.
    """
    nh = num_heads or F.CONFIG.num_heads
    lb = r.state.leaf_block
    patch = int(round(math.sqrt(r.pool("embed/patch/kernel").shape[1])))
    x = F.patchify(F.preprocess(images), patch)
    x = r.dense("embed/patch", x)
    cls = r.param("embed/cls").astype(x.dtype)
    pos = r.param("embed/pos").astype(x.dtype)
    x = jnp.concatenate([cls[:, None, :], x], axis=1) + pos
    x = r.apply("ln_pre", F.layer_norm, x, mode="gather")
    depth = len({lf.split("/")[1] for lf in lb if lf.startswith("blocks/")})
    for i in range(depth):
        p = f"blocks/{i}"
        h = r.apply(f"{p}/ln_1", F.layer_norm, x, mode="gather")
        bsz, t, w = h.shape
        hd = w // nh
        qkv = r.dense(f"{p}/attn/qkv", h).reshape(bsz, t, 3, nh, hd)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd)).astype(h.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(bsz, t, w)
        x = x + r.dense(f"{p}/attn/out", o)
        h = r.apply(f"{p}/ln_2", F.layer_norm, x, mode="gather")
        h = jax.nn.gelu(r.dense(f"{p}/mlp/fc1", h), approximate=False)
        x = x + r.dense(f"{p}/mlp/fc2", h)
    f = r.apply("ln_post", F.layer_norm, x[:, 0], mode="gather")
    f = r.dense("proj", f, bias=None)
    if head is not None and head in r.state.blocks:
        return r.dense(head, f)
    return f
