"""Every built-in method reproduces its saved plans and cuts bit for bit.

The fixture (``tests/fixtures/golden/methods.json``) was written by
``tests/golden_methods.py`` with the code from before methods became one
module each; event similarities are compared as exact floats and cut
parameters by SHA-256.
"""

import json

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
    assert got["events"] == want["events"]
    assert got["sizes"] == want["sizes"]
    assert got["cuts"] == want["cuts"]
