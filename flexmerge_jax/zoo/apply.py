"""Pure-JAX functional apply of the zoo Vision Transformer (no flax needed).

The backbone parameters are a nested dict with string keys only. Leaf paths
(joined with "/") are::

    embed/patch/kernel   [patch*patch, width]   (flattened-patch linear, (in, out))
    embed/patch/bias     [width]
    embed/cls            [width]
    embed/pos            [1 + num_patches, width]
    ln_pre/{scale,bias}  [width]
    blocks/<i>/ln_1/{scale,bias}        [width]
    blocks/<i>/attn/qkv/kernel          [width, 3*width]  (q | k | v, heads contiguous)
    blocks/<i>/attn/qkv/bias            [3*width]
    blocks/<i>/attn/out/{kernel,bias}   [width, width], [width]
    blocks/<i>/ln_2/{scale,bias}        [width]
    blocks/<i>/mlp/fc1/{kernel,bias}    [width, mlp_dim], [mlp_dim]
    blocks/<i>/mlp/fc2/{kernel,bias}    [mlp_dim, width], [width]
    ln_post/{scale,bias} [width]
    proj/kernel          [width, feat_dim]

Images are ``[batch, 28, 28]`` (or ``[batch, 28, 28, 1]``) with pixel values in
``[0, 255]`` (uint8 or float); :func:`embed` scales them to ``[-1, 1]``.

A per-task classification head is ``{"kernel": [feat_dim, n_classes],
"bias": [n_classes]}`` and is *not* part of the backbone.

Everything here is written layer by layer so that callers can run the network
block by block::

    x = embed(params, images)
    for i in range(num_blocks(params)):
        x = block(params["blocks"][str(i)], x)
    feats = pool(params, x)          # ln_post on the class token, then proj
    logits = head_logits(head, feats)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Params = Mapping[str, Any]

LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of the zoo ViT."""

    image_size: int = 28
    patch_size: int = 7
    width: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    feat_dim: int = 64

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ViTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


CONFIG = ViTConfig()


def leaf_names(depth: int = CONFIG.depth) -> list[str]:
    """The exact "/"-joined leaf names of a backbone with ``depth`` blocks."""
    names = [
        "embed/patch/kernel",
        "embed/patch/bias",
        "embed/cls",
        "embed/pos",
        "ln_pre/scale",
        "ln_pre/bias",
    ]
    for i in range(depth):
        b = f"blocks/{i}"
        names += [
            f"{b}/ln_1/scale",
            f"{b}/ln_1/bias",
            f"{b}/attn/qkv/kernel",
            f"{b}/attn/qkv/bias",
            f"{b}/attn/out/kernel",
            f"{b}/attn/out/bias",
            f"{b}/ln_2/scale",
            f"{b}/ln_2/bias",
            f"{b}/mlp/fc1/kernel",
            f"{b}/mlp/fc1/bias",
            f"{b}/mlp/fc2/kernel",
            f"{b}/mlp/fc2/bias",
        ]
    names += ["ln_post/scale", "ln_post/bias", "proj/kernel"]
    return names


def param_shapes(cfg: ViTConfig = CONFIG) -> dict[str, tuple[int, ...]]:
    """Expected shape of every leaf, keyed by "/"-joined name."""
    w, m = cfg.width, cfg.mlp_dim
    shapes = {
        "embed/patch/kernel": (cfg.patch_size * cfg.patch_size, w),
        "embed/patch/bias": (w,),
        "embed/cls": (w,),
        "embed/pos": (cfg.num_tokens, w),
        "ln_pre/scale": (w,),
        "ln_pre/bias": (w,),
    }
    for i in range(cfg.depth):
        b = f"blocks/{i}"
        shapes.update(
            {
                f"{b}/ln_1/scale": (w,),
                f"{b}/ln_1/bias": (w,),
                f"{b}/attn/qkv/kernel": (w, 3 * w),
                f"{b}/attn/qkv/bias": (3 * w,),
                f"{b}/attn/out/kernel": (w, w),
                f"{b}/attn/out/bias": (w,),
                f"{b}/ln_2/scale": (w,),
                f"{b}/ln_2/bias": (w,),
                f"{b}/mlp/fc1/kernel": (w, m),
                f"{b}/mlp/fc1/bias": (m,),
                f"{b}/mlp/fc2/kernel": (m, w),
                f"{b}/mlp/fc2/bias": (w,),
            }
        )
    shapes.update(
        {"ln_post/scale": (w,), "ln_post/bias": (w,), "proj/kernel": (w, cfg.feat_dim)}
    )
    return shapes


# ---------------------------------------------------------------- flat <-> nested


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    """Nested string-keyed dict -> {"a/b/c": leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested string-keyed dict."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def num_blocks(params: Params) -> int:
    return len(params["blocks"])


def num_params(params: Params) -> int:
    return int(sum(int(x.size) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------- layers
# All broadcasts are explicit (works under jax_numpy_rank_promotion="raise").


def _lift(v: jax.Array, ndim: int) -> jax.Array:
    """Prepend singleton axes to ``v`` up to rank ``ndim``."""
    v = jnp.asarray(v)
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def layer_norm(p: Params, x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm over the last axis with ``p = {"scale", "bias"}``."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    scale, bias = _lift(p["scale"], x.ndim), _lift(p["bias"], x.ndim)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def dense(p: Params, x: jax.Array) -> jax.Array:
    y = x @ p["kernel"]
    if "bias" in p:
        y = y + _lift(p["bias"], y.ndim)
    return y


def attn_apply(p: Params, x: jax.Array, num_heads: int = CONFIG.num_heads) -> jax.Array:
    """Multi-head self-attention with packed ``qkv`` and ``out`` projections.

    ``x`` is ``[..., tokens, width]``.
    """
    *lead, t, w = x.shape
    hd = w // num_heads
    qkv = dense(p["qkv"], x).reshape(*lead, t, 3, num_heads, hd)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(jnp.float32(hd))
    weights = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*lead, t, w)
    return dense(p["out"], o)


def mlp_apply(p: Params, x: jax.Array) -> jax.Array:
    """``fc2(gelu(fc1(x)))`` with the exact (erf) GELU."""
    return dense(p["fc2"], jax.nn.gelu(dense(p["fc1"], x), approximate=False))


def block(p: Params, x: jax.Array, num_heads: int = CONFIG.num_heads) -> jax.Array:
    """One pre-LN residual block; ``p`` is ``params["blocks"][str(i)]``."""
    x = x + attn_apply(p["attn"], layer_norm(p["ln_1"], x), num_heads)
    x = x + mlp_apply(p["mlp"], layer_norm(p["ln_2"], x))
    return x


def patchify(images: jax.Array, patch_size: int = CONFIG.patch_size) -> jax.Array:
    """``[B, H, W]`` or ``[B, H, W, 1]`` -> ``[B, num_patches, patch*patch]``.

    Patches are taken in row-major order; pixels within a patch are row-major.
    """
    x = jnp.asarray(images)
    if x.ndim == 4:
        x = x[..., 0]
    b, h, w = x.shape
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(b, gh, patch_size, gw, patch_size).transpose(0, 1, 3, 2, 4)
    return x.reshape(b, gh * gw, patch_size * patch_size)


def preprocess(images: jax.Array) -> jax.Array:
    """Pixel values in [0, 255] -> float32 in [-1, 1]."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def embed(params: Params, images: jax.Array) -> jax.Array:
    """Images -> tokens ``[B, 1 + num_patches, width]`` (after ``ln_pre``)."""
    e = params["embed"]
    p = e["patch"]["kernel"].shape[0]
    patch_size = int(round(p**0.5))
    x = dense(e["patch"], patchify(preprocess(images), patch_size))
    cls = jnp.broadcast_to(e["cls"], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
    x = jnp.concatenate([cls, x], axis=1) + _lift(e["pos"], 3)
    return layer_norm(params["ln_pre"], x)


def pool(params: Params, tokens: jax.Array) -> jax.Array:
    """``ln_post`` on the class token, then ``proj`` -> ``[B, feat_dim]``."""
    return layer_norm(params["ln_post"], tokens[:, 0]) @ params["proj"]["kernel"]


def features(params: Params, images: jax.Array, num_heads: int = CONFIG.num_heads) -> jax.Array:
    """Backbone features ``[B, feat_dim]``."""
    x = embed(params, images)
    for i in range(num_blocks(params)):
        x = block(params["blocks"][str(i)], x, num_heads)
    return pool(params, x)


def head_logits(head: Params, feats: jax.Array) -> jax.Array:
    """Linear classification head: ``feats @ kernel + bias``."""
    return feats @ head["kernel"] + _lift(head["bias"], feats.ndim)


def logits(
    params: Params, head: Params, images: jax.Array, num_heads: int = CONFIG.num_heads
) -> jax.Array:
    return head_logits(head, features(params, images, num_heads))
