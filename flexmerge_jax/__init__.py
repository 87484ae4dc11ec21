"""flexmerge_jax: FlexMerge model merging of any size, in JAX.

Typical use::

    import flexmerge_jax as fm
    plan = fm.plan(base, finetuned, blocks="vit", method=fm.methods.ties())
    model = plan.at_size(2.0)          # a 2x model: routing tables + params
    params = model.params_for_task(3)  # task 3's full params pytree
    fm.save("out/model_2x", model)
    fm.export(model, "out/deploy", format="hf")   # one Hugging Face directory per task
"""

from . import _cache, baselines, blocks, methods, progress, serve, sources, tree
from ._export import export
from ._flexmodel import BlockModel, FlexModel
from ._plan import Event, Plan, merge, plan
from ._sweep import SweepPoint, SweepResult, default_sizes, sweep
from ._tune import Tuning
from .checkpointing import load, save, save_cut
from .sources import MemorySource, Source, load_params, save_params

__version__ = "0.1.0"

_cache.configure()  # XLA's persistent compilation cache (FLEXMERGE_COMPILATION_CACHE)

__all__ = [
    "baselines",
    "blocks",
    "serve",
    "sources",
    "load_params",
    "save_params",
    "sweep",
    "SweepResult",
    "SweepPoint",
    "default_sizes",
    "methods",
    "tree",
    "plan",
    "merge",
    "save",
    "load",
    "save_cut",
    "export",
    "progress",
    "Plan",
    "Event",
    "Tuning",
    "FlexModel",
    "BlockModel",
    "Source",
    "MemorySource",
]
