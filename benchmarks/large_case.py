"""The large case: plan and cut 30 ViT-L/14-sized fine-tuned models from disk.

    python benchmarks/large_case.py generate --dir /data/fm-large   # ~38 GB of safetensors
    python benchmarks/large_case.py run --dir /data/fm-large        # plan + cut, from disk

The synthetic models are CLIP ViT-L/14 visual towers (open_clip names; 24
layers, width 1024, MLP 4096, 257 tokens: 303,966,208 parameters, 1.2 GB of
float32 each); 30 fine-tuned copies whose task vectors fall into 3 correlated
clusters plus noise (so the schedule is not trivial): ≈ 36 GB of task vectors,
more than this 24 GB machine holds. ``generate`` writes each safetensors file
tensor by tensor (its header first), so it never holds a whole model either.

``run`` measures, each in its own process (its own peak RSS):

* one raw read of all 31 files (64 MiB chunks; the disk's bandwidth);
* ``fm.plan`` from the files with the ``clip-vit-l14`` blocks (ta, constituent
  linkage ``min``): one streaming pass computing the per-block Gram matrices;
* ``fm.save_cut`` of the plan at a size, streamed block by block to an
  on-disk FlexModel, then ``fm.load`` of it and a spot check of one block
  against a direct NumPy merge of that block read from the files;
* ``fm.plan`` with TIES (keep 0.2, linkage ``min``): global per-task
  thresholds over all 30 x 304M entries, found in the same streaming pass.

Results: ``benchmarks/results/large_case.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan import _peak_rss_mb, machine, vit_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
L14 = dict(layers=24, width=1024, mlp=4096, tokens=257, patch=14, out=768)


class SafetensorsWriter:
    """Writes a float32 safetensors file one tensor at a time, in a fixed order."""

    def __init__(self, path: Path, shapes: dict):
        self.path, self.order = path, list(shapes)
        header, off = {}, 0
        for k, s in shapes.items():
            nbytes = 4 * int(np.prod(s))
            header[k] = {"dtype": "F32", "shape": list(s), "data_offsets": [off, off + nbytes]}
            off += nbytes
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(h)) + h)
        self.i = 0

    def write(self, name: str, a: np.ndarray) -> None:
        if name != self.order[self.i]:
            raise ValueError(f"{self.path}: expected {self.order[self.i]!r}, got {name!r}")
        self.f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
        self.i += 1

    def close(self) -> None:
        if self.i != len(self.order):
            raise ValueError(f"{self.path}: {len(self.order) - self.i} tensors not written")
        self.f.close()


def generate(directory: Path, n: int, seed: int = 0) -> None:
    shapes = vit_shapes(**L14)
    directory.mkdir(parents=True, exist_ok=True)
    names = ["base"] + [f"task{i:02d}" for i in range(n)]
    tmp = [directory / f"{s}.safetensors.tmp" for s in names]
    writers = [SafetensorsWriter(p, shapes) for p in tmp]
    t = time.perf_counter()
    for j, (k, s) in enumerate(shapes.items()):
        rng = np.random.default_rng([seed, j])
        base = 0.02 * rng.standard_normal(s, dtype=np.float32)
        centers = rng.standard_normal((3,) + s, dtype=np.float32)
        writers[0].write(k, base)
        for i in range(n):
            tv = centers[i % 3] + 0.7 * rng.standard_normal(s, dtype=np.float32)
            tv *= 1e-3
            writers[i + 1].write(k, base + tv)
        if j % 40 == 0:
            print(f"  {j + 1}/{len(shapes)} tensors, {time.perf_counter() - t:.0f} s", flush=True)
    for w in writers:
        w.close()
    for p, s in zip(tmp, names):
        p.rename(directory / f"{s}.safetensors")
    P = sum(int(np.prod(s)) for s in shapes.values())
    print(f"wrote {n + 1} models of {P:,} parameters ({(n + 1) * 4 * P / 1e9:.1f} GB) "
          f"in {time.perf_counter() - t:.0f} s")


def files(directory: Path) -> tuple[str, list[str]]:
    base = directory / "base.safetensors"
    fts = sorted(directory.glob("task*.safetensors"))
    if not base.exists() or len(fts) < 2:
        raise SystemExit(f"{directory}: run `generate` first")
    return str(base), [str(p) for p in fts]


# ---------------------------------------------------------------- jobs (own process each)


def job(spec: dict) -> dict:
    directory = Path(spec["dir"])
    base, fts = files(directory)
    out: dict = {}
    if spec["kind"] == "read":
        t, total = time.perf_counter(), 0
        for p in [base] + fts:
            with open(p, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
        out.update(seconds=time.perf_counter() - t, bytes=total)
    else:
        import jax

        import flexmerge_jax as fm

        blocks = fm.blocks.preset("clip-vit-l14")
        method = (fm.methods.ties(keep=0.2) if spec.get("method") == "ties"
                  else fm.methods.task_arithmetic(scale=1.0))
        t = time.perf_counter()
        plan = fm.plan(base, fts, blocks=blocks, method=method, linkage="min")
        out["plan_seconds"] = time.perf_counter() - t
        out["steps"] = plan.num_steps
        out["sizes"] = [float(plan.sizes[0]), float(plan.sizes[-1])]
        out["plan_peak_rss_mb"] = _peak_rss_mb()
        if spec["kind"] == "plan+cut":
            target = Path(spec["out"])
            t = time.perf_counter()
            fm.save_cut(target, plan, size=spec["size"], overwrite=True)
            out["cut_seconds"] = time.perf_counter() - t
            out["cut_peak_rss_mb"] = _peak_rss_mb()
            t = time.perf_counter()
            model = fm.load(target)
            out["n_models"] = model.n_models
            out["groups_per_block"] = {k: int(v.max()) + 1 for k, v in model.routing.items()}
            out["check"] = spot_check(model, base, fts, blocks)
            out["load_check_seconds"] = time.perf_counter() - t
            out["cut_bytes_on_disk"] = sum(f.stat().st_size for f in target.rglob("*")
                                           if f.is_file())
            jax.clear_caches()
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def spot_check(model, base: str, fts: list[str], blocks) -> dict:
    """One block of the cut against a direct NumPy mean of its group, from the files."""
    from safetensors import safe_open

    name = "visual.transformer.resblocks.11.mlp.c_fc.weight"
    block = next(b for b in model.routing if b == "resblocks.11.mlp")
    routing = np.asarray(model.routing[block])
    g = int(routing[0])
    members = np.flatnonzero(routing == g)
    with safe_open(base, "np") as f:
        b0 = f.get_tensor(name)
    acc = np.zeros(b0.shape, np.float64)
    for i in members:
        with safe_open(fts[i], "np") as f:
            acc += f.get_tensor(name).astype(np.float64) - b0
    want = b0 + acc / len(members)  # task arithmetic, scale 1, mean convention
    got = np.asarray(model.params_for_task(0)[name])  # flat safetensors names are kept
    err = float(np.max(np.abs(got - want)))
    return {"parameter": name, "group_of_task0": members.tolist(), "max_abs_error": err}


def run_job(spec: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "job", json.dumps(spec)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"job {spec['kind']} failed:\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {spec['kind']}: {json.dumps(res)[:300]}", flush=True)
    return res


def run(directory: Path, size: float, reuse_read: bool = False) -> None:
    base, fts = files(directory)
    n = len(fts)
    P = sum(int(np.prod(s)) for s in vit_shapes(**L14).values())
    res = {"machine": machine(), "model": "ViT-L/14 visual tower (synthetic)",
           "params_per_model": P, "n": n, "size": size}
    previous = RESULTS / "large_case.json"
    if reuse_read and previous.exists():  # the raw read only measures the disk
        res["read"] = json.loads(previous.read_text())["read"]
    else:
        res["read"] = run_job({"kind": "read", "dir": str(directory)})
    res["plan_cut"] = run_job({"kind": "plan+cut", "dir": str(directory), "size": size,
                               "out": str(directory / "cut")})
    res["plan_ties"] = run_job({"kind": "plan", "method": "ties", "dir": str(directory)})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "large_case.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "large_case.md").write_text(report(res))
    print(report(res))


def report(r: dict) -> str:
    m, rd, pc, P, n = r["machine"], r["read"], r["plan_cut"], r["params_per_model"], r["n"]
    gb = rd["bytes"] / 1e9
    import flexmerge_jax as fm

    shapes = vit_shapes(**L14)
    part = fm.blocks.resolve(fm.blocks.preset("clip-vit-l14"), list(shapes),
                             [int(np.prod(s)) for s in shapes.values()])
    largest = max(b.numel for b in part.blocks)
    return "\n".join([
        f"# Large case: {n} ViT-L/14-sized models planned and cut from disk",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; jax {m['jax']} on "
        f"{m['device']}.",
        "",
        f"Inputs: base + {n} fine-tuned safetensors files, {P:,} float32 parameters each "
        f"({gb:.1f} GB on disk; task vectors {n * P * 4 / 1e9:.1f} GB), generated by "
        "`benchmarks/large_case.py generate`.",
        "",
        "| step | time (s) | peak RSS (GB) |",
        "|---|---|---|",
        f"| one raw read of all files (64 MiB chunks) | {rd['seconds']:.0f} "
        f"({gb / rd['seconds']:.2f} GB/s) | {rd['peak_rss_mb'] / 1024:.2f} |",
        f"| `fm.plan` (ta, linkage min, `clip-vit-l14` blocks), {pc['steps']} steps | "
        f"{pc['plan_seconds']:.0f} ({pc['plan_seconds'] / rd['seconds']:.2f}x the raw read) | "
        f"{pc['plan_peak_rss_mb'] / 1024:.2f} |",
        *([f"| `fm.plan` (ties keep 0.2, linkage min), {r['plan_ties']['steps']} steps | "
           f"{r['plan_ties']['plan_seconds']:.0f} "
           f"({r['plan_ties']['plan_seconds'] / rd['seconds']:.2f}x the raw read) | "
           f"{r['plan_ties']['plan_peak_rss_mb'] / 1024:.2f} |"] if "plan_ties" in r else []),
        f"| `fm.save_cut` at {r['size']:g}x ({pc['n_models']:.2f} models, "
        f"{pc['cut_bytes_on_disk'] / 1e9:.1f} GB written) | {pc['cut_seconds']:.0f} | "
        f"{pc['cut_peak_rss_mb'] / 1024:.2f} |",
        f"| `fm.load` of the whole cut into memory + spot check | {pc['load_check_seconds']:.0f} | "
        f"{pc['peak_rss_mb'] / 1024:.2f} |",
        "",
        f"Peak host memory stays far below the {n * P * 4 / 2**30:.0f} GiB of task vectors: "
        f"the statistics passes hold one block of all tasks per worker thread (two here), later "
        f"passes and the cut the block they work on and the next one, read ahead "
        f"(largest block, an MLP: {largest:,} parameters, {n} tasks = "
        f"{n * largest * 4 / 2**30:.2f} GiB as float32).",
        "",
        f"Spot check: `{pc['check']['parameter']}` of task 0 in the loaded cut equals a direct "
        f"NumPy float64 mean over its group {pc['check']['group_of_task0']} read from the files "
        f"(max abs error {pc['check']['max_abs_error']:.1e}).",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--dir", required=True, type=Path)
    g.add_argument("--n", type=int, default=30)
    g.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True, type=Path)
    r.add_argument("--size", type=float, default=10.0)
    r.add_argument("--reuse-read", action="store_true",
                   help="take the raw-read time from the previous results instead of re-reading")
    j = sub.add_parser("job")
    j.add_argument("spec")
    args = ap.parse_args()
    if args.cmd == "generate":
        generate(args.dir, args.n, args.seed)
    elif args.cmd == "run":
        run(args.dir, args.size, args.reuse_read)
    else:
        print(json.dumps(job(json.loads(args.spec))))


if __name__ == "__main__":
    main()
