"""Where parameters come from: memory, files, a device mesh.

The planner never holds all task vectors at once: it asks a :class:`Source`
for the leaves of one block (base and the n fine-tuned models) at a time.

* :class:`MemorySource` — pytrees in memory (``_source.py``).
* :func:`path_source` / :class:`PathSource` — params files (``.npz``,
  ``.safetensors``, Hugging Face directories, Orbax checkpoints), read one
  block at a time; :func:`load_params` / :func:`save_params` for whole
  pytrees; :func:`fingerprint` for what a saved plan records (``files.py``).
* :class:`ShardedSource` — any source placed on a device mesh
  (``sharding.py``).
* ``threads.py`` — the host I/O threads (read-ahead, parallel host passes).

To support a new checkpoint format, add a module here with a :class:`Source`.
"""

from ._source import MemorySource, Source, reuse_buffers
from .files import (
    PathSource,
    as_source,
    detect_format,
    fingerprint,
    fingerprint_change,
    load_params,
    path_source,
    save_params,
)
from .sharding import ShardedSource

__all__ = [
    "Source",
    "MemorySource",
    "PathSource",
    "ShardedSource",
    "as_source",
    "path_source",
    "load_params",
    "save_params",
    "detect_format",
    "fingerprint",
    "fingerprint_change",
    "reuse_buffers",
]
