"""What the console script's immediate exit saves a whole process.

    python benchmarks/process_exit.py           # 9 interleaved rounds (~2 minutes)

``flexmerge`` (:func:`flexmerge_jax.cli.run`) ends its process with
``os._exit`` once the command's work, the non-daemon threads and the
``atexit`` handlers are done, skipping the interpreter's teardown of the
modules, XLA's client and TensorStore's state. This times the same command,
a one-shot task-arithmetic merge of the bundled zoo from safetensors files,
through ``run`` (``python -m flexmerge_jax.cli``) and through ``main`` with
a normal exit (``sys.exit(main(...))``), in fresh processes, interleaved.

Writes ``benchmarks/results/process_exit.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
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

NORMAL_EXIT = "import sys; from flexmerge_jax.cli import main; sys.exit(main(sys.argv[1:]))"
WAYS = {"run(): os._exit after the exit steps": ["-m", "flexmerge_jax.cli"],
        "main(): normal interpreter exit": ["-c", NORMAL_EXIT]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    import flexmerge_jax as fm
    from flexmerge_jax import zoo

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times: dict = {k: [] for k in WAYS}
    with tempfile.TemporaryDirectory(prefix="fm-exit-") as tmp:
        z = zoo.load()
        base = fm.save_params(Path(tmp) / "base.safetensors", z.base)
        fts = [fm.save_params(Path(tmp) / f"{t}.safetensors", p)
               for t, p in zip(z.task_names, z.finetuned)]
        out = Path(tmp) / "out"
        cmd = ["merge", "--base", str(base), "--finetuned", *map(str, fts), "--blocks", "vit",
               "--method", "ta", "--size", "1", "--quiet", "--out", str(out)]
        for r in range(args.rounds + 1):  # round 0: untimed (page cache, compilation cache)
            for k, how in WAYS.items():
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                subprocess.run([sys.executable, *how, *cmd], check=True, env=env,
                               stdout=subprocess.DEVNULL)
                if r:
                    times[k].append(time.perf_counter() - t)
    results = {"machine": machine(), "rounds": args.rounds, "seconds": times}
    write_results("process_exit", results, report)


def report(r: dict) -> str:
    m, t = r["machine"], r["seconds"]
    med = {k: statistics.median(v) for k, v in t.items()}
    fast, slow = med.values()
    lines = [
        "# The console script's immediate exit",
        "",
        f"Machine: {m['cpu']} ({m.get('vector', '?')}), {m['cores']} cores; jax {m['jax']}. "
        "`flexmerge merge --method ta --size 1` of the bundled zoo (8 tasks, safetensors "
        f"files), fresh processes, median of {r['rounds']} interleaved rounds after an "
        "untimed one (wall clock, start to exit).",
        "",
        "| exit | whole process |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} s |" for k, v in med.items()]
    lines += ["", f"Saved by the immediate exit: {slow - fast:.2f} s per process."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
