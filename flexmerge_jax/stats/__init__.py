"""One pass over big tensors -> small per-block statistics.

* ``order.py`` — exact order statistics (radix select) and the TIES trim
  (:func:`~flexmerge_jax.stats.order.trim`); below the methods, which use it
  (PCB's thresholds).
* ``gram.py`` — Gram matrices of task vectors (host BLAS and XLA back-ends).
* ``passes.py`` — the streaming passes over a prepared source: every block's
  Gram matrix and the fused TIES trim pass.

The package imports nothing itself, so that ``methods`` can use ``order``
while ``passes`` reads through ``sources``.
"""
