"""Multi-task serving of a :class:`~flexmerge_jax.FlexModel`: one batch, many tasks.

A FlexModel of size s holds, per block, g_b parameter sets and a routing
table task -> set. :func:`stack` puts it on the device *as it is counted*:
each block's sets stacked into ``[g_b, ...]`` arrays (never one copy per
task), plus, for mask methods, the base ``theta0``, one bit-packed boolean
mask per task of a masked set and its rescaler. A batch then mixes tasks
(``task_ids: int32[batch]``) and runs **block by block**: at each block every
row uses the parameters its task is routed to, and rows routed to the same set
share one computation:

* **grouped matmuls** (:meth:`Router.dense`): rows in contiguous segments of
  one set are multiplied in static tiles, each tile piece by its own set's
  kernel (:func:`grouped_matmul`: ``"tiled"`` one batched matmul over all
  pieces, ``"scan"`` one piece after the other, ``"ragged"``
  :func:`jax.lax.ragged_dot`);
* **segmented application** of any block function (:meth:`Router.apply`):
  rows cut into tiles of one set each, the block function ``vmap``-ed over
  the tiles with each tile's parameters;
* **gathers** for small blocks (LayerNorm scales, biases, embeddings,
  :meth:`Router.params`): each row gets its set's parameters.

Segments: by default (``presort=True``) the batch is sorted by task id once,
on entry (and the outputs put back in order on exit), so that no block
permutes rows: a block's segments are the tasks, each using its set's kernel
(consecutive tasks of one set share the kernel, not a copy). With
``presort=False`` each block sorts the rows by its own set instead (two row
gathers per grouped op, segments = sets).

Routing tables and task ids are *data* (int32 arrays), not static: one
compilation serves every batch composition and every routing of a model with
the same number of sets per block (e.g. the same model after a re-plan, or any
cut with the same ``g_b``); only the batch size and the per-block set counts
are static.

Wiring a model
--------------
A generic pytree apply cannot be cut at blocks automatically, so the model's
forward is written once against a :class:`Router` ``r`` instead of a params
pytree. Parameters are addressed by their **paths in the params pytree**
("/"-joined, as :func:`flexmerge_jax.tree.leaf_names` names them), so the same
forward works for any block specification: the block that holds a parameter
decides which rows share it. Per kind of layer the user provides

* linear layers: ``r.dense("blocks/0/mlp/fc1", x)`` (``.../kernel`` ``[in, out]``
  and an optional ``.../bias``; ``x: [batch, ..., in]``);
* small parameters used directly: ``r.params("ln_pre")`` gives every row its
  own ``{"scale": [batch, d], "bias": [batch, d]}`` (a leaf path gives one
  array ``[batch, *shape]``);
* any other module: a function ``fn(p, x)`` that applies it to a batch, with
  ``p`` the module's parameters (the sub-pytree under the path, path prefix
  removed, e.g. ``{"qkv": {...}, "out": {...}}`` for ``blocks/0/attn``):
  ``r.apply("blocks/0/attn", fn, x)``. For a Flax nnx layer,
  ``fn = flexmerge_jax.adapters.nnx_block(model.layers[i])`` calls the layer
  with ``p``.

and calls them in the model's order; parameter-free computation (residuals,
activations, attention scores) is written as usual on the whole batch.
:func:`flexmerge_jax.zoo.vit_forward` is this for the zoo ViT;
``examples/serve_nnx.py`` does it for an nnx module with a list of layers. Parameters kept
per task outside the FlexModel (classification heads) join with ``stack(model, per_task={"head":
heads})`` and are addressed as ``"head"``.

Memory and compute
------------------
Device memory is what :attr:`FlexModel.n_models` counts (see
:meth:`ServeState.nbytes`): g_b copies of each block, plus for a block with a
masked set the base and ``ceil(numel/8)`` bytes per task mask (the reference's
1/32 of a float32 parameter per entry) and one float per rescaler. Masked
parameters are deployed on the fly: at each call every masked block computes
``theta0 + gamma_k * M_k * (W - theta0)`` for its masked tasks (elementwise,
``O(n_masked * numel_b)`` per call, independent of the batch size), which
lives only while that block runs — the transient peak is one block's deployed
variants, never the full per-task model (``pack_masks=False`` keeps bool
masks, 8x their memory, to skip the unpacking). Grouped matmuls compute
``rows + (segments - 1) * tile`` rows instead of ``rows * sets``
(``"ragged"`` outside TPUs lowers to a masked dense product over all sets);
``"tiled"`` also gathers one kernel per piece (``O((rows / tile + segments)
* numel)`` transient), ``"scan"`` runs the pieces in a loop without copies.
Blocks with one set skip all grouping. Measurements against running the
fine-tuned models one by one: ``benchmarks/results/serve_zoo.md``.

Example (the zoo)::

    z = zoo.load()
    model = fm.plan(z.base, z.finetuned, blocks="vit", method="ta").at_size(2.0)
    srv = serve.Server(model, zoo.vit_forward, per_task={"head": zoo.padded_heads(z.heads)})
    logits = srv(task_ids, images)        # [batch, max classes]; other classes -inf

Modules: :mod:`._state` (what is on the device), :mod:`._grouped` (grouped
matmuls), :mod:`._router` (the router, :func:`run`, :class:`Server`, the
per-task baseline). Nothing here knows a model: forwards live with their
models (the zoo's in :mod:`flexmerge_jax.zoo`), flax only in
:mod:`flexmerge_jax.adapters`.
"""

from ._grouped import DENSE_IMPLS, grouped_matmul
from ._router import APPLY_MODES, Router, Server, apply_per_task, run
from ._state import BlockStack, ServeState, stack

__all__ = [
    "BlockStack",
    "ServeState",
    "Router",
    "Server",
    "stack",
    "run",
    "grouped_matmul",
    "apply_per_task",
    "DENSE_IMPLS",
    "APPLY_MODES",
]
