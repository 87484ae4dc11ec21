"""The greedy merge schedule: a ``lax.scan`` over merge steps.

* ``greedy.py`` — the greedy loop with its NamedTuple state, its flavours
  (linkages, merged-vector similarities) and the interleaving of blocks.
* ``pyset.py`` — CPython's set iteration order, reproduced in JAX (the
  reference iterates Python sets of tasks).

Nothing here knows any method by name: methods enter through their traits
and their ``merge`` function.
"""
