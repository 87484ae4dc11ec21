"""The stacked model on the device: per block its sets, routing and masks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._flexmodel import FlexModel
from ..tree import flatten as flatten_tree

__all__ = ["BlockStack", "ServeState", "stack"]

PyTree = Any


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass
class BlockStack:
    """One block on the device: its stacked sets, routing and masks.

    Variants: ``0..g-1`` are the sets themselves; ``g + j`` is masked slot j
    (a task routed to a masked set), deployed as
    ``base + (sets[mask_set[j]] - base) * (unpack(masks[j]) * rescalers[j])``.

    Attributes:
      sets: ``{leaf: [g, *shape]}`` (full leaf names).
      variant: ``int32[n]`` the variant of each task (routing, as data).
      base: ``{leaf: [*shape]}`` or ``None`` (only with masked sets).
      masks: ``{leaf: uint8[n_masked, ceil(numel / 8)]}`` bit-packed
        (little bit order) or ``{leaf: bool[n_masked, *shape]}``, or ``None``.
      mask_set: ``int32[n_masked]`` the set of each masked slot, or ``None``.
      rescalers: ``float32[n_masked]``, or ``None``.
      name: block name (static).
      leaves: leaf names (static).
      shapes: leaf shapes (static).
      kind: ``"block"``, ``"unmatched"`` (a parameter in no block, per task)
        or ``"per_task"`` (e.g. a classification head).
      packed: masks are bit-packed.
    """

    sets: dict
    variant: Any
    base: dict | None = None
    masks: dict | None = None
    mask_set: Any = None
    rescalers: Any = None
    name: str = ""
    leaves: tuple = ()
    shapes: tuple = ()
    kind: str = "block"
    packed: bool = True

    def tree_flatten(self):
        children = (self.sets, self.variant, self.base, self.masks, self.mask_set, self.rescalers)
        return children, (self.name, self.leaves, self.shapes, self.kind, self.packed)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def num_sets(self) -> int:
        return int(self.sets[self.leaves[0]].shape[0])

    @property
    def num_masked(self) -> int:
        return 0 if self.mask_set is None else int(self.mask_set.shape[0])

    @property
    def num_variants(self) -> int:
        return self.num_sets + self.num_masked

    @property
    def numel(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))


@jax.tree_util.register_pytree_node_class
class ServeState:
    """A FlexModel stacked for serving (a pytree: pass it to jitted functions).

    Attributes:
      blocks: ``{name: BlockStack}`` — the model's blocks, one pseudo-block
        per unmatched parameter (``kind="unmatched"``, one set per task) and
        one per ``per_task`` entry (``kind="per_task"``).
      task_names: the n task names.
      info: ``{"n_models", "method", "stored_parameters"}`` of the source
        model (host-side only; empty inside jitted code).
    """

    def __init__(self, blocks: Mapping[str, BlockStack], task_names: Sequence[str], info=None):
        self.blocks = dict(blocks)
        self.task_names = tuple(task_names)
        self.info = dict(info or {})
        self.leaf_block = {leaf: name for name, b in self.blocks.items() for leaf in b.leaves}

    def tree_flatten(self):
        names = tuple(self.blocks)
        return tuple(self.blocks[k] for k in names), (names, self.task_names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        names, task_names = aux
        return cls(dict(zip(names, children)), task_names)

    @property
    def n(self) -> int:
        return len(self.task_names)

    def nbytes(self) -> dict[str, int]:
        """Bytes held on the device, by kind.

        ``params``: stacked sets and bases of the model's blocks and unmatched
        parameters — exactly ``itemsize * (stored parameters without the mask
        term)``; ``masks``: bit-packed masks; ``tables``: routing tables and
        rescalers; ``per_task``: extra per-task parameters (heads); ``total``.
        """
        out = {"params": 0, "masks": 0, "tables": 0, "per_task": 0}
        for b in self.blocks.values():
            p = sum(int(a.nbytes) for a in b.sets.values())
            p += sum(int(a.nbytes) for a in (b.base or {}).values())
            out["per_task" if b.kind == "per_task" else "params"] += p
            out["masks"] += sum(int(a.nbytes) for a in (b.masks or {}).values())
            out["tables"] += sum(
                int(a.nbytes) for a in (b.variant, b.mask_set, b.rescalers) if a is not None
            )
        out["total"] = sum(out.values())
        return out

    def stored_parameters(self) -> float:
        """Held entries in the reference's accounting (one mask bit = 1/32).

        Equals :meth:`FlexModel.stored_parameters` up to the byte padding of
        each packed mask (at most 7 bits per leaf and mask); per-task extras
        (heads) are not counted, as in the model.
        """
        total = 0.0
        for b in self.blocks.values():
            if b.kind == "per_task":
                continue
            total += sum(int(a.size) for a in b.sets.values())
            total += sum(int(a.size) for a in (b.base or {}).values())
            for a in (b.masks or {}).values():
                total += (a.size * 8 if b.packed else a.size) / 32
        return total

    def summary(self) -> str:
        nb = self.nbytes()
        lines = [
            f"ServeState: {self.n} tasks, {len(self.blocks)} blocks, "
            + ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in nb.items())
        ]
        for name, b in self.blocks.items():
            lines.append(
                f"  {name}: {b.num_sets} set(s)"
                + (f" + {b.num_masked} masked task(s)" if b.num_masked else "")
                + (f" [{b.kind}]" if b.kind != "block" else "")
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ServeState(n={self.n}, blocks={len(self.blocks)}, bytes={self.nbytes()['total']})"


def _as_array(x, dtype):
    a = jnp.asarray(x)
    if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(dtype)
    return a


def stack(
    model: FlexModel,
    *,
    per_task: Mapping[str, Sequence[PyTree]] | None = None,
    dtype=None,
    pack_masks: bool = True,
) -> ServeState:
    """Stacks a FlexModel for serving: per block its g_b sets, never per task.

    Args:
      model: the deployed model (any size, any method).
      per_task: extra per-task parameters that are not in the model (e.g.
        ``{"head": [head_0, ..., head_{n-1}]}``): each a list of n pytrees of
        identical structure and shapes (pad them first, see
        :func:`flexmerge_jax.zoo.padded_heads`), addressed by ``"<name>/<leaf path>"``.
      dtype: cast floating parameters (e.g. ``jnp.bfloat16``); ``None`` keeps
        the model's dtypes. Masked deployment is computed in float32.
      pack_masks: bit-pack masks (8 per byte, the size the model is counted
        with); ``False`` keeps one bool byte per entry (8x the masks' memory,
        no unpacking per call).

    Returns:
      A :class:`ServeState`; the FlexModel can be dropped afterwards.
    """
    n = model.n
    blocks: dict[str, BlockStack] = {}
    for name, b in model.blocks.items():
        g = len(b.sets)
        sets = {k: _as_array(jnp.stack([jnp.asarray(s[k]) for s in b.sets]), dtype)
                for k in b.leaves}
        routing = np.asarray(b.routing, np.int32)
        masked = np.asarray(b.masked, bool)
        slots = [t for t in range(n) if masked[routing[t]]]
        variant = routing.copy()
        for j, t in enumerate(slots):
            variant[t] = g + j
        shapes = tuple(tuple(int(d) for d in sets[k].shape[1:]) for k in b.leaves)
        base = masks = mask_set = rescalers = None
        if slots:
            base = {k: _as_array(b.base[k], dtype) for k in b.leaves}
            masks = {}
            for k in b.leaves:
                m = np.stack([np.asarray(b.masks[t][k], bool).reshape(-1) for t in slots])
                masks[k] = jnp.asarray(np.packbits(m, axis=-1, bitorder="little") if pack_masks
                                       else m.reshape((len(slots),) + sets[k].shape[1:]))
            mask_set = jnp.asarray(routing[slots], jnp.int32)
            rescalers = jnp.asarray(np.asarray(b.rescalers, np.float32)[slots])
        blocks[name] = BlockStack(sets, jnp.asarray(variant), base, masks, mask_set, rescalers,
                                  name, tuple(b.leaves), shapes, "block", bool(pack_masks))
    for leaf in model.partition.unmatched:
        a = _as_array(jnp.stack([jnp.asarray(u[leaf]) for u in model.unmatched]), dtype)
        blocks[leaf] = BlockStack({leaf: a}, jnp.arange(n, dtype=jnp.int32), name=leaf,
                                  leaves=(leaf,), shapes=(tuple(a.shape[1:]),), kind="unmatched")
    for name, trees in (per_task or {}).items():
        if len(trees) != n:
            raise ValueError(
                f"per_task[{name!r}] has {len(trees)} entries, expected {n} (one per task)")
        flat = [flatten_tree(t) for t in trees]
        names0 = flat[0][0]
        for i, (nm, lv, _) in enumerate(flat):
            if nm != names0 or [np.shape(x) for x in lv] != [np.shape(x) for x in flat[0][1]]:
                raise ValueError(f"per_task[{name!r}][{i}] differs in structure or shapes from "
                                 f"entry 0; pad them to common shapes (e.g. zoo.padded_heads)")
        leaves = tuple(f"{name}/{k}" if k else name for k in names0)
        sets = {leaf: _as_array(jnp.stack([jnp.asarray(f[1][j]) for f in flat]), dtype)
                for j, leaf in enumerate(leaves)}
        if name in blocks or any(lf in model.layout.names for lf in leaves):
            raise ValueError(f"per_task name {name!r} collides with a model parameter or block")
        blocks[name] = BlockStack(sets, jnp.arange(n, dtype=jnp.int32), name=name, leaves=leaves,
                                  shapes=tuple(tuple(sets[lf].shape[1:]) for lf in leaves),
                                  kind="per_task")
    info = {"n_models": model.n_models, "method": model.method.describe(),
            "stored_parameters": model.stored_parameters()}
    return ServeState(blocks, model.task_names, info)
