"""Progress on stderr (a bar on a terminal, periodic lines otherwise,
``--quiet``) and ``blocks=`` given as the JSON file the CLI takes."""

import json

import numpy as np
import pytest

import flexmerge_jax as fm
from flexmerge_jax import progress
from flexmerge_jax.cli import main

from conftest import random_case


def test_lines_when_not_a_terminal(capsys, monkeypatch):
    base, fts = random_case(0, n=4)
    monkeypatch.setattr(progress.Progress, "interval", 0.0)  # a line per update
    fm.plan(base, fts, blocks="by-layer", method=fm.methods.ties(keep=0.5), linkage=None,
            progress=True)
    lines = capsys.readouterr().err.splitlines()
    total = sum(int(np.prod(v.shape)) for v in base.values())
    assert lines and all(line.startswith("flexmerge: plan: ") for line in lines)
    assert lines[-1].startswith(f"flexmerge: plan: {total}/{total} parameters, 100%")
    # TIES with merged-vector comparisons reads the model twice: thresholds, then the schedule.
    assert "(pass 2)" in lines[-1] and any("(pass 1)" in line for line in lines)
    fm.merge(base, fts, "ties", progress=True)  # one read of every parameter
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"flexmerge: merge: {total}/{total} parameters, 100%")
    fm.plan(base, fts, method="ta")  # None: only on a terminal (pytest's stderr is not one)
    fm.merge(base, fts, "ta", progress=False)
    assert capsys.readouterr().err == ""


def test_cli_reports_each_stage_and_quiet_silences_it(tmp_path, capsys):
    base, fts = random_case(1, n=3)
    fm.save_params(tmp_path / "b.safetensors", base)
    paths = [str(fm.save_params(tmp_path / f"t{i}.safetensors", f)) for i, f in enumerate(fts)]
    args = ["--base", str(tmp_path / "b.safetensors"), "--finetuned", *paths, "--method", "ta"]
    assert main(["plan", *args, "--out", str(tmp_path / "p")]) == 0
    assert main(["cut", str(tmp_path / "p"), "--size", "2", "--out", str(tmp_path / "m")]) == 0
    assert main(["export", str(tmp_path / "m"), "--all-tasks", "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    for stage in ("plan", "cut", "export"):
        assert f"flexmerge: {stage}: " in err
    assert main(["merge", *args, "--size", "2", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert progress.DEFAULT is None  # restored after the command


def test_blocks_takes_the_cli_json_file(tmp_path):
    base, fts = random_case(2, n=3)
    names = ["l1.", "l0."]
    (tmp_path / "blocks.json").write_text(json.dumps(names))
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        from_file = fm.plan(base, fts, blocks=str(tmp_path / "blocks.json"), method="ta")
    with pytest.warns(fm.blocks.UnmatchedParametersWarning):
        from_list = fm.plan(base, fts, blocks=names, method="ta")
    assert from_file.partition == from_list.partition
    np.testing.assert_array_equal(from_file.sizes, from_list.sizes)
    (tmp_path / "bad.json").write_text('{"l1.": 1}')
    with pytest.raises(ValueError, match="bad.json: must hold a JSON list"):
        fm.plan(base, fts, blocks=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="missing.json: block list file not found"):
        fm.plan(base, fts, blocks="missing.json")


def test_the_counting_source_is_its_source_but_for_the_count(tmp_path):
    """Reporting progress changes nothing else: every Source method the
    counter does not count through (describe, changed, region reads, ...)
    is the wrapped source's own, e.g. a replaced input file is noticed."""
    import os

    base, fts = random_case(3, n=3)
    paths = [fm.save_params(tmp_path / f"t{i}.npz", f) for i, f in enumerate(fts)]
    src = fm.sources.path_source(fm.save_params(tmp_path / "b.npz", base), paths)
    counted, bar = progress.counting(src, "plan", True)
    assert counted is not src and counted.describe() == src.describe()
    os.utime(paths[1], ns=(1, 1))  # "edited": another modification time
    assert src.changed() and counted.changed() == src.changed()
    name = next(k for k in base if base[k].ndim == 2)
    np.testing.assert_array_equal(counted.base_region(name, (slice(0, 2), slice(1, 3))),
                                  base[name][:2, 1:3])
    counted.task_vectors([name])
    assert bar.done == base[name].size
