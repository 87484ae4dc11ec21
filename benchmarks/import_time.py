"""What importing flexmerge_jax costs a process, by ml_dtypes release.

    python benchmarks/import_time.py            # 9 interleaved rounds (~1 minute)

pyproject.toml excludes ml_dtypes 0.7.0: its import registers its NumPy
ufunc loops in about half a second, where 0.6.0 takes milliseconds, and
every flexmerge process (``import jax``) pays it. This script installs the
releases it compares into directories of its own (``pip install --no-deps
--target``, never into this environment), puts each first on
``PYTHONPATH`` in turn, and times fresh processes, interleaved: ``import
ml_dtypes`` and ``import flexmerge_jax, orbax.checkpoint`` (what a
``flexmerge merge`` imports).

Writes ``benchmarks/results/import_time.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
from bench_plan import machine, write_results  # noqa: E402

RELEASES = ("0.6.0", "0.7.0")
IMPORTS = {"ml_dtypes": "import ml_dtypes",
           "flexmerge_jax + orbax": "import flexmerge_jax, orbax.checkpoint"}


def install(release: str, into: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    str(into), f"ml_dtypes=={release}"], check=True)


def timed(code: str, pythonpath: str) -> float:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fm-mldtypes-") as tmp:
        paths = {}
        for r in RELEASES:
            install(r, Path(tmp) / r)
            paths[r] = os.pathsep.join([str(Path(tmp) / r), str(ROOT)])
        for p in paths.values():  # each import once, untimed (page cache, .pyc)
            for code in IMPORTS.values():
                timed(code, p)
        times: dict = {r: {k: [] for k in IMPORTS} for r in RELEASES}
        for _ in range(args.rounds):
            for r, p in paths.items():
                for k, code in IMPORTS.items():
                    times[r][k].append(timed(code, p))
    results = {"machine": machine(), "rounds": args.rounds, "seconds": times}
    write_results("import_time", results, report)


def report(r: dict) -> str:
    m, t = r["machine"], r["seconds"]
    med = {rel: {k: statistics.median(v) for k, v in d.items()} for rel, d in t.items()}
    lines = [
        "# Importing flexmerge_jax, by ml_dtypes release",
        "",
        f"Machine: {m['cpu']} ({m.get('vector', '?')}), {m['cores']} cores; jax {m['jax']}. "
        f"Fresh processes, median of {r['rounds']} interleaved rounds (wall clock, including "
        "the interpreter's start and exit); each release installed apart and first on "
        "PYTHONPATH.",
        "",
        "| import | " + " | ".join(f"ml_dtypes {rel}" for rel in t) + " |",
        "|---|" + "---|" * len(t),
    ]
    for k in IMPORTS:
        lines.append(f"| `{IMPORTS[k]}` | " + " | ".join(f"{med[rel][k]:.2f} s" for rel in t)
                     + " |")
    lines += ["", "pyproject.toml excludes ml_dtypes 0.7.0 for this difference."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
