"""One-shot merges and cuts: no schedule at the ends of the axis, one read
of every input per cut."""

import collections
import json

import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import _plan
from flexmerge_jax.cli import main
from flexmerge_jax.sources import MemorySource, files

from conftest import random_case

BLOCKS = ["l1.attn", "l1.mlp", "l0.", "emb"]


def _no_schedule(monkeypatch):
    """Makes computing a schedule (any order) raise."""
    def forbidden(*a, **k):
        raise AssertionError("a schedule was computed")

    monkeypatch.setattr(_plan, "_sequences", forbidden)
    monkeypatch.setattr(_plan, "_random_order", forbidden)


def _files(tmp_path, seed, n):
    base, fts = random_case(seed, n=n)
    b = files.save_params(tmp_path / "base.safetensors", base)
    return str(b), [str(files.save_params(tmp_path / f"t{i}.npz", f)) for i, f in enumerate(fts)]


def _same_directories(a, b):
    """Two saved models are the same: metadata equal, every array bitwise."""
    assert json.loads((a / "flexmerge.json").read_text()) == \
        json.loads((b / "flexmerge.json").read_text())
    ma, mb = fm.load(a), fm.load(b)
    for t in range(ma.n):
        la = fm.tree.flatten(ma.params_for_task(t))[1]
        lb = fm.tree.flatten(mb.params_for_task(t))[1]
        assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


@pytest.mark.parametrize("method,hp", [("ta", {"scale": 0.7}), ("ties", {"keep": 0.3}),
                                       ("emr", {})])
def test_cli_merge_at_the_ends_computes_no_schedule(tmp_path, capsys, monkeypatch, method, hp):
    base, fts = _files(tmp_path, 3, 4)
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps(BLOCKS[:-1]))  # "emb" unmatched: kept per task
    # The scheduled path: a plan, cut at the same sizes.
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        p = fm.plan(base, fts, blocks=fm.blocks.from_substrings(BLOCKS[:-1]),
                    method=fm.methods.get(method, **hp))
    args = [a for k, v in hp.items() for a in (f"--{k}", str(v))]
    for size in (p.min_size, 4.0):
        with monkeypatch.context() as m:
            _no_schedule(m)
            code = main(["merge", "--base", base, "--finetuned", *fts, "--method", method, *args,
                         "--blocks", str(blocks), "--size", repr(size), "--out",
                         str(tmp_path / f"fast{size}")])
        out, err = capsys.readouterr()
        assert code == 0, err
        fm.save_cut(tmp_path / f"plan{size}", p, size=size)
        _same_directories(tmp_path / f"fast{size}", tmp_path / f"plan{size}")
        assert p.summary_at(p.step_for_size(size)) in out
        assert f"saved {size:.4f}x model" in out


def test_cli_merge_inside_the_axis_and_out_of_range(tmp_path, capsys):
    base, fts = _files(tmp_path, 4, 3)
    assert main(["merge", "--base", base, "--finetuned", *fts, "--method", "ta",
                 "--size", "2", "--out", str(tmp_path / "m")]) == 0
    ref = fm.plan(base, fts, method="ta")
    assert fm.load(tmp_path / "m").n_models == ref.sizes[ref.step_for_size(2)]
    capsys.readouterr()
    assert main(["merge", "--base", base, "--finetuned", *fts, "--method", "ta",
                 "--size", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "size 0.5 outside [1, 3]" in capsys.readouterr().err


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("method", ["ta", "emr", "consensus_ties"])
def test_floor_size_is_every_schedules_last_size(n, method):
    base, fts = random_case(n, n=n)
    blocks = fm.blocks.from_substrings(BLOCKS)
    for order in ("greedy", "random"):
        p = fm.plan(base, fts, blocks=blocks, method=method, order=order, seed=n)
        assert _plan.floor_size(p.partition, n, p.method.uses_masks) == p.sizes[-1]


def test_one_shot_merge_computes_no_schedule(monkeypatch):
    base, fts = random_case(5, n=4)
    ref = fm.plan(base, fts, blocks=BLOCKS, method="ties").at_size(1).params_for_task(0)
    _no_schedule(monkeypatch)
    got = fm.merge(base, fts, "ties", blocks=BLOCKS)
    for x, y in zip(fm.tree.flatten(got)[1], fm.tree.flatten(ref)[1]):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


class CountingSource(MemorySource):
    """Counts reads of every (parameter, model); model -1 is the base."""

    prefetch = True  # read ahead in host threads, as files are

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = collections.Counter()

    def base(self, names):
        self.reads.update((k, -1) for k in names)
        return super().base(names)

    def finetuned(self, names):
        self.reads.update((k, t) for t in range(self.n) for k in names)
        return super().finetuned(names)

    def finetuned_tasks(self, names, tasks):
        self.reads.update((k, int(t)) for t in tasks for k in names)
        return {int(t): super(CountingSource, self).finetuned(names)[t] for t in tasks}


@pytest.mark.parametrize("method", ["ta", "ties", "emr"])
def test_a_cut_reads_each_input_once(tmp_path, method):
    base, fts = random_case(6, n=5)
    src = CountingSource(base, fts)
    p = fm.plan(src, blocks=fm.blocks.from_substrings(BLOCKS), method=method)
    k = p.num_steps // 2  # some blocks merged, some tasks alone
    parts = p.partition_at(k)
    assert any(len(g) == 1 for gs in parts.values() for g in gs)
    for cut in (lambda: p.at_step(k), lambda: fm.save_cut(tmp_path / "c", p, step=k)):
        src.reads.clear()
        cut()
        for blk in p.partition.blocks:
            merged = any(len(g) >= p.method.min_merged for g in parts[blk.name])
            for leaf in blk.leaves:
                assert [src.reads[(leaf, t)] for t in range(5)] == [1] * 5, leaf
                assert src.reads[(leaf, -1)] == int(merged), leaf


def test_sharded_one_shot_merges_equal_unsharded(tmp_path, capsys):
    base, fts = _files(tmp_path, 9, 3)
    for size in ("1", "3"):
        common = ["merge", "--base", base, "--finetuned", *fts, "--method", "ties", "--keep",
                  "0.4", "--size", size]
        assert main([*common, "--out", str(tmp_path / f"plain{size}")]) == 0
        assert main([*common, "--mesh", "8", "--out", str(tmp_path / f"sharded{size}")]) == 0
        _same_directories(tmp_path / f"plain{size}", tmp_path / f"sharded{size}")
