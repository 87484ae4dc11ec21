"""sweep(): sizes, normalization, outputs — checked against direct plan cuts."""

import csv
import io
import json

import numpy as np
import pytest

import flexmerge_jax as fm

from conftest import random_case


@pytest.fixture(scope="module")
def case():
    base, fts = random_case(30, n=4)

    def score(params, i):  # closeness to task i's own model: 1 at theta_i
        d = sum(float(np.sum((np.asarray(params[k]) - fts[i][k]) ** 2)) for k in base)
        d0 = sum(float(np.sum((base[k] - fts[i][k]) ** 2)) for k in base)
        return 0.5 + 0.5 * np.exp(-d / d0)

    return base, fts, score


def test_sweep_matches_direct_cuts(case):
    base, fts, score = case
    plans = {
        "ta": fm.plan(base, fts, blocks="by-layer", method=fm.methods.task_arithmetic(1.5)),
        "emr": fm.plan(base, fts, blocks="by-layer", method="emr"),
    }
    res = fm.sweep(plans, score, sizes=[1, 1.5, 2, 3, 4], progress=False)
    np.testing.assert_allclose(res.ft_accuracy, 1.0)
    for label, p in plans.items():
        for pt in res.curve(label):
            assert pt.step == p.step_for_size(max(pt.requested_size, p.min_size))
            model = p.at_step(pt.step)
            exp = [score(model.params_for_task(i), i) for i in range(4)]
            np.testing.assert_allclose(pt.accuracy, exp)
            np.testing.assert_allclose(pt.normalized, np.asarray(exp) / np.asarray(res.ft_accuracy))
    # emr cannot go below 2 + 4/32 models: those sizes are absent, its floor present.
    assert {p.requested_size for p in res.curve("emr")} == {2.125, 3.0, 4.0}
    one, two = res.at("ta", 1.0), res.at("ta", 2.0)
    assert res.gap_recovered("ta", 2.0) == pytest.approx(
        (two.avg_normalized - one.avg_normalized) / (1 - one.avg_normalized))
    assert np.isnan(res.gap_recovered("emr", 2.0))
    assert res.curve("ta")[0].avg_normalized < res.curve("ta")[-1].avg_normalized == 1.0


def test_sweep_inputs_and_outputs(case, tmp_path):
    base, fts, score = case
    res = fm.sweep((base, fts), score, sizes=[1, 4], methods=["avg", "ties"], blocks="by-layer",
                   progress=False)
    assert list(res.methods) == ["avg", "ties"]
    assert res.methods["ties"]["keep"] == 1.0 and res.methods["avg"]["linkage"] == "min"
    paths = res.write(tmp_path)
    back = fm.SweepResult.from_json(json.loads(paths["json"].read_text()))
    assert back.points == res.points
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 4 and float(rows[-1]["avg_normalized"]) == pytest.approx(1.0)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "avg" in res.table() and "(1.00x)" in res.table()
    with pytest.raises(ValueError, match="outside"):
        fm.sweep((base, fts), score, sizes=[0.5], progress=False)
    with pytest.raises(ValueError, match="takes a Plan"):
        fm.sweep("nope", score)


def test_default_sizes():
    assert fm.default_sizes(8) == [1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0,
                                   8.0]
    assert fm.default_sizes(2) == [1.0, 1.1, 1.25, 1.5, 1.75, 2.0]


def test_ranking_table_marks_swaps_against_the_last_common_size():
    def point(m, s, v, n=None):
        return fm.SweepPoint(m, s, n or s, 0, (v,), (v,))

    res = fm.SweepResult(("t",), (1.0,), [
        point("a", 1.0, 0.80), point("b", 1.0, 0.70),
        point("c", 2.25, 0.95),                        # only c at its floor
        point("a", 3.0, 0.85), point("b", 3.0, 0.90), point("c", 3.0, 0.96),
        point("a", 4.0, 1.0), point("b", 4.0, 1.0), point("c", 4.0, 1.0),  # ties: no swap
    ], {"a": {}, "b": {}, "c": {}})
    lines = res.ranking_table().splitlines()
    assert [s for s, _ in res.rankings()] == [1.0, 2.25, 3.0, 4.0]
    assert "<- b passes a" in lines[3] and "<-" not in lines[4] and "<-" not in lines[1]
