"""An independent PyTorch forward of a Hugging Face ``BertModel`` checkpoint.

Written from ``transformers``' ``BertModel`` (eager attention) and
sentence-transformers' mean pooling + ``Normalize``, directly on the HF names
and PyTorch layouts (``F.linear`` with ``(out, in)`` weights; no name mapping
and no transposition), so it checks :mod:`bert` *and* the importer. Needs only
``torch`` (CPU wheel): ``pip install torch==2.13.0``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _t(sd, name):
    return torch.from_numpy(np.ascontiguousarray(sd[name]))


@torch.no_grad()
def encode(state_dict: dict, input_ids, attention_mask, token_type_ids=None, *, num_heads: int,
           eps: float = 1e-12, prefix: str = "") -> np.ndarray:
    """``last_hidden_state`` ``[B, T, H]`` (float32 numpy) from HF-named numpy tensors."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.float32)
    types = (torch.zeros_like(ids) if token_type_ids is None
             else torch.as_tensor(np.asarray(token_type_ids), dtype=torch.long))
    b, t = ids.shape
    pos = torch.arange(t)[None].expand(b, t)
    x = (F.embedding(ids, _t(sd, "embeddings.word_embeddings.weight"))
         + F.embedding(types, _t(sd, "embeddings.token_type_embeddings.weight"))
         + F.embedding(pos, _t(sd, "embeddings.position_embeddings.weight")))
    h = x.shape[-1]

    def ln(y, p):
        return F.layer_norm(y, (h,), _t(sd, p + ".weight"), _t(sd, p + ".bias"), eps)

    def lin(y, p):
        return F.linear(y, _t(sd, p + ".weight"), _t(sd, p + ".bias"))

    x = ln(x, "embeddings.LayerNorm")
    ext = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
    hd = h // num_heads
    i = 0
    while f"encoder.layer.{i}.attention.self.query.weight" in sd:
        p = f"encoder.layer.{i}"

        def heads(y):
            return y.view(b, t, num_heads, hd).transpose(1, 2)

        q = heads(lin(x, p + ".attention.self.query"))
        k = heads(lin(x, p + ".attention.self.key"))
        v = heads(lin(x, p + ".attention.self.value"))
        scores = torch.matmul(q, k.transpose(-1, -2)) / np.sqrt(hd) + ext
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(b, t, h)
        x = ln(lin(ctx, p + ".attention.output.dense") + x, p + ".attention.output.LayerNorm")
        mid = F.gelu(lin(x, p + ".intermediate.dense"))  # exact erf GELU
        x = ln(lin(mid, p + ".output.dense") + x, p + ".output.LayerNorm")
        i += 1
    return x.numpy()


def sentence_embedding(state_dict: dict, input_ids, attention_mask, token_type_ids=None, *,
                       num_heads: int, eps: float = 1e-12) -> np.ndarray:
    """sentence-transformers' Pooling(mean) + Normalize on :func:`encode`."""
    hid = torch.from_numpy(encode(state_dict, input_ids, attention_mask, token_type_ids,
                                  num_heads=num_heads, eps=eps))
    m = torch.as_tensor(np.asarray(attention_mask), dtype=torch.float32)[..., None]
    e = (hid * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    return F.normalize(e, p=2, dim=1).numpy()
