r"""What a merge method is: pure functions plus declared, static traits.

A method is a :class:`Method` value built by a factory (``ties(scale=1.2,
keep=0.2)``), in the spirit of ``optax.GradientTransformation``: the factory
closes nothing over at run time; it records the hyperparameters and points
at module-level pure functions, so that two equal methods share compiled
programs. Nothing outside :mod:`flexmerge_jax.methods` looks at a method's
name: the planner, statistics, sharding, tuning, baselines and CLI read its
traits and call its functions.

The functions (all pure; ``x`` is one block's preprocessed task vectors
``{name: f32[n, ...]}``, ``members`` a ``bool[n]`` group):

* ``merge(x, members, state, **hyper) -> GroupMerge``: one group's merge;
  jit-, vmap- and (where the method is differentiable) grad-able in its
  numeric hyperparameters.
* ``block_state(x, info, **static) -> dict`` (optional): per-block state
  shared by every group of the block (TSV's SVDs, Breadcrumbs' masks,
  DELLA's pruned vectors, PCB's clip bounds), passed to ``merge`` as
  ``state``; ``info`` is a :class:`BlockInfo`.
* ``prepare(leaves, total, **static) -> Any`` (optional): whole-model
  per-task statistics computed once before any block (PCB's thresholds),
  handed to ``block_state`` in ``info.prepared``.

Hyperparameters are split in two: ``numeric`` ones (``jax.typing.ArrayLike``;
traced under ``jit``/``vmap``/``grad``) and ``static`` ones (Python values
that fix shapes, order statistics or code paths; part of the compilation
key). The global TIES trim (``trim_keep``) and DARE (``sparsify``) are
preprocessing steps the engine applies to every task vector before merging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Method", "GroupMerge", "BlockInfo", "Traits", "Dare", "is_traced"]


class GroupMerge(NamedTuple):
    """Result of merging one group of one block.

    Attributes:
      vector: ``{name: f32[...]}`` the merged task vector (including
        :math:`\\lambda`); the group vector used for similarities.
      masks: ``{name: bool[n, ...]}`` per-task masks (mask methods), else
        ``None``; rows of non-members are all False.
      rescalers: ``f32[n]`` (EMR; 1 for consensus), else ``None``.
    """

    vector: dict
    masks: dict | None
    rescalers: jax.Array | None


class BlockInfo(NamedTuple):
    """What ``block_state`` may use besides the block's task vectors.

    Attributes:
      numel: entries of one task in the block.
      key: the block's PRNG key (``fold_in(key(method.seed), b)``) for
        methods with a ``seed``, else ``None``.
      prepared: the result of the method's ``prepare`` (or ``None``).
    """

    numel: int
    key: jax.Array | None
    prepared: Any


class Traits(NamedTuple):
    """Static facts about a method that the planner and its callers ask.

    Attributes:
      uses_masks: merged groups store a vector plus per-task boolean masks
        (and rescalers); groups of 2 tasks are then not merged (the
        reference's size floor ``2 + n/32``).
      linear: the group vector is ``scale * mean`` (or ``* sum`` with
        ``sums``) of the members' task vectors, so similarities follow from
        Gram matrices alone.
      sums: linear over the sum of the members (not their mean).
      whole_parameter: the kernels factor, sort or contract whole parameters
        (a mesh axis of type ``Explicit`` cannot run them).
      tasks: the exact number of tasks the method merges (SLERP: 2), or
        ``None`` for any group size.
      tunable: per-merge :math:`\\lambda` tuning on validation data (the
        reference's ``--USE_VAL``) applies.
      keep_block_state: ``block_state`` is small and computed once per
        block and kept (PCB), rather than recomputed from the block at each
        use (TSV's SVDs).
      elementwise: each entry of ``merge``'s outputs depends only on that
        entry of the task vectors (``x`` and the masks alike), and any
        reduction over the block is unchanged by extra zero entries (TIES'
        majority sign); the engine may then merge a block's parameters
        flattened and concatenated into one zero-padded row, with one
        compiled program for every block of a similar size
        (:mod:`flexmerge_jax._flat`).
    """

    uses_masks: bool = False
    linear: bool = False
    sums: bool = False
    whole_parameter: bool = False
    tasks: int | None = None
    tunable: bool = False
    keep_block_state: bool = False
    elementwise: bool = False


class Dare(NamedTuple):
    """DARE's random drop before merging (see :func:`flexmerge_jax.methods.dare`).

    Attributes:
      drop: drop probability :math:`p` in ``[0, 1)``.
      seed: ``jax.random.key(seed)`` seeds every task and parameter.
    """

    drop: float
    seed: int


def is_traced(v) -> bool:
    """Whether ``v`` is a JAX tracer (a hyperparameter under jit/vmap/grad)."""
    return isinstance(v, jax.core.Tracer)


# Fields of the saved record of built-in methods (the format of plans saved
# before methods became modules); other hyperparameters go to "options".
SAVED_FIELDS = {"scale": 1.0, "keep": 1.0, "consensus": 0.3}


def plain_value(v):
    """A hyperparameter as saved (arrays as floats; tracers cannot be saved)."""
    if is_traced(v):
        raise ValueError("a method with traced hyperparameters cannot be saved")
    return float(v) if hasattr(v, "dtype") else v


def _placeholder(k: str) -> str:
    return f"<traced {k}>"


@dataclasses.dataclass(frozen=True)
class Method:
    """A merge method with its hyperparameters (see the module docstring).

    Build it with a factory (``fm.methods.ties(...)``) or, for your own
    method, directly (see ``docs/adding_a_method.md``).

    Attributes:
      name: the method's name (built-in methods: their registry name).
      merge: ``merge(x, members, state, **hyper) -> GroupMerge``.
      numeric: ``((name, value), ...)`` traceable hyperparameters.
      static: ``((name, value), ...)`` hyperparameters fixed at trace time
        (hashable, JSON-able).
      traits: :class:`Traits`.
      block_state: optional per-block state (see the module docstring).
      prepare: optional whole-model statistics (see the module docstring).
      trim_keep: keep fraction of the reference's global per-task TIES
        magnitude trim applied before merging, or ``None``.
      sparsify: :class:`Dare` applied before merging, or ``None``.
      seed: seed of the per-block PRNG keys given to ``block_state``.
      builtin: whether :func:`flexmerge_jax.methods.get` rebuilds it from
        its name and hyperparameters (what saved plans record).
    """

    name: str
    merge: Callable[..., GroupMerge]
    numeric: tuple = ()
    static: tuple = ()
    traits: Traits = Traits()
    block_state: Callable[..., dict] | None = None
    prepare: Callable[..., Any] | None = None
    trim_keep: float | None = None
    sparsify: Dare | None = None
    seed: int | None = None
    builtin: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Method.name must be a non-empty string, got {self.name!r}")
        if not callable(self.merge):
            raise ValueError(f"method {self.name!r}: merge must be callable")
        if not isinstance(self.traits, Traits):
            raise ValueError(f"method {self.name!r}: traits must be a methods.Traits")
        clash = {k for k, _ in self.numeric} & {k for k, _ in self.static}
        if clash:
            raise ValueError(f"method {self.name!r}: hyperparameter {sorted(clash)[0]!r} is "
                             "both numeric and static")

    # -- hyperparameters -----------------------------------------------------
    def hyper(self) -> dict[str, Any]:
        """Every hyperparameter ``merge`` takes, as keyword arguments."""
        return {**dict(self.numeric), **dict(self.static)}

    @property
    def scale(self):
        """:math:`\\lambda` (``1.0`` for methods without one)."""
        return dict(self.numeric).get("scale", 1.0)

    @property
    def drop(self) -> float | None:
        """DARE's drop probability, or ``None``."""
        return None if self.sparsify is None else self.sparsify.drop

    @property
    def uses_masks(self) -> bool:
        """See :attr:`Traits.uses_masks`."""
        return self.traits.uses_masks

    @property
    def min_merged(self) -> int:
        """Smallest group that is actually merged (3 for mask methods)."""
        return 3 if self.traits.uses_masks else 2

    @property
    def shares_state(self) -> bool:
        """Groups of a block share state (:meth:`shared_state`)."""
        return self.block_state is not None

    @property
    def linear(self) -> bool:
        """See :attr:`Traits.linear`."""
        return self.traits.linear

    @property
    def sums(self) -> bool:
        """See :attr:`Traits.sums`."""
        return self.traits.sums

    @property
    def group_scale(self) -> float:
        """Factor of a linear group's vector over the plain mean (or sum)."""
        return float(self.scale)

    @property
    def trims(self) -> bool:
        """The global per-task magnitude trim is on."""
        return self.trim_keep is not None

    @property
    def label(self) -> str:
        """Short name: ``ties``, ``dare_ties``, ..."""
        return self.name if self.sparsify is None else f"dare_{self.name}"

    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters that matter for this method (JSON-able)."""
        d: dict[str, Any] = {"name": self.name, **self.hyper()}
        if self.seed is not None:
            d["seed"] = self.seed
        if self.sparsify is not None:
            d["drop"], d["seed"] = self.sparsify.drop, self.sparsify.seed
        return d

    def describe(self) -> str:
        hp = {k: v for k, v in self.hyperparameters().items() if k != "name"}
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in hp.items())})"

    def to_json(self) -> dict[str, Any]:
        """The saved record (read back by :func:`flexmerge_jax.methods.from_json`).

        Built-in methods keep the format of plans saved before methods became
        modules (name, scale, keep, consensus, drop, seed, options); custom
        ones are saved by name and hyperparameters, marked ``"custom": true``
        (they are passed again at load).
        """
        hyper = {k: plain_value(v) for k, v in self.hyper().items()}
        if not self.builtin:
            d = {"name": self.name, "custom": True, "hyperparameters": hyper}
            if self.sparsify is not None:
                d["drop"], d["seed"] = self.sparsify.drop, self.sparsify.seed
            return d
        d: dict[str, Any] = {"name": self.name}
        for k, default in SAVED_FIELDS.items():
            d[k] = hyper.pop(k, default)
        d["drop"] = self.drop
        d["seed"] = self.sparsify.seed if self.sparsify is not None else (
            43 if self.seed is None else self.seed)
        d["options"] = [[k, v] for k, v in hyper.items()]
        return d

    # -- kernels ---------------------------------------------------------------
    def merge_group(self, x: dict, members=None, extra=None) -> GroupMerge:
        """Merges one group of one block (pure, jit-able, vmap-able).

        Args:
          x: ``{name: f32[n, ...]}`` preprocessed task vectors of the block.
          members: ``bool[n]`` the group (``None``: all tasks).
          extra: the block's state (:meth:`shared_state`, PCB's bounds), or
            ``None`` (then methods with state compute what they need from
            ``x`` where they can).

        Returns:
          :class:`GroupMerge`.
        """
        return self.merge(x, members, extra, **self.hyper())

    def group_vector(self, x: dict, members, extra) -> dict:
        """The merged group vector only (what similarities compare)."""
        return self.merge_group(x, members, extra).vector

    def shared_state(self, x: dict, key=None, *, numel: int | None = None,
                     prepared=None) -> dict | None:
        """The block's state every group shares, computed once (jitted).

        Args:
          x: ``{name: f32[n, ...]}`` preprocessed task vectors of the block.
          key: the block's PRNG key (methods with a ``seed``).
          numel: entries of one task in the block (default: from ``x``).
          prepared: the method's :attr:`prepare` result.

        Returns:
          The state dict, or ``None`` for methods without ``block_state``.
        """
        if self.block_state is None:
            return None
        if self.seed is not None and key is None:
            raise ValueError(f"{self.name} needs its per-block PRNG key (key=...)")
        if numel is None:
            numel = sum(v[0].size for v in x.values())
        info = BlockInfo(int(numel), key, prepared)
        return self.block_state(x, info, **dict(self.static))

    # -- jit plumbing ----------------------------------------------------------
    def split(self) -> tuple[Method, dict]:
        """``(static part, numeric hyperparameters as float32 arrays)``.

        The static part is hashable (a ``static_argnames`` value): one
        compilation serves every value of the numeric hyperparameters;
        :meth:`join` rebuilds the method inside the traced function.
        """
        # Python and NumPy numbers become NumPy scalars: the same argument
        # type to jit as a device scalar, without an eager XLA conversion at
        # every call (a cut merges each group of each block in a call).
        hp = {k: jnp.asarray(v, jnp.float32) if isinstance(v, jax.Array)
              else np.asarray(v, np.float32) for k, v in self.numeric}
        static = dataclasses.replace(
            self, numeric=tuple((k, _placeholder(k)) for k, _ in self.numeric))
        return static, hp

    def join(self, hp: dict) -> Method:
        """Inverse of :meth:`split` (``self`` is the static part)."""
        return dataclasses.replace(self, numeric=tuple((k, hp[k]) for k, _ in self.numeric))

    def with_numeric(self, **values) -> Method:
        """The method with some numeric hyperparameters replaced (traced ones too)."""
        names = {k for k, _ in self.numeric}
        bad = sorted(set(values) - names)
        if bad:
            raise ValueError(f"{self.name} has no numeric hyperparameter {bad[0]!r} "
                             f"(numeric: {sorted(names) or 'none'})")
        return dataclasses.replace(
            self, numeric=tuple((k, values.get(k, v)) for k, v in self.numeric))

    @property
    def traced(self) -> bool:
        """Whether a numeric hyperparameter is a tracer."""
        return any(is_traced(v) for _, v in self.numeric)

