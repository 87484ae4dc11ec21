"""XLA's persistent compilation cache, on by default.

A plan and a cut compile a few dozen XLA programs; without a cache every new
process compiles them again, which is most of a cold start on small and
medium models. Importing :mod:`flexmerge_jax` therefore points JAX's
persistent compilation cache at a user cache directory, unless the program
configured one itself (``jax.config.jax_compilation_cache_dir`` or
``JAX_COMPILATION_CACHE_DIR``), which is then left as it is.

``FLEXMERGE_COMPILATION_CACHE`` chooses: unset, the default directory
(``$XDG_CACHE_HOME/flexmerge_jax/xla``, or ``~/.cache/flexmerge_jax/xla``);
a path, that directory; ``0``, ``off``, ``false`` or ``no``, no cache.
The cache is JAX's, for the whole process: programs compiled by the user's
own code are cached there too.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "FLEXMERGE_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")


def cache_dir(environ=None) -> Path | None:
    """The directory ``FLEXMERGE_COMPILATION_CACHE`` (in ``environ``,
    default ``os.environ``) asks for; ``None``: disabled."""
    env = os.environ if environ is None else environ
    value = env.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    root = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "flexmerge_jax" / "xla"


def configure() -> Path | None:
    """Turns the cache on (see the module docstring); returns its directory,
    or ``None`` if it is off or the program chose its own."""
    if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    path = cache_dir()
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX caches only programs that took a second to compile by default;
    # ours take a tenth of that each, and there are dozens.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
