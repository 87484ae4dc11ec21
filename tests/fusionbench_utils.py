"""Load single FusionBench / mergekit source files for comparison tests, without their packages.

``import fusion_bench`` pulls in hydra, omegaconf, lightning, transformers, datasets, ... (GBs);
the merge functions we compare against only need torch. :func:`load_fusion_bench` executes one
module file of an installed ``fusion-bench`` (``pip install --no-deps fusion-bench``) under its
real dotted name while a temporary import hook hands out inert stubs for every *other*
``fusion_bench`` module and for missing third-party packages (``omegaconf``, ``transformers``, ...).
Real submodules listed in ``REAL`` (small, torch-only utilities) are executed for real. The hook,
the stubs and the loaded package's modules are removed from ``sys.modules`` afterwards; the
returned module keeps working because it holds direct references to what it imported.

Nothing here is imported by the package; the comparison tests skip (with the reason) when torch,
fusion-bench or mergekit is not installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

REAL = {"fusion_bench.utils.type", "fusion_bench.utils.state_dict_arithmetic"}
# Heavy third-party dependencies of FusionBench / mergekit that the compared functions never
# use: stubbed only when they are not installed (never any other missing module).
STUBBABLE = {
    "omegaconf", "hydra", "transformers", "lightning", "peft", "datasets", "rich", "bidict",
    "h5py", "tensorboard", "pydantic", "safetensors", "accelerate", "huggingface_hub",
}


def have(module: str) -> bool:
    """Whether a top-level distribution is installed (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_reason() -> str | None:
    """Why the FusionBench comparisons cannot run (``None`` if they can)."""
    if not have("torch"):
        return "torch not installed (pip install torch==2.13.0, CPU wheel)"
    if not have("fusion_bench"):
        return "fusion-bench not installed (pip install --no-deps fusion-bench)"
    return None


def _root(dist: str) -> Path:
    spec = importlib.util.find_spec(dist)
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0])


class _Stub(types.ModuleType):
    """A module whose every attribute is a fresh inert class (usable as base, decorator, type)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__path__ = []  # a package, so "from stub.sub import x" works

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def _init(self, *a, **k):
            pass

        cls = type(
            attr,
            (),
            {
                "__init__": _init,
                "__class_getitem__": classmethod(lambda c, i: c),
                "__enter__": lambda self: self,  # e.g. fusion_bench.utils.timeit_context
                "__exit__": lambda self, *exc: False,
            },
        )
        setattr(self, attr, cls)
        return cls


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, prefix: str, real: set[str], missing_ok: bool, root: Path | None = None):
        self.prefix, self.real, self.missing_ok, self.root = prefix, real, missing_ok, root
        self.created: list[str] = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.prefix or fullname.startswith(self.prefix + "."):
            if fullname in self.real:
                return None  # the normal path finder, through the stub parent's real __path__
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if self.missing_ok and fullname in STUBBABLE:
            # Only reached as the last finder: packages not installed at all.
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if self.missing_ok and fullname.split(".")[0] in self.created:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        self.created.append(spec.name)
        mod = _Stub(spec.name)
        if self.root is not None:
            # Real directory as __path__, so that REAL submodules below a stub are found.
            mod.__path__ = [str(self.root.parent.joinpath(*spec.name.split(".")))]
        return mod

    def exec_module(self, module):
        pass


def _load(dist: str, relpath: str, real: set[str]):
    import torch  # noqa: F401  (imported before the hook exists: never sees a stub)

    root = _root(dist)
    file = root / relpath
    modname = dist + "." + relpath[: -len(".py")].replace("/", ".")
    before = set(sys.modules)
    front = _Finder(dist, real, missing_ok=False, root=root)
    back = _Finder(dist + "\0", set(), missing_ok=True)
    sys.meta_path.insert(0, front)
    sys.meta_path.append(back)
    try:
        # Stub parents get the real directory as __path__ so that REAL submodules are found.
        parts = modname.split(".")
        for i in range(1, len(parts)):
            pname = ".".join(parts[:i])
            if pname not in sys.modules:
                stub = _Stub(pname)
                stub.__path__ = [str(root.parent.joinpath(*parts[:i]))]
                sys.modules[pname] = stub
        spec = importlib.util.spec_from_file_location(modname, file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.meta_path.remove(front)
        sys.meta_path.remove(back)
        # Forget the stubs and the loaded dist's modules (real third-party modules imported on
        # the way, e.g. tqdm, stay: removing them would duplicate them on a later import).
        for name in set(sys.modules) - before:
            if name == dist or name.startswith(dist + ".") or isinstance(sys.modules[name], _Stub):
                del sys.modules[name]


def load_fusion_bench(relpath: str):
    """Executes ``fusion_bench/<relpath>`` (e.g. ``"method/magmax/magmax.py"``) with stubs."""
    return _load("fusion_bench", relpath, REAL)


def load_mergekit(relpath: str):
    """Executes ``mergekit/<relpath>`` (e.g. ``"sparsify.py"``) with stubs."""
    return _load("mergekit", relpath, set())
