"""Flax nnx Vision Transformer of the model zoo, and conversions to/from the
string-keyed parameter dict used everywhere else.

The nnx module is only needed to *build* the zoo and to cross-check the pure
functional apply in :mod:`flexmerge_jax.zoo.apply` (re-exported here); loading
and evaluating the shipped zoo never imports flax.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flexmerge_jax.zoo.apply import (  # noqa: F401  (re-exports)
    CONFIG,
    LN_EPS,
    ViTConfig,
    attn_apply,
    block,
    embed,
    features,
    flatten,
    head_logits,
    layer_norm,
    leaf_names,
    logits,
    mlp_apply,
    num_params,
    param_shapes,
    patchify,
    pool,
    preprocess,
    unflatten,
)

__all__ = [
    "CONFIG",
    "ViTConfig",
    "ViT",
    "params_from_module",
    "module_from_params",
    "apply_module",
    "init_params",
    "init_head",
    "attn_apply",
    "block",
    "embed",
    "features",
    "head_logits",
    "layer_norm",
    "logits",
    "mlp_apply",
    "pool",
]


def _ln(n: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(n, epsilon=LN_EPS, use_fast_variance=False, rngs=rngs)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.patch_size = cfg.patch_size
        self.patch = nnx.Linear(cfg.patch_size * cfg.patch_size, cfg.width, rngs=rngs)
        init = jax.nn.initializers.normal(cfg.width**-0.5)
        self.cls = nnx.Param(init(rngs.params(), (cfg.width,), jnp.float32))
        self.pos = nnx.Param(init(rngs.params(), (cfg.num_tokens, cfg.width), jnp.float32))

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.patch(patchify(preprocess(images), self.patch_size))
        cls = jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.pos[...][None]


class Attention(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.qkv = nnx.Linear(cfg.width, 3 * cfg.width, rngs=rngs)
        self.out = nnx.Linear(cfg.width, cfg.width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, w = x.shape
        hd = w // self.num_heads
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # nnx's reference attention: softmax(q k^T / sqrt(d)) v
        o = nnx.dot_product_attention(q, k, v)
        return self.out(o.reshape(b, t, w))


class MLP(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(cfg.width, cfg.mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(nnx.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        self.ln_1 = _ln(cfg.width, rngs)
        self.attn = Attention(cfg, rngs)
        self.ln_2 = _ln(cfg.width, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nnx.Module):
    """CLIP-like ViT backbone: images ``[B, 28, 28]`` (0..255) -> features ``[B, feat_dim]``."""

    def __init__(self, cfg: ViTConfig = CONFIG, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = PatchEmbed(cfg, rngs)
        self.ln_pre = _ln(cfg.width, rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
        self.ln_post = _ln(cfg.width, rngs)
        self.proj = nnx.Linear(cfg.width, cfg.feat_dim, use_bias=False, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.ln_pre(self.embed(images))
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.ln_post(x[:, 0]))


def _stringify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return tree


def _intify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {(int(k) if k.isdigit() else k): _intify(v) for k, v in tree.items()}
    return tree


def params_from_module(model: ViT) -> dict:
    """nnx module -> nested dict with string keys (list indices become "0", "1", ...)."""
    pure = nnx.state(model, nnx.Param).to_pure_dict()
    return _stringify(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pure))


def module_from_params(params: dict, cfg: ViTConfig = CONFIG) -> ViT:
    """Nested string-keyed dict -> a fresh nnx :class:`ViT` holding those weights."""
    model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))  # no random init work
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, _intify(jax.tree.map(jnp.asarray, params)))
    nnx.update(model, state)
    return model


def apply_module(model: ViT, images: jax.Array) -> jax.Array:
    """Run the nnx module under ``jax.jit`` (split/merge) -> features ``[B, feat_dim]``."""
    graphdef, state = nnx.split(model)
    return _jit_apply(graphdef, state, images)


@partial(jax.jit, static_argnums=0)
def _jit_apply(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def init_params(key: jax.Array | int, cfg: ViTConfig = CONFIG) -> dict:
    """Random initial backbone parameters (via the nnx module)."""
    if not isinstance(key, int):
        key = int(jax.random.randint(key, (), 0, 2**31 - 1))
    return params_from_module(ViT(cfg, rngs=nnx.Rngs(key)))


def init_head(feat_dim: int, n_classes: int) -> dict:
    return {
        "kernel": np.zeros((feat_dim, n_classes), np.float32),
        "bias": np.zeros((n_classes,), np.float32),
    }
