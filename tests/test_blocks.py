"""Block specifications and presets."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from flexmerge_jax import blocks

from oracle_utils import load_case

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_plan import vit_shapes  # noqa: E402


def test_substring_first_match_and_order():
    names = ["resblocks.1.mlp.w", "resblocks.11.mlp.w", "resblocks.10.attn.w", "head"]
    spec = blocks.from_substrings(["resblocks.11", "resblocks.10", "resblocks.1"])
    with pytest.warns(blocks.UnmatchedParametersWarning, match="head"):
        p = blocks.resolve(spec, names, [1, 2, 3, 4])
    assert p.names == ("resblocks.11", "resblocks.10", "resblocks.1")
    assert [b.leaves for b in p.blocks] == [
        ("resblocks.11.mlp.w",), ("resblocks.10.attn.w",), ("resblocks.1.mlp.w",)
    ]
    assert p.unmatched == ("head",) and p.unmatched_numel == 4 and p.total == 10


def test_empty_blocks_dropped_and_nothing_matched():
    p = blocks.resolve(["x", "nothere"], ["x.w", "x.b"], [1, 1])
    assert p.names == ("x",)
    with pytest.raises(ValueError, match="matches none"):
        blocks.resolve(["zzz"], ["x.w"], [1])


def test_bad_specs():
    with pytest.raises(ValueError, match="twice"):
        blocks.from_substrings(["a", "a"])
    with pytest.raises(ValueError, match="not a str"):
        blocks.from_substrings("abc")
    with pytest.raises(ValueError, match="invalid block regex"):
        blocks.from_regex(["("])
    with pytest.raises(ValueError, match="unknown block preset"):
        blocks.preset("nope")


def test_regex_blocks():
    spec = blocks.from_regex([r"layers/\d+/(attn|mlp)", r"emb"])
    names = ["layers/0/attn/k", "layers/0/mlp/w", "layers/1/attn/k", "emb/w", "layers/0/attn/q"]
    p = blocks.resolve(spec, names, [1] * 5)
    assert p.names == ("layers/0/attn", "layers/0/mlp", "layers/1/attn", "emb")
    assert p.blocks[0].leaves == ("layers/0/attn/k", "layers/0/attn/q")


def test_by_layer_and_per_leaf():
    names = ["blocks/1/a", "blocks/0/b", "blocks/10/c", "embed"]
    p = blocks.resolve(blocks.by_layer(), names, [1] * 4)
    assert p.names == ("blocks/10", "blocks/1", "blocks/0", "embed")
    p = blocks.resolve(None, names, [1] * 4)
    assert p.names == tuple(names)


@pytest.mark.parametrize("case", ["caseA", "caseB"])
def test_vit_preset_reproduces_reference_block_list(case):
    c = load_case(case)
    assert blocks.vit().block_names(c.param_names) == [b for b in c.blocks]
    # Same on nested-dict ("/") names.
    slash = [n.replace(".", "/") for n in c.param_names]
    assert blocks.vit().block_names(slash) == [b.replace(".", "/") for b in c.blocks]


def _openclip_visual(width, layers, mlp, tokens, patch, out):
    """open_clip visual-tower parameter names and shapes (spec §2.2), named
    as FusionBench does (``model.`` prefix); the table is the benchmarks'."""
    p = vit_shapes(layers=layers, width=width, mlp=mlp, tokens=tokens, patch=patch, out=out)
    return ["model." + k for k in p], [int(np.prod(s)) for s in p.values()]


def test_clip_presets_match_published_sizes():
    names, sizes = _openclip_visual(768, 12, 3072, 50, 32, 512)
    p = blocks.resolve("clip-vit-b32", names, sizes)
    assert len(p) == 54 and not p.unmatched
    assert p.total == 87_849_216
    numel = dict(zip(p.names, p.numels.tolist()))
    assert numel["resblocks.3.attn"] == 2_362_368
    assert numel["resblocks.3.mlp"] == 4_722_432
    assert numel["resblocks.3.ln_1"] == numel["ln_post"] == 1_536
    assert numel["visual.conv1"] == 2_359_296 and numel["visual.proj"] == 393_216
    assert numel["visual.positional_embedding"] == 38_400
    assert numel["visual.class_embedding"] == 768
    assert blocks.resolve("MTL-transformer+PP", names, sizes) == p  # reference name
    assert len(blocks.resolve("clip-vit-b32-coarse", names, sizes)) == 18
    names, sizes = _openclip_visual(1024, 24, 4096, 257, 14, 768)
    p = blocks.resolve("clip-vit-l14", names, sizes)
    assert len(p) == 102 and p.total == 303_966_208
    numel = dict(zip(p.names, p.numels.tolist()))
    assert numel["resblocks.0.attn"] == 4_198_400 and numel["resblocks.0.mlp"] == 8_393_728
    assert numel["visual.conv1"] == 602_112 and numel["visual.positional_embedding"] == 263_168


def test_t5_preset_counts():
    assert len(blocks.preset("t5-base").names) == 66
    assert len(blocks.preset("t5-large").names) == 126
    assert len(blocks.preset("t0-3b-ia3").names) == 120


def test_partition_json_roundtrip():
    c = load_case("caseA")
    p = blocks.resolve(c.blocks, c.param_names, [int(np.prod(s)) for _, s in c.params])
    assert blocks.Partition.from_json(json.loads(json.dumps(p.to_json()))) == p
