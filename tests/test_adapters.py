"""Importers/exporters: flax nnx, flax linen, Hugging Face safetensors (exact round trips)."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import adapters
from flexmerge_jax.adapters import NameMap, bert_mapping, from_hf, load_hf, save_hf, to_hf
from flexmerge_jax.tree import flatten


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _trees_bit_equal(a, b) -> bool:
    na, la, _ = flatten(a)
    nb, lb, _ = flatten(b)
    return na == nb and all(_bits_equal(x, y) for x, y in zip(la, lb))


# --------------------------------------------------------------------------- nnx


def _nnx_model(seed=0):
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln = nnx.LayerNorm(8, rngs=rngs)
            self.fc = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return x + self.fc(self.ln(x))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(4, 8, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(3)])
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 2, use_bias=False, rngs=rngs, param_dtype=jnp.bfloat16)

        def __call__(self, x):
            x = self.embed(x)
            for b in self.blocks:
                x = b(x)
            return self.head(self.bn(x, use_running_average=True).astype(jnp.bfloat16))

    return Net(nnx.Rngs(seed))


def test_nnx_names_and_exact_round_trip():
    from flax import nnx

    m = _nnx_model(0)
    p = adapters.from_nnx(m)
    names = flatten(p)[0]
    assert "blocks/2/fc/kernel" in names and "head/kernel" in names
    assert "bn/scale" in names and "bn/mean" not in names  # Params only: no BatchStats
    assert all(isinstance(k, str) for k in p["blocks"])
    assert p["head"]["kernel"].dtype == jnp.bfloat16

    other = _nnx_model(1)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    new = adapters.to_nnx(p, other)
    assert new is not other
    assert _trees_bit_equal(adapters.from_nnx(new), p)
    assert not _trees_bit_equal(adapters.from_nnx(other), p)  # the source module untouched
    # BatchStats are not Params: new keeps other's; copy them to compare outputs
    full = adapters.from_nnx(m, (nnx.Param, nnx.BatchStat))
    assert "bn/mean" in flatten(full)[0]
    new_full = adapters.to_nnx(full, other, filter=(nnx.Param, nnx.BatchStat))
    assert _bits_equal(new_full(x), m(x))
    # in place, from a state, into an abstract module (eval_shape)
    same = adapters.to_nnx(p, other, inplace=True)
    assert same is other and _trees_bit_equal(adapters.from_nnx(other), p)
    _, state = nnx.split(m, nnx.Param, ...)[:2]
    assert _trees_bit_equal(adapters.from_nnx(state), p)
    abstract = nnx.eval_shape(lambda: _nnx_model(7))
    assert _trees_bit_equal(adapters.from_nnx(adapters.to_nnx(p, abstract)), p)


def test_nnx_errors_and_numpy_leaves():
    m = _nnx_model(0)
    p = adapters.from_nnx(m)
    host = jax.tree.map(np.asarray, p)  # e.g. as read from a file
    assert _trees_bit_equal(adapters.from_nnx(adapters.to_nnx(host, _nnx_model(2))), p)
    bad = dict(p)
    del bad["embed"]
    with pytest.raises(ValueError, match="lack 'embed/bias'"):
        adapters.to_nnx(bad, m)
    with pytest.raises(ValueError, match="'zzz'"):
        adapters.to_nnx({**p, "zzz": np.zeros(1)}, m)
    wrong = jax.tree.map(lambda a: a, p)
    wrong["embed"]["kernel"] = np.zeros((8, 4), np.float32)
    with pytest.raises(ValueError, match=r"'embed/kernel' has shape \(8, 4\)"):
        adapters.to_nnx(wrong, m)
    with pytest.raises(ValueError, match="nnx.Module or nnx.State"):
        adapters.from_nnx({"a": 1})


def test_nnx_plan_end_to_end():
    from flax import nnx

    base = adapters.from_nnx(_nnx_model(0))
    rng = np.random.default_rng(0)
    fts = [jax.tree.map(lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(a.dtype), base)
           for _ in range(3)]
    plan = fm.plan(base, fts, blocks=fm.blocks.by_layer(), method=fm.methods.ties(keep=0.5))
    abstract = nnx.eval_shape(lambda: _nnx_model(3))
    # keeps its BatchStats
    merged = adapters.to_nnx(plan.at_size(1.0).params_for_task(2), _nnx_model(3))
    assert merged.head.kernel[...].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(merged(jnp.ones((2, 4))), np.float32)).all()
    # at full size every task gets its own weights back, bitwise, through the module
    own = adapters.to_nnx(plan.at_step(0).params_for_task(1), abstract)
    assert _trees_bit_equal(jax.tree.map(np.asarray, adapters.from_nnx(own)),
                            jax.tree.map(np.asarray, fts[1]))


# --------------------------------------------------------------------------- linen


def test_linen_exact_round_trip():
    from flax import linen as nn
    from flax.core import FrozenDict, freeze

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dense(6, name="fc1")(x)
            x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
            return nn.Dense(2, name="fc2")(nn.relu(x))

    net = Net()
    x = jnp.ones((3, 5))
    v0 = net.init(jax.random.PRNGKey(0), x)
    v1 = net.init(jax.random.PRNGKey(1), x)
    p = adapters.from_linen(v0)
    assert sorted(flatten(p)[0]) == ["bn/bias", "bn/scale", "fc1/bias", "fc1/kernel", "fc2/bias",
                                     "fc2/kernel"]
    new = adapters.to_linen(p, v1)
    assert _trees_bit_equal(adapters.from_linen(new), p)
    assert _trees_bit_equal(new["batch_stats"], v1["batch_stats"])  # other collections kept
    assert _bits_equal(net.apply(adapters.to_linen(p, v1 | {"batch_stats": v0["batch_stats"]}), x),
                       net.apply(v0, x))
    frozen = adapters.to_linen(jax.tree.map(np.asarray, p), freeze(v1))
    assert isinstance(frozen, FrozenDict)
    assert _trees_bit_equal(adapters.from_linen(frozen), p)
    assert adapters.from_linen(freeze(v0)).__class__ is dict
    with pytest.raises(ValueError, match="no 'params' collection"):
        adapters.from_linen({"batch_stats": {}})
    with pytest.raises(ValueError, match="lack 'fc2/kernel'"):
        adapters.to_linen({"fc1": p["fc1"], "bn": p["bn"], "fc2": {"bias": p["fc2"]["bias"]}}, v1)


# --------------------------------------------------------------------------- Hugging Face


def tiny_hf_bert(seed=0, layers=2, hidden=8, ffn=16, vocab=11, pos=7, pooler=True, prefix=""):
    """A random HF-named BertModel state dict (numpy), with the position_ids buffer."""
    rng = np.random.default_rng(seed)
    sd = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (pos, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            sd[f"encoder.layer.{i}.{m}.weight"] = (hidden, hidden)
            sd[f"encoder.layer.{i}.{m}.bias"] = (hidden,)
        sd[f"encoder.layer.{i}.intermediate.dense.weight"] = (ffn, hidden)
        sd[f"encoder.layer.{i}.intermediate.dense.bias"] = (ffn,)
        sd[f"encoder.layer.{i}.output.dense.weight"] = (hidden, ffn)
        sd[f"encoder.layer.{i}.output.dense.bias"] = (hidden,)
        for m in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[f"encoder.layer.{i}.{m}.weight"] = (hidden,)
            sd[f"encoder.layer.{i}.{m}.bias"] = (hidden,)
    if pooler:
        sd["pooler.dense.weight"] = (hidden, hidden)
        sd["pooler.dense.bias"] = (hidden,)
    out = {prefix + k: rng.standard_normal(s).astype(np.float32) for k, s in sd.items()}
    out[prefix + "embeddings.position_ids"] = np.arange(pos, dtype=np.int64)[None]
    return out


def test_bert_mapping_names_and_transpose():
    sd = tiny_hf_bert()
    p = from_hf(sd, bert_mapping())
    names = flatten(p)[0]
    assert "embeddings/position_ids" not in names and len(names) == len(sd) - 1
    q = p["encoder"]["layer"]["1"]["attention"]["self"]["query"]
    assert _bits_equal(q["kernel"], sd["encoder.layer.1.attention.self.query.weight"].T.copy())
    assert q["kernel"].flags["C_CONTIGUOUS"]
    ffn = p["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    assert ffn.shape == (8, 16)  # Flax (in, out)
    assert _bits_equal(p["embeddings"]["word_embeddings"]["embedding"],
                       sd["embeddings.word_embeddings.weight"])  # embeddings never transposed
    assert set(p["embeddings"]["LayerNorm"]) == {"scale", "bias"}
    # back to HF: exact, position_ids re-added as an extra
    back = to_hf(p, bert_mapping(),
                 extra={"embeddings.position_ids": sd["embeddings.position_ids"]})
    assert set(back) == set(sd) and all(_bits_equal(back[k], sd[k]) for k in sd)
    # the mapping's inverse is exact on every name
    m = bert_mapping()
    assert all(m.inverse(m.forward(k)) == k for k in sd if "position_ids" not in k)
    # legacy TF names
    assert (m.forward("encoder.layer.0.output.LayerNorm.gamma")
            == "encoder/layer/0/output/LayerNorm/scale")
    assert m.forward("embeddings.LayerNorm.beta") == "embeddings/LayerNorm/bias"


def test_bert_mapping_prefix_keeps_heads():
    sd = tiny_hf_bert(prefix="bert.")
    sd["classifier.weight"] = np.ones((3, 8), np.float32)
    sd["classifier.bias"] = np.zeros(3, np.float32)
    m = bert_mapping(prefix="bert.")
    p = from_hf(sd, m)
    assert p["classifier"]["kernel"].shape == (8, 3) and "bert" not in p
    back = to_hf(p, m, extra={"bert.embeddings.position_ids": sd["bert.embeddings.position_ids"]})
    assert set(back) == set(sd) and all(_bits_equal(back[k], sd[k]) for k in sd)


def test_safetensors_file_round_trip_is_bytewise(tmp_path):
    from safetensors.numpy import save_file

    sd = tiny_hf_bert(3)
    src = tmp_path / "model.safetensors"
    save_file(sd, str(src))
    params = load_hf(src, bert_mapping())
    out = save_hf(tmp_path / "out" / "model.safetensors", params, bert_mapping(),
                  extra={"embeddings.position_ids": sd["embeddings.position_ids"]})
    assert out.read_bytes() == src.read_bytes()
    # jax leaves export the same way
    out2 = save_hf(tmp_path / "out2.safetensors", jax.tree.map(jnp.asarray, params), bert_mapping(),
                   extra={"embeddings.position_ids": sd["embeddings.position_ids"]})
    assert out2.read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match="exists"):
        save_hf(out, params, bert_mapping())
    with pytest.raises(ValueError, match="writes .safetensors or .npz"):
        save_hf(tmp_path / "x.bin", params, bert_mapping())


def test_npz_round_trip(tmp_path):
    sd = tiny_hf_bert(4)
    sd.pop("embeddings.position_ids")
    np.savez(tmp_path / "hf.npz", **sd)
    params = load_hf(tmp_path / "hf.npz", bert_mapping())
    save_hf(tmp_path / "back.npz", params, bert_mapping())
    with np.load(tmp_path / "back.npz") as z:
        back = {k: z[k] for k in z.files}
    assert set(back) == set(sd) and all(_bits_equal(back[k], sd[k]) for k in sd)
    # and params through the plain io npz writer/reader
    fm_io = pytest.importorskip("flexmerge_jax.sources.files")
    fm_io.save_params(tmp_path / "flax.npz", params)
    assert _trees_bit_equal(fm_io.load_params(tmp_path / "flax.npz"), params)


def test_mapping_kinds():
    sd = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
          "b.bias": np.ones(2, np.float16),
          "buf": np.zeros(2, np.int64)}
    # identity: names kept flat, nothing transposed
    p = from_hf(sd)
    assert set(p) == set(sd) and all(_bits_equal(p[k], sd[k]) for k in sd)
    assert all(_bits_equal(v, sd[k]) for k, v in to_hf(p).items())
    # dict (inverted automatically); unlisted names kept
    table = {"a.weight": "lin/kernel", "buf": None}
    p = from_hf(sd, table)
    assert flatten(p)[0] == ["b.bias", "lin/kernel"] and p["lin"]["kernel"].shape == (3, 2)
    assert p["b.bias"].dtype == np.float16
    back = to_hf(p, table)
    assert set(back) == {"a.weight", "b.bias"} and _bits_equal(back["a.weight"], sd["a.weight"])
    # rules; without an inverse export needs like=
    rules = [(r"^buf$", None), (r"\.weight$", ".kernel"), (r"\.", "/")]
    p = from_hf(sd, rules, nested=False)
    assert set(p) == {"a/kernel", "b/bias"}
    with pytest.raises(ValueError, match="needs the inverse"):
        to_hf(p, rules)
    back = to_hf(p, rules, like=list(sd))
    assert set(back) == {"a.weight", "b.bias"} and _bits_equal(back["a.weight"], sd["a.weight"])
    nm = NameMap.rules(rules, inverse=[("/", "."), (r"\.kernel$", ".weight")])
    assert set(to_hf(p, nm)) == {"a.weight", "b.bias"}
    # callable; transpose off / per tensor
    p = from_hf(sd, lambda n: None if n == "buf" else n.replace(".weight", ".kernel"),
                transpose=False)
    assert p["a.kernel"].shape == (2, 3)
    p = from_hf(sd, lambda n: None if n == "buf" else n,
                transpose=lambda name, nd: name == "a.weight")
    assert p["a.weight"].shape == (3, 2)
    # collisions and bad mappings
    with pytest.raises(ValueError, match="both 'a.weight' and 'b.bias' map to 'x'"):
        from_hf(sd, lambda n: None if n == "buf" else "x")
    with pytest.raises(ValueError, match="sends both"):
        NameMap.from_dict({"a": "x", "b": "x"})
    with pytest.raises(ValueError, match="mapping must be"):
        from_hf(sd, 3)
    with pytest.raises(ValueError, match="invalid rewrite pattern"):
        NameMap.rules([("(", "x")])


def test_conv_kernels_transpose_exactly():
    # (out, in, kh, kw)
    w = np.random.default_rng(0).standard_normal((5, 3, 2, 4)).astype(np.float32)
    k = adapters.kernel_to_flax(w)
    assert k.shape == (2, 4, 3, 5) and _bits_equal(adapters.kernel_to_torch(k), w)
    p = from_hf({"conv.weight": w}, [(r"\.weight$", ".kernel"), (r"\.", "/")])
    assert p["conv"]["kernel"].shape == (2, 4, 3, 5)
    # the Flax conv with this kernel computes torch's conv2d (cross-correlation, NCHW vs NHWC)
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    y_torch_style = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    y_flax_style = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), p["conv"]["kernel"],
                                                (1, 1), "VALID",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(y_flax_style).transpose(0, 3, 1, 2),
                               np.asarray(y_torch_style), rtol=1e-5, atol=1e-5)


def test_hf_source_plans_like_memory(tmp_path):
    from safetensors.numpy import save_file

    base = tiny_hf_bert(0)
    rng = np.random.default_rng(1)
    paths = []
    fts = []
    for i in range(3):
        ft = {k: (v + 0.02 * rng.standard_normal(v.shape).astype(np.float32)
                  if v.dtype == np.float32 else v)
              for k, v in base.items()}
        fts.append(ft)
        paths.append(tmp_path / f"task{i}.safetensors")
        save_file(ft, str(paths[-1]))
    save_file(base, str(tmp_path / "base.safetensors"))
    src = adapters.hf_source(tmp_path / "base.safetensors", paths, bert_mapping())
    assert src.task_names == ("task0", "task1", "task2")
    assert "embeddings/position_ids" not in src.layout.names
    kernel = src.layout.names.index("encoder/layer/0/intermediate/dense/kernel")
    assert src.layout.shapes[kernel] == (8, 16)
    method = fm.methods.ties(keep=0.5)
    p_disk = fm.plan(src, blocks="bert", method=method)
    p_mem = fm.plan(from_hf(base, bert_mapping()), [from_hf(f, bert_mapping()) for f in fts],
                    blocks="bert", method=method)
    assert [e.block for e in p_disk.events] == [e.block for e in p_mem.events]
    a = p_disk.at_size(1.5).params_for_task(0)
    b = p_mem.at_size(1.5).params_for_task(0)
    assert _trees_bit_equal(jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))
    with pytest.raises(ValueError, match="int64"):
        adapters.hf_source(tmp_path / "base.safetensors", paths)  # identity keeps position_ids
    save_file({k: v for k, v in base.items() if "pooler" not in k},
              str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="task 1 .*lacks 'pooler.dense"):
        adapters.hf_source(tmp_path / "base.safetensors",
                           [paths[0], tmp_path / "short.safetensors"], bert_mapping())


def test_import_adapters_does_not_import_flax():
    code = (
        "import sys, flexmerge_jax, flexmerge_jax.adapters as a; "
        "assert 'flax' not in sys.modules, 'flax imported'; "
        "a.bert_mapping(); assert 'flax' not in sys.modules; "
        "a.from_linen; assert 'flax' in sys.modules; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
