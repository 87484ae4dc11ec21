"""The ``flexmerge`` command line (glue only: load -> plan -> cut -> save).

    flexmerge demo                       # the main job on the bundled zoo
    flexmerge merge --base B --finetuned F1 F2 ... --method ties --size 2 --out DIR
    flexmerge plan  --base B --finetuned F1 F2 ... --method ties --out PLAN
    flexmerge cut PLAN --size 2 --out DIR
    flexmerge export DIR --all-tasks --format hf --out DEPLOY
    flexmerge inspect DIR

Params paths: ``.npz``, ``.safetensors``, Hugging Face model directories (or their
``model.safetensors.index.json``) or Orbax checkpoint directories.
User mistakes print one line ``flexmerge: error: ...`` and exit with 2.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

import jax

from . import baselines, methods, progress
from . import methods as M
from . import zoo as zoo_lib
from ._export import FORMATS, export
from ._flexmodel import FlexModel
from ._plan import (
    Plan,
    axis_end,
    check_options,
    cut_summary,
    plan,
    plan_prepared,
    prepare,
)
from ._sweep import default_sizes, sweep
from .checkpointing import check_target, load, save, save_cut, save_groups
from .methods import NAMES

__all__ = ["main", "run"]

DEMO_METHODS = "avg,ta,ties,emr"


def demo_presets() -> dict:
    """Demo label -> (Method or baseline factory, reference), usual defaults."""
    def base(fn, m):
        return lambda z: fn(z.base, z.finetuned, m, task_names=z.task_names)

    return {
        "avg": (M.average(), "weight averaging"),
        "ta": (M.task_arithmetic(1.5), "Ilharco et al., ICLR 2023 (reference: λ·mean)"),
        "ta_sum": (M.task_arithmetic(0.3, convention="sum"),
                   "Ilharco et al., ICLR 2023 (FusionBench: α·sum)"),
        "ties": (M.ties(1.0, keep=0.2), "Yadav et al., NeurIPS 2023 (reference: disjoint mean)"),
        "ties_sum": (M.ties(0.3, keep=0.2, merge_func="sum"),
                     "Yadav et al., NeurIPS 2023 (FusionBench: disjoint sum)"),
        "dare_ta": (M.dare(M.task_arithmetic(1.5), drop=0.5), "Yu et al., ICML 2024"),
        "pcb": (M.pcb(1.0, keep=0.2), "Du et al., NeurIPS 2024"),
        "consensus_ta": (M.consensus_ta(1.5, 0.3), "Wang et al., ICML 2024 (TALL masks)"),
        "consensus_ties": (M.consensus_ties(1.0, 0.3), "Wang et al., ICML 2024 (TALL masks)"),
        "emr": (M.emr(), "Huang et al., NeurIPS 2024"),
        "tsv": (M.tsv(1.0), "Gargiulo et al., CVPR 2025 (TSV-M)"),
        "iso_c": (M.iso_c(1.0), "Marczak et al., ICML 2025"),
        "iso_cts": (M.iso_cts(1.0, 0.8), "Marczak et al., ICML 2025"),
        "breadcrumbs": (M.breadcrumbs(0.3, top=0.01, bottom=0.85),
                        "Davari & Belilovsky, ECCV 2024"),
        "della": (M.della(1.0, density=0.5, epsilon=0.15), "Deep et al., 2024"),
        "magmax": (M.magmax(0.5), "Marczak et al., ECCV 2024"),
        "model_stock": (M.model_stock(), "Jang et al., ECCV 2024"),
        "cluster-merge:ta": (base(baselines.cluster_merge, M.task_arithmetic(1.5)),
                             "whole-model clustering (FlexMerge paper baseline)"),
        "channel-merge:ta": (base(baselines.channel_merge, M.task_arithmetic(1.5)),
                             "Zhang et al., AAAI 2025 (per-tensor k-means)"),
    }


class UserError(Exception):
    """A mistake in the command line or its inputs (printed without traceback)."""


def _method(args):
    hp = {}
    for k in ("scale", "keep", "consensus"):
        v = getattr(args, k, None)
        if v is not None:
            hp[k] = v
    if getattr(args, "drop", None) is not None:
        hp["drop"] = args.drop
        hp["seed"] = args.seed
    for item in getattr(args, "hp", None) or ():
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--hp {item!r}: expected NAME=VALUE (e.g. --hp t=0.3)")
        if key in hp:
            raise UserError(f"--hp {key}: given twice (or also as --{key})")
        try:
            hp[key] = json.loads(text)  # numbers, true/false, lists; else the text itself
        except json.JSONDecodeError:
            hp[key] = text
    try:
        return methods.get(args.method, **hp)
    except (TypeError, ValueError) as e:
        raise UserError(f"--method {args.method}: {e}") from None


def _linkage(v: str):
    return None if v.lower() == "none" else v


def _names(v):
    return None if v is None else [t for t in v.split(",") if t]


def _check_inputs(args) -> None:
    for f in [args.base, *args.finetuned]:
        if not Path(f).exists():
            raise UserError(f"{f}: no such file or directory")


def _plan(args):
    _check_inputs(args)
    return plan(
        args.base,
        args.finetuned,
        blocks=args.blocks,
        method=_method(args),
        linkage=_linkage(args.linkage),
        similarity=args.similarity,
        order=args.order,
        seed=args.order_seed,
        task_names=_names(args.task_names),
        gram_precision=args.gram_precision,
        mesh=_mesh(args),
        verify=args.verify,
    )


def _distributed() -> None:
    """``jax.distributed.initialize()`` for ``--distributed``: the coordinator,
    process count and id from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID when set, else JAX's own cluster detection (Cloud TPU,
    SLURM, Open MPI, Kubernetes). On CPU, collectives go through gloo."""
    kw = {}
    for key, env, cast in [("coordinator_address", "JAX_COORDINATOR_ADDRESS", str),
                           ("num_processes", "JAX_NUM_PROCESSES", int),
                           ("process_id", "JAX_PROCESS_ID", int)]:
        if os.environ.get(env):
            try:
                kw[key] = cast(os.environ[env])
            except ValueError:
                raise UserError(f"{env}={os.environ[env]!r} is not a valid {key}") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU client only
    jax.distributed.initialize(**kw)


def _mesh(args):
    """The ``--mesh`` device mesh (one ``model`` axis), or ``None``."""
    spec = getattr(args, "mesh", None)
    if spec is None:
        return None

    total = jax.device_count()
    count = total if spec == "all" else int(spec) if spec.isdigit() else None
    if count is None or not 1 <= count <= total:
        raise UserError(f"--mesh: 'all' or a device count from 1 to {total} (got {spec!r})")
    return jax.make_mesh((count,), ("model",), devices=jax.devices()[:count])


def _check_out(args) -> None:
    """Fails before any work (planning can take minutes) when ``--out``
    cannot be written: its parent is missing, not a directory or not
    writable, or it exists and may not be replaced."""
    out = Path(args.out)
    parent = out.absolute().parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UserError(f"{out}: the parent directory {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot write in {parent} (permission denied or a read-only "
                        "file system)")
    try:
        check_target(out, args.overwrite)
    except ValueError as e:
        raise UserError(str(e).replace("overwrite=True", "--overwrite")) from None


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_merge(args) -> int:
    _check_out(args)
    _check_inputs(args)
    method, linkage = check_options(_method(args), _linkage(args.linkage), args.similarity,
                                    args.order, args.gram_precision)
    prepared = prepare(args.base, args.finetuned, blocks=args.blocks, method=method,
                       task_names=_names(args.task_names), mesh=_mesh(args), verify=args.verify)
    end = axis_end(prepared, args.size)
    if end is None:  # a size inside the axis: the schedule decides the model
        p = plan_prepared(prepared, linkage=linkage, similarity=args.similarity,
                          order=args.order, seed=args.order_seed,
                          gram_precision=args.gram_precision)
        _save_cut(args, p, p.step_for_size(args.size))
        return 0
    # Every task alone, or every block merged: the same model whatever the
    # schedule, so none is computed.
    step, groups, size = end
    src = prepared.source
    save_groups(args.out, prepared, groups, task_names=src.task_names, n_models=size, step=step,
                source=src.describe(), overwrite=args.overwrite)
    summary = cut_summary(prepared.partition, method, src.n,
                          dict(zip(prepared.partition.names, groups)), size, step)
    _say(f"{summary}\nsaved {size:.4f}x model to {args.out}")
    return 0


def _save_cut(args, plan, step: int) -> None:
    save_cut(args.out, plan, step=step, overwrite=args.overwrite)
    # The summary from the plan: loading the saved model back would read all of it.
    _say(f"{plan.summary_at(step)}\nsaved {plan.sizes[step]:.4f}x model to {args.out}")


def cmd_plan(args) -> int:
    _check_out(args)
    p = _plan(args)
    save(args.out, p, overwrite=args.overwrite)
    _say(f"{p}\nsizes {p.sizes[0]:.4g}x .. {p.min_size:.4g}x over {p.num_steps} steps; "
         f"saved to {args.out}")
    return 0


def cmd_cut(args) -> int:
    _check_out(args)
    inputs = {} if args.base is None else {"base": args.base, "finetuned": args.finetuned}
    obj = load(args.plan, **inputs)
    if not isinstance(obj, Plan):
        raise UserError(f"{args.plan}: a saved model, not a plan (use `flexmerge inspect`)")
    if not obj.has_inputs:
        raise UserError(
            f"{args.plan}: the plan's input checkpoints are not available; "
            "pass --base and --finetuned"
        )
    mesh = _mesh(args)
    if mesh is not None:
        obj.shard(mesh)
    _save_cut(args, obj, obj.step_for_size(args.size) if args.step is None else args.step)
    return 0


def cmd_export(args) -> int:
    if Path(args.out).exists():
        raise UserError(f"{args.out} exists; export writes a new directory")
    model = load(args.model)
    if not isinstance(model, FlexModel):
        raise UserError(f"{args.model}: a plan, not a model; cut it first "
                        "(flexmerge cut PLAN --size S --out DIR)")
    task = args.task
    if task is not None and task not in model.task_names and task.isdigit():
        task = int(task)
    export(model, args.out, task=task, format=args.format, base=args.base)
    what = "every task" if task is None else f"task {model.task_names[model.task_index(task)]}"
    _say(f"exported {what} of {args.model} as {args.format} to {args.out}")
    return 0


def cmd_inspect(args) -> int:
    obj = load(args.path)
    if isinstance(obj, Plan):
        _say(repr(obj))
        _say(f"blocks ({len(obj.partition)}): {', '.join(obj.partition.names)}")
        _say(f"tasks: {', '.join(obj.task_names)}")
        _say(f"inputs attached: {obj.has_inputs}")
        marks = sorted({round(float(s), 2) for s in (1.0, 1.5, 2.0, obj.n / 2, obj.n)
                        if s >= obj.min_size})
        for s in marks:
            k = obj.step_for_size(s)
            _say(f"  size <= {s:g}x: step {k} ({obj.sizes[k]:.4f}x)")
        return 0
    _say(obj.summary())
    _say(f"tasks: {', '.join(f'{i}={t}' for i, t in enumerate(obj.task_names))}")
    _say(f"stored parameters: {obj.stored_parameters():,.0f} "
         f"({obj.n_models:.4f} models of {obj.partition.total:,})")
    _say("routing (task -> parameter set per block):")
    width = max(len(b) for b in obj.routing)
    for b, r in obj.routing.items():
        _say(f"  {b:<{width}}  {' '.join(str(int(g)) for g in r)}")
    return 0


def cmd_demo(args) -> int:
    z = zoo_lib.load()
    if args.tasks is not None or args.examples is not None:
        z = z.subset(args.tasks, args.examples)
    presets = {k: v for k, (v, _) in demo_presets().items()}
    names = list(presets) if args.methods == "all" else (_names(args.methods) or [])
    bad = [m for m in names if m not in presets]
    if bad or not names:
        raise UserError(f"--methods: 'all' or from {','.join(presets)} (got {args.methods!r})")
    n = z.num_tasks
    sizes = [float(s) for s in _names(args.sizes)] if args.sizes else default_sizes(n)
    _say(f"FlexMerge demo: {n} tasks ({', '.join(z.task_names)}), ViT with "
         f"{z.meta.get('num_params', '?')} parameters, blocks 'vit', linkage 'min'")
    t0 = time.time()
    plans = {}
    for m in names:
        if callable(presets[m]):  # a baseline
            plans[m] = presets[m](z)
        else:
            plans[m] = plan(z.base, z.finetuned, blocks="vit", method=presets[m],
                            linkage="min", task_names=z.task_names)
    _say(f"planned {len(plans)} method(s) in {time.time() - t0:.1f}s; "
         f"evaluating {len(sizes)} sizes")
    res = sweep(plans, z.evaluate, sizes, progress=False if args.no_progress else None)
    out = Path(args.out)
    paths = res.write(out, plot=not args.no_plot)
    _say("")
    _say(res.table())
    _say("")
    _say(res.ranking_table())
    _say("")
    _say("fine-tuned accuracy: "
         + ", ".join(f"{t} {a:.3f}" for t, a in zip(z.task_names, res.ft_accuracy)))
    for m in names:
        g = res.gap_recovered(m, 2.0) if 2.0 <= n else float("nan")
        if g == g:
            one, two = res.at(m, 1.0), res.at(m, 2.0)
            _say(f"{m}: 1x {100 * one.avg_normalized:.1f}% -> {two.n_models:.2f}x "
                 f"{100 * two.avg_normalized:.1f}%: {100 * g:.0f}% of the gap to the fine-tuned "
                 "models recovered")
    _say(f"wrote {', '.join(str(p) for p in paths.values())} ({time.time() - t0:.0f}s)")
    return 0


def _add_inputs(p, required=True):
    p.add_argument("--base", required=required,
                   help="base params (.npz/.safetensors file, Hugging Face dir or index, "
                        "Orbax dir)")
    p.add_argument("--finetuned", nargs="+", required=required, metavar="PATH",
                   help="fine-tuned params files, one per task (same layout as --base)")


def _add_plan_flags(p):
    p.add_argument("--method", required=True, metavar="NAME",
                   help=" | ".join(NAMES) + " (fm.methods.get names)")
    g = p.add_argument_group("method hyperparameters (as the Python keyword arguments)")
    g.add_argument("--scale", type=float, help="lambda (ta, ties, pcb, consensus_*)")
    g.add_argument("--keep", type=float, help="TIES keep fraction / PCB threshold fraction")
    g.add_argument("--consensus", type=float, help="TALL-mask lambda_c (consensus_*)")
    g.add_argument("--drop", type=float, help="apply DARE first with this drop probability")
    g.add_argument("--seed", type=int, default=43, help="DARE seed (default 43)")
    g.add_argument("--hp", action="append", metavar="NAME=VALUE",
                   help="any other keyword argument of the method's factory, e.g. --hp t=0.3 "
                        "(slerp), --hp k=4 (tsv); repeatable; VALUE is read as JSON, else text")
    g = p.add_argument_group("planner")
    g.add_argument("--blocks", default=None,
                   help="preset name (vit, clip-vit-b32, t5-base, by-layer, per-leaf, ...) or a "
                        "JSON file with the ordered list of block names (substring rule); "
                        "default per-leaf")
    g.add_argument("--linkage", default="min",
                   help="min | mean | max (aliases single | average | complete) | none "
                        "(none: compare merged group vectors with --similarity)")
    g.add_argument("--similarity", default="cosine", help="cosine | euclidean | sign")
    g.add_argument("--order", default="greedy", help="greedy | right-left | left-right | random")
    g.add_argument("--order-seed", type=int, default=0, help="seed of --order random")
    g.add_argument("--gram-precision", default="float64", choices=("float64", "float32"),
                   help="arithmetic of every similarity (default float64; float32 is faster, "
                        "the reference's, and avoids emulated float64 on TPU)")
    g.add_argument("--task-names", help="comma-separated task names (default: file names)")
    g.add_argument("--verify", default="fast", choices=("fast", "full"),
                   help="how the plan records its input files to notice changes before a cut: "
                        "size, modification time and sampled bytes (fast, default) or a hash "
                        "of every byte (full: reads the inputs once more)")
    _add_device_flags(p)


def _add_device_flags(p):
    g = p.add_argument_group("devices (docs/multi_host.md)")
    g.add_argument("--mesh", metavar="all|N",
                   help="shard parameters over a 1-D mesh of the first N devices (all: every "
                        "device of every process)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (every process runs the same "
                        "command; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flexmerge", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true",
                       help="no progress on stderr (default: a bar on a terminal, else a line "
                            "every 10 s)")
    quiet.add_argument("--debug", action="store_true",
                       help="show the traceback of an error (and the logs of Orbax)")

    def add(name, **kw):
        return sub.add_parser(name, parents=[quiet], **kw)

    p = add("demo", help="plan and sweep sizes on the bundled model zoo")
    p.add_argument("--out", default="flexmerge-demo", help="output directory (JSON, CSV, PNG)")
    p.add_argument("--methods", default=DEMO_METHODS,
                   help=f"comma-separated, or 'all' (every method and baseline; ~5 min); "
                        f"default {DEMO_METHODS}")
    p.add_argument("--sizes", help="comma-separated sizes in models (default 1,1.1,...,n)")
    p.add_argument("--tasks", type=int, help="use only the first K tasks")
    p.add_argument("--examples", type=int, help="use only the first N test examples per task")
    p.add_argument("--no-plot", action="store_true", help="skip sweep.png (no matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="same as --quiet")
    p.set_defaults(fn=cmd_demo)

    p = add("merge", help="plan and save the model at one size")
    _add_inputs(p)
    _add_plan_flags(p)
    p.add_argument("--size", type=float, required=True, help="target size in models (1 .. n)")
    p.add_argument("--out", required=True, help="the directory to write (must not exist)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it holds only what a flexmerge save wrote")
    p.set_defaults(fn=cmd_merge)

    p = add("plan", help="compute and save the whole schedule")
    _add_inputs(p)
    _add_plan_flags(p)
    p.add_argument("--out", required=True, help="the directory to write (must not exist)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it holds only what a flexmerge save wrote")
    p.set_defaults(fn=cmd_plan)

    p = add("cut", help="save the model at one size of a saved plan")
    p.add_argument("plan", help="a plan directory (flexmerge plan)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--size", type=float, help="target size in models: the first step at or "
                                              "below it")
    g.add_argument("--step", type=int, help="a step of the schedule (flexmerge inspect PLAN)")
    _add_inputs(p, required=False)
    p.add_argument("--out", required=True, help="the directory to write (must not exist)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it holds only what a flexmerge save wrote")
    _add_device_flags(p)
    p.set_defaults(fn=cmd_cut)

    p = add("export", help="write tasks of a saved model as ordinary checkpoints")
    p.add_argument("model", help="a model directory (flexmerge merge / cut)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="the task's name (or index): OUT is its checkpoint")
    g.add_argument("--all-tasks", action="store_true", help="every task, in OUT/<task name>")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors (model.safetensors), npz (params.npz), orbax (an Orbax "
                        "checkpoint), hf (a Hugging Face directory like the base: its config and "
                        "tokenizer files, tensor names, dtypes and shards); default safetensors")
    p.add_argument("--base", help="for --format hf: the Hugging Face directory to mirror "
                                  "(default: the base the model was planned from)")
    p.add_argument("--out", required=True,
                   help="--task: the checkpoint to write; --all-tasks: a directory of them")
    p.set_defaults(fn=cmd_export)

    p = add("inspect", help="routing table, sizes and groups of a saved model or plan")
    p.add_argument("path", help="a model or plan directory")
    p.set_defaults(fn=cmd_inspect)
    return ap


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line for a terminal user (no source file and line)."""
    print(f"flexmerge: warning: {message}", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that partial output is removed
    on the way out, as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def _error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # "[Errno 28] ...: 'path'" -> "path: ..."
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


class _NativeThreadsQuiet:
    """``sys.stderr`` for the CLI without ``--debug``: drops what threads
    that Python did not start write. Those are TensorStore's I/O threads,
    whose callbacks print ``RuntimeError: Event loop is closed`` tracebacks
    (dozens, before the one useful line) once Orbax gave up on a failed
    write, e.g. on a full disk; Python threads (warnings) still print."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if isinstance(threading.current_thread(), threading._DummyThread):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv=None) -> int:
    """Entry point of the ``flexmerge`` console script; returns the exit code.

    Expected failures (a bad input, an output that cannot be written, a full
    disk) print one line and return 2 (``--debug``: with the traceback);
    Ctrl-C returns 130 and SIGTERM 143, after removing partial output.
    """
    args = build_parser().parse_args(argv)
    default, progress.DEFAULT = progress.DEFAULT, not args.quiet
    debug = args.debug
    absl = logging.getLogger("absl")  # Orbax logs each failed write with its traceback
    level = absl.level
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        previous = signal.signal(signal.SIGTERM, _terminate)
    stderr = sys.stderr
    if not debug:
        absl.setLevel(logging.CRITICAL)
        sys.stderr = _NativeThreadsQuiet(stderr)
    try:
        if getattr(args, "distributed", False):
            _distributed()
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return int(args.fn(args) or 0)
    except BrokenPipeError:  # e.g. `flexmerge inspect DIR | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141
    except (UserError, ValueError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"flexmerge: error: {_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flexmerge: interrupted; no partial output left", file=sys.stderr)
        return 130
    except Terminated:
        print("flexmerge: terminated (SIGTERM); no partial output left", file=sys.stderr)
        return 143
    finally:
        progress.DEFAULT = default
        absl.setLevel(level)
        sys.stderr = stderr
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def run() -> NoReturn:
    """The ``flexmerge`` console script (and ``python -m flexmerge_jax.cli``):
    :func:`main` on ``sys.argv``, then the process ends at once.

    A command returns only once its work is done: its outputs are synced to
    disk before they are claimed. What a normal interpreter exit would still
    do is, first, what this does too: wait for non-daemon threads (after
    ``concurrent.futures`` lets its idle workers go) and run the ``atexit``
    handlers (jax's own clean-up, ``jax.distributed``'s shutdown, logging's
    flush); then tear down, object by object, the modules, XLA's client and
    TensorStore's state: a noticeable part of a short command
    (docs/performance.md), of no use to a process about to end. So after
    those steps the standard streams are flushed and ``os._exit`` ends the
    process with :func:`main`'s exit code (141 if stdout's reader is gone
    by then, as :func:`main` returns when it notices that itself).
    """
    code = main()
    # The interpreter's own exit steps (CPython's, undocumented), in its order.
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the descriptor was closed at start-up
                stream.flush()
        except BrokenPipeError:
            code = code or 141
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
