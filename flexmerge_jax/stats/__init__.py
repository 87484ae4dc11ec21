"""One pass over big tensors -> small per-block statistics.

* ``order.py`` — exact order statistics (radix select) and the TIES trim
  thresholds (the trim itself, :func:`~flexmerge_jax.tree.trim`, is applied
  while reading, in :mod:`~flexmerge_jax.sources`); below the methods, which
  use it (PCB's thresholds).
* ``gram.py`` — Gram matrices of task vectors (host BLAS and XLA back-ends).
* ``passes.py`` — the streaming passes over a prepared source: every block's
  Gram matrix and the fused TIES trim pass.

The layer sits above :mod:`~flexmerge_jax.sources` (the passes read through
it) and below :mod:`~flexmerge_jax.methods`.
"""
