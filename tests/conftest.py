"""Test configuration: strict JAX numerics, shared fixtures."""

import os
import sys
from pathlib import Path

# Must be set before JAX starts. Sharding tests need several CPU devices.
# Test arrays are tiny, so the run is dominated by XLA compilation: a low
# backend optimization level makes compiles ~3x faster (tests only; it does
# not change the float operations XLA performs, and every numeric assertion
# holds with the default level too).
_flags = os.environ.get("XLA_FLAGS", "")
for _f in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
    if _f.split("=")[0] not in _flags:
        _flags += " " + _f
os.environ["XLA_FLAGS"] = _flags.strip()
# No persistent compilation cache (on by default, in the user's cache
# directory): the suite must not write there; test_cache checks the default.
os.environ["FLEXMERGE_COMPILATION_CACHE"] = "off"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Frees the XLA programs a test module compiled when it ends.

    JAX keeps every compiled program, each with memory maps of its own, for
    the life of the process; the whole suite compiles thousands in one
    process and would reach the kernel's limit on a process's memory maps
    (``vm.max_map_count``, 65530 by default), where XLA's next compilation
    crashes with a segmentation fault.
    """
    yield
    jax.clear_caches()


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Runs a function eagerly or under ``jax.jit`` (static kwargs allowed)."""
    if request.param:
        return lambda f, **kw: jax.jit(f, **kw)
    return lambda f, **kw: f


def random_case(seed: int, n: int = 5, shapes=None, scale: float = 1e-2):
    """A small random base + n fine-tuned one-level dicts (float32)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {
        "l1.attn.w": (6, 5),
        "l1.attn.b": (5,),
        "l1.mlp.w": (5, 7),
        "l0.attn.w": (6, 5),
        "l0.mlp.w": (5, 7),
        "l0.mlp.b": (7,),
        "emb": (4,),
    }
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    common = {k: rng.standard_normal(s) for k, s in shapes.items()}
    fts = []
    for _ in range(n):
        fts.append(
            {
                k: (base[k] + scale * (0.5 * common[k] + rng.standard_normal(s))).astype(
                    np.float32
                )
                for k, s in shapes.items()
            }
        )
    return base, fts


def record_task_vector_reads(monkeypatch, source_cls) -> list:
    """Records every ``source_cls.task_vectors`` call as ``(names, thread
    name, threshold)`` in the returned list (the reads still happen)."""
    import threading

    reads, real = [], source_cls.task_vectors

    def task_vectors(self, names, threshold=None):
        reads.append((list(names), threading.current_thread().name, threshold))
        return real(self, names, threshold)

    monkeypatch.setattr(source_cls, "task_vectors", task_vectors)
    return reads


def assert_blocks_read_ahead_trimmed(reads, blocks) -> None:
    """A merged-vector TIES plan read each block (``blocks``: leaf lists)
    once, trimmed as read, in host threads (ahead of its turn)."""
    blockwise = [r for r in reads if r[0] in blocks]
    assert sorted(blocks.index(r[0]) for r in blockwise) == list(range(len(blocks)))
    assert all(r[2] is not None for r in blockwise)
    assert all(r[1].startswith("flexmerge-host") for r in blockwise)


def write_hf_dir(path, tensors: dict, shards: int = 1, extra_files=("config.json",)):
    """A Hugging Face-style model directory: ``config.json`` (and any
    ``extra_files``, each holding its own name) beside one
    ``model.safetensors`` or ``shards`` shards and ``model.safetensors.index.json``
    (tensors dealt round-robin in sorted order, so every shard holds some)."""
    import json
    from pathlib import Path

    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True)
    for f in extra_files:
        (path / f).write_text(json.dumps({"file": f}))
    if shards == 1:
        save_file(dict(tensors), str(path / "model.safetensors"))
        return path
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(np.asarray(t).nbytes for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path
