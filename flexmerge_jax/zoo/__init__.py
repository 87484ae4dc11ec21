"""The real model zoo: a small ViT, 8 fine-tuned backbones, their heads and test sets.

Loading needs no training, no network and no flax::

    from flexmerge_jax.zoo import load
    zoo = load()
    zoo.task_names                 # ('fmnist', 'fmnist_tops', ...)
    zoo.base                       # nested dict of np.float32 arrays (string keys only)
    zoo.finetuned[i]               # same structure, fine-tuned on task i
    zoo.heads[i]                   # {"kernel": [feat, n_classes_i], "bias": [n_classes_i]}
    zoo.test_sets[i].images        # uint8 [N_i, 28, 28]; .labels int32 [N_i]
    zoo.evaluate(params, i)        # accuracy of a backbone with task i's head on its test set
    zoo.evaluate_all([p0, ..., p7])  # one backbone per task (or one dict for all)

The shipped files live in ``flexmerge_jax/zoo/data`` and are produced by
``benchmarks/zoo/build_zoo.py`` (record: ``zoo.meta``, i.e. ``zoo.json``).
The functional apply is in :mod:`flexmerge_jax.zoo.apply`; the flax nnx module that
it mirrors is in :mod:`flexmerge_jax.zoo.model` (imports flax); its mixed-task
forward for :mod:`flexmerge_jax.serve` (:func:`vit_forward`, :func:`padded_heads`)
in :mod:`flexmerge_jax.zoo.serving`.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flexmerge_jax.zoo import apply as F
from flexmerge_jax.zoo.apply import (
    CONFIG,
    ViTConfig,
    flatten,
    leaf_names,
    param_shapes,
    unflatten,
)
from flexmerge_jax.zoo.serving import padded_heads, vit_forward

__all__ = [
    "DATA_DIR", "TestSet", "Zoo", "load", "CONFIG", "ViTConfig", "leaf_names", "param_shapes",
    "vit_forward", "padded_heads",
]

DATA_DIR = Path(__file__).resolve().parent / "data"


class TestSet(NamedTuple):
    images: np.ndarray  # uint8 [N, 28, 28], pixel values 0..255
    labels: np.ndarray  # int32 [N]

    __test__ = False  # not a pytest class


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for v in out.values():
        v.setflags(write=False)
    return out


def _acc_or_none(tasks: Sequence[Mapping[str, Any]], key: str):
    vals = [t.get(key) for t in tasks]
    return None if any(v is None for v in vals) else tuple(float(v) for v in vals)


class Zoo:
    """The loaded zoo. Arrays are read-only numpy arrays (copy before mutating)."""

    def __init__(self, path: Path):
        path = Path(path)
        self.path = path
        self.meta: dict = json.loads((path / "zoo.json").read_text())
        self.config = ViTConfig.from_dict(self.meta["config"])
        tasks = self.meta["tasks"]
        self.task_names: tuple[str, ...] = tuple(t["name"] for t in tasks)
        self.num_classes: tuple[int, ...] = tuple(int(t["n_classes"]) for t in tasks)
        self.class_names: tuple[tuple[str, ...], ...] = tuple(tuple(t["classes"]) for t in tasks)
        files = self.meta["files"]
        self.base: dict = unflatten(_read_npz(path / files["base"]))
        self.finetuned: list[dict] = [unflatten(_read_npz(path / f)) for f in files["finetuned"]]
        h = _read_npz(path / files["heads"])
        self.heads: list[dict] = [{"kernel": h[f"{n}/kernel"], "bias": h[f"{n}/bias"]}
                                  for n in self.task_names]
        t = _read_npz(path / files["test_sets"])
        self.test_sets: tuple[TestSet, ...] = tuple(
            TestSet(t[f"{n}/images"], t[f"{n}/labels"]) for n in self.task_names
        )
        #: accuracies recorded by the build (on the shipped test sets); None before they exist
        self.base_accuracy = _acc_or_none(tasks, "base_accuracy")
        self.ft_accuracy = _acc_or_none(tasks, "ft_accuracy")
        self._eval = None

    def subset(self, num_tasks: int | None = None, max_examples: int | None = None) -> Zoo:
        """A smaller zoo: the first ``num_tasks`` tasks, the first
        ``max_examples`` test examples of each (for quick runs and tests).

        The recorded accuracies are dropped (``None``) when ``max_examples``
        changes the test sets, since they no longer apply.
        """
        k = self.num_tasks if num_tasks is None else int(num_tasks)
        if not 2 <= k <= self.num_tasks:
            raise ValueError(f"num_tasks must be in [2, {self.num_tasks}], got {k}")
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        z = copy.copy(self)
        z.task_names, z.num_classes = self.task_names[:k], self.num_classes[:k]
        z.class_names = self.class_names[:k]
        z.finetuned, z.heads = self.finetuned[:k], self.heads[:k]
        z.test_sets = tuple(
            TestSet(ts.images[:max_examples], ts.labels[:max_examples]) for ts in self.test_sets[:k]
        )
        cut = max_examples is not None and any(
            len(ts.labels) > max_examples for ts in self.test_sets[:k]
        )
        z.base_accuracy = None if cut or self.base_accuracy is None else self.base_accuracy[:k]
        z.ft_accuracy = None if cut or self.ft_accuracy is None else self.ft_accuracy[:k]
        z._eval = None
        return z

    # ------------------------------------------------------------------ basics
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def leaf_names(self) -> list[str]:
        return leaf_names(self.config.depth)

    def task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            return self.task_names.index(task)
        i = int(task)
        if not 0 <= i < self.num_tasks:
            raise IndexError(f"task {task} out of range 0..{self.num_tasks - 1}")
        return i

    def task_vector(self, task: int | str) -> dict:
        """``finetuned[task] - base`` as a nested dict of float32 arrays."""
        ft = flatten(self.finetuned[self.task_index(task)])
        b = flatten(self.base)
        return unflatten({k: (ft[k] - b[k]).astype(np.float32) for k in self.leaf_names})

    def __repr__(self) -> str:
        return (f"Zoo({self.num_tasks} tasks {self.task_names}, depth={self.config.depth}, "
                f"width={self.config.width}, params={self.meta.get('num_params')}, "
                f"path={str(self.path)!r})")

    # ------------------------------------------------------------------ evaluation
    def _evaluator(self):
        """Build (once) a jitted evaluator shared by every task.

        All test sets are padded to the same size and all heads to the same number of
        classes (padded logits masked out), so a single compilation serves every call
        with backbone params of the zoo's shapes.
        """
        if self._eval is None:
            n = max(len(ts.labels) for ts in self.test_sets)
            c = max(self.num_classes)
            d = self.heads[0]["kernel"].shape[0]
            data = []
            for ts, head, k in zip(self.test_sets, self.heads, self.num_classes):
                m = len(ts.labels)
                imgs = np.zeros((n,) + ts.images.shape[1:], np.uint8)
                imgs[:m] = ts.images
                labels = np.full((n,), -1, np.int32)
                labels[:m] = ts.labels
                kern = np.zeros((d, c), np.float32)
                kern[:, :k] = head["kernel"]
                bias = np.zeros((c,), np.float32)
                bias[:k] = head["bias"]
                cmask = np.arange(c) < k
                data.append(tuple(jnp.asarray(a) for a in (imgs, labels, kern, bias, cmask)) + (m,))
            num_heads = self.config.num_heads

            @jax.jit
            def n_correct(params, imgs, labels, kern, bias, cmask):
                feats = F.features(params, imgs, num_heads)
                lg = F.head_logits({"kernel": kern, "bias": bias}, feats)
                pred = jnp.argmax(jnp.where(cmask[None, :], lg, -jnp.inf), axis=-1)
                return jnp.sum(pred == labels)  # padded rows have label -1: never counted

            def to_f32(params):
                return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), dict(params))

            self._eval = (n_correct, data, to_f32)
        return self._eval

    def evaluate(self, params: Mapping[str, Any], task: int | str) -> float:
        """Accuracy in [0, 1] of backbone ``params`` with task ``task``'s head on its shipped
        test set.

        ``params`` must have the zoo's backbone structure (numpy or jax arrays). The apply is
        jitted once per Zoo and reused: calling with different params of the same shapes does
        not recompile.
        """
        fn, data, to_f32 = self._evaluator()
        imgs, labels, kern, bias, cmask, m = data[self.task_index(task)]
        return int(fn(to_f32(params), imgs, labels, kern, bias, cmask)) / m

    def evaluate_all(
        self, params_per_task: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    ) -> list[float]:
        """Accuracy on every task: ``params_per_task[i]`` is used for task i; a single
        backbone dict is used for all tasks."""
        if isinstance(params_per_task, Mapping):
            params_per_task = [params_per_task] * self.num_tasks
        if len(params_per_task) != self.num_tasks:
            raise ValueError(f"expected {self.num_tasks} backbones, got {len(params_per_task)}")
        return [self.evaluate(p, i) for i, p in enumerate(params_per_task)]


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> Zoo:
    return Zoo(Path(path))


def load(path: str | Path | None = None, *, cache: bool = True) -> Zoo:
    """Load the shipped zoo (or one at ``path``). Cached per path unless ``cache=False``."""
    p = Path(path) if path is not None else DATA_DIR
    if not (p / "zoo.json").exists():
        raise FileNotFoundError(
            f"no zoo at {p} (missing zoo.json); build it with "
            "`python benchmarks/zoo/build_zoo.py --out flexmerge_jax/zoo/data`"
        )
    if cache:
        return _load_cached(str(p.resolve()))
    return Zoo(p)
