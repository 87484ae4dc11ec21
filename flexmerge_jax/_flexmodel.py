"""FlexModel: a deployable model of some size between 1x and nx.

Per block: the partition of the tasks into groups (the reference's
union-find groups), a routing table task -> parameter set, and the
parameter sets themselves. A parameter set is either a full set of the
block's parameters shared by every task routed to it (a merged group, or a
task's own fine-tuned parameters), or — for mask methods — the merged
parameters :math:`W=\\theta_0+v` of a group, deployed for task k as
:math:`\\theta_0+(W-\\theta_0)\\odot(\\gamma_k M_k)` with a boolean mask
:math:`M_k` and a rescaler :math:`\\gamma_k` (1 for consensus methods).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .blocks import Partition
from .methods import Method
from .tree import Layout

PyTree = Any


@dataclasses.dataclass
class BlockModel:
    """The deployed state of one block.

    Attributes:
      name: block name.
      leaves: the block's parameter names (layout order).
      groups: the partition of the tasks (sorted tuples, sorted by first task).
      routing: ``int32[n]`` parameter set of each task.
      sets: one ``{name: array}`` per parameter set (full parameters).
      masked: ``bool[len(sets)]``: the set is a masked merged group.
      base: ``{name: array}`` base parameters, present iff a set is masked.
      masks: ``{task: {name: bool array}}`` for tasks routed to masked sets.
      rescalers: ``f32[n]`` (1 where unused).
    """

    name: str
    leaves: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    routing: np.ndarray
    sets: list[dict[str, Any]]
    masked: np.ndarray
    base: dict[str, Any] | None = None
    masks: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    rescalers: np.ndarray | None = None

    def stored_parameters(self, numel: int) -> float:
        """Stored entries as the reference counts them (1-bit masks = 1/32)."""
        total = len(self.sets) * numel
        if self.base is not None:
            total += numel
        total += len(self.masks) * numel / 32
        return total


@jax.jit
def deploy_masked(base, w, mask, gamma):
    b = base.astype(jnp.float32)
    out = b + (w.astype(jnp.float32) - b) * (mask.astype(jnp.float32) * gamma)
    return out.astype(base.dtype)


class FlexModel:
    """A cut of the accuracy-size axis: routing tables and parameter sets.

    Attributes:
      task_names: the n task names.
      method: the :class:`~flexmerge_jax.methods.Method`.
      n_models: deployed size in units of one model (reference accounting).
      step: number of merges applied (``None`` for a one-shot merge).
      blocks: ``{block name: BlockModel}`` in block order.
      source: where the inputs came from (a :meth:`Source.describe`
        dict, e.g. the base checkpoint's path, which :func:`~flexmerge_jax.export`
        mirrors), or ``None``.
    """

    def __init__(
        self,
        *,
        layout: Layout,
        partition: Partition,
        method: Method,
        task_names: Sequence[str],
        blocks: Sequence[BlockModel],
        unmatched: Sequence[dict[str, Any]],
        n_models: float,
        step: int | None,
        source: dict | None = None,
    ):
        self.layout = layout
        self.partition = partition
        self.method = method
        self.task_names = tuple(task_names)
        self.blocks = {b.name: b for b in blocks}
        self.unmatched = list(unmatched)
        self.n_models = float(n_models)
        self.step = step
        self.source = source

    @property
    def n(self) -> int:
        """Number of tasks."""
        return len(self.task_names)

    @property
    def routing(self) -> dict[str, np.ndarray]:
        """``{block name: int32[n]}``: each task's parameter set per block."""
        return {name: b.routing for name, b in self.blocks.items()}

    def groups(self, block: str) -> tuple[tuple[int, ...], ...]:
        """The partition of the tasks in ``block`` (union-find groups)."""
        return self.blocks[block].groups

    def task_index(self, task: int | str) -> int:
        if isinstance(task, str):
            if task not in self.task_names:
                raise ValueError(f"unknown task {task!r}; tasks: {list(self.task_names)}")
            return self.task_names.index(task)
        i = int(task)
        if not 0 <= i < self.n:
            raise ValueError(f"task index {i} outside [0, {self.n})")
        return i

    def params_for_task(self, task: int | str) -> PyTree:
        """Full params pytree of one task.

        Blocks shared by several tasks hold the *same* array objects for
        every task routed to them (no copies); masked sets are deployed as
        :math:`\\theta_0 + (W-\\theta_0)\\odot(\\gamma_k M_k)`.

        Args:
          task: task index or name.

        Returns:
          A pytree with the structure of the input params (nested dicts when
          the structure is unknown, e.g. after :func:`flexmerge_jax.load`).
        """
        i = self.task_index(task)
        flat: dict[str, Any] = dict(self.unmatched[i])
        for b in self.blocks.values():
            s = int(b.routing[i])
            params = b.sets[s]
            if b.masked[s]:
                g = jnp.float32(b.rescalers[i])
                for k in b.leaves:
                    flat[k] = deploy_masked(b.base[k], params[k], b.masks[i][k], g)
            else:
                flat.update(params)
        return self.layout.unflatten([flat[k] for k in self.layout.names])

    def stored_parameters(self) -> float:
        """Stored entries (reference accounting) — ``n_models * P``."""
        total = sum(
            b.stored_parameters(p.numel)
            for b, p in zip(self.blocks.values(), self.partition.blocks)
        )
        return total + self.n * self.partition.unmatched_numel

    def summary(self) -> str:
        """Human-readable routing table and sizes."""
        return summary_text(
            self.n, self.method, self.n_models, self.step,
            {name: (len(b.sets), b.groups) for name, b in self.blocks.items()},
            self.partition.unmatched,
        )

    def __repr__(self) -> str:
        return (
            f"FlexModel(n={self.n}, method={self.method.describe()}, "
            f"n_models={self.n_models:.4f}, blocks={len(self.blocks)})"
        )


def summary_text(n: int, method: Method, n_models: float, step, blocks: dict,
                 unmatched: Sequence[str]) -> str:
    """The text of :meth:`FlexModel.summary`; ``blocks``: ``{name: (number
    of parameter sets, groups)}`` (also computed from a plan alone)."""
    lines = [
        f"FlexModel: {n} tasks, method {method.describe()}, size {n_models:.4f}x"
        + (f" (step {step})" if step is not None else ""),
    ]
    width = max(len(name) for name in blocks)
    for name, (sets, groups) in blocks.items():
        text = " ".join("{" + ",".join(map(str, g)) + "}" for g in groups)
        lines.append(f"  {name:<{width}}  {sets} set(s)  {text}")
    if unmatched:
        lines.append(f"  unmatched (per task): {', '.join(unmatched)}")
    return "\n".join(lines)
