"""Every built-in method reproduces its saved plans and cuts bit for bit.

The fixture (``tests/fixtures/golden/methods.json``) was written by
``tests/golden_methods.py`` with the code from before methods became one
module each; events (blocks, members, sizes) exactly, their similarities
to 1e-12 relative, cut parameters by SHA-256.

Similarities are float64 sums (Gram matrices): NumPy's BLAS sums them in
an order that depends on the CPU's vector width (AVX2, AVX-512), so their
last bits may differ between machines (one case differs by one ulp,
4.9e-16 relative, on AVX-512 CPUs); float32 arithmetic would differ by
~1e-8, the documented bound is 1.2e-7 (docs/numerics.md).
"""

import json

import numpy as np
import pytest

import golden_methods as golden

SAVED = json.loads(golden.PATH.read_text())


# The default run replays one case of each kind of method (Gram-only,
# merged-vector, trimmed, PCB thresholds, masks, DARE, the zoo); the others
# (each a few more compilations of methods with their own kernels, also
# tested against their references elsewhere) run with ``-m slow``.
DEFAULT = {"avg", "ta", "ties", "pcb", "consensus_ta", "emr", "magmax", "zoo_ties"}
CASES = [pytest.param(*c, id=c[0], marks=() if c[0] in DEFAULT else pytest.mark.slow)
         for c in golden.CASES + golden.ZOO_CASES]


@pytest.mark.parametrize("label,make,linkage,n", CASES)
def test_method_reproduces_saved_plan_and_cuts(label, make, linkage, n):
    got = json.loads(json.dumps(golden.run_case(label, make, linkage, n)))
    want = SAVED[label]
    assert got["method"] == want["method"]
    assert _without_similarity(got["events"]) == _without_similarity(want["events"])
    np.testing.assert_allclose(_similarities(got["events"]), _similarities(want["events"]),
                               rtol=1e-12, atol=0)  # None (events without one) as NaN, equal
    assert got["sizes"] == want["sizes"]
    assert got["cuts"] == want["cuts"]


def _without_similarity(events: list) -> list:
    return [{k: v for k, v in e.items() if k != "similarity"} for e in events]


def _similarities(events: list) -> np.ndarray:
    return np.array([np.nan if e["similarity"] is None else e["similarity"] for e in events])
