"""Saving and loading FlexModels and Plans (the only module importing Orbax).

A saved directory holds ``flexmerge.json`` — everything that is not a
parameter array (format marker, task names, method and hyperparameters,
blocks, routing tables, groups, sizes, the plan's schedule), readable
without JAX — and, for a model, ``arrays/``: a few Orbax checkpoints
("parts" ``p00000``, ...), each holding consecutive blocks (``b00000``, ...)
up to about :data:`PART_BYTES`, then ``unmatched`` and ``model``. So a model
is written and read a bounded part at a time, and a save costs a few Orbax
saves, not one per block (each has a fixed cost of synchronization and
metadata files, which dominated models of many small blocks:
``benchmarks/results/write_speed.md``).
The Orbax trees are named (parameter sets, parameter paths, task names,
routing, masks, rescalers): ``orbax.checkpoint`` alone restores them
(``docs/format.md``). Arrays are stored uncompressed (directories written
with Orbax's default zstd compression load too); masks bit-packed
(``np.packbits``: 1 bit per parameter on disk). Directories of format
versions 1 (anonymous keys) and 2 (one Orbax checkpoint per block) still
load.

Saving is atomic: everything is written into a temporary sibling directory
that is renamed into place only once complete, so a failure never leaves a
directory that :func:`load` would accept, and the rename never replaces
what it did not check (:mod:`._atomic`: concurrent saves, ``overwrite``).
Under ``jax.distributed`` every process writes the shards it holds into one
temporary directory (Orbax's multi-process save) and process 0 claims the
target (:func:`atomic_save`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from . import _atomic as _claim
from . import methods as methods_lib
from ._flexmodel import BlockModel, FlexModel
from ._plan import Plan
from ._prepared import materialize_blocks
from .blocks import Partition
from .progress import Progress
from .sources.files import discard_failed_write, os_errors, restore_tree, this_process_only
from .sources.sharding import check_axis as _check_axis
from .sources.sharding import leaf_spec
from .tree import Layout, flatten, nest

__all__ = ["save", "save_cut", "load", "FORMAT_MODEL", "FORMAT_PLAN"]

FORMAT_MODEL = "flexmerge_jax/flexmodel"
FORMAT_PLAN = "flexmerge_jax/plan"
VERSION = 3
# Version 1: anonymous Orbax keys (s00000/00000, m00000, t00000), one Orbax
# item per block; version 2: named keys, one Orbax item per block.
_VERSIONS = (1, 2, 3)
_META = "flexmerge.json"
#: A save puts consecutive blocks into one Orbax checkpoint until it holds
#: this many bytes (a block larger than that is a part of its own): host
#: memory holds at most two parts (one being written, one being filled).
PART_BYTES = 128 << 20


def _key(prefix: str, i: int) -> str:
    return f"{prefix}{i:05d}"


def _pack(mask) -> np.ndarray:
    return np.packbits(np.asarray(_host(mask), bool).ravel())


def _unpack(packed: np.ndarray, shape) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
    return np.unpackbits(np.asarray(packed), count=size).astype(bool).reshape(shape)


def gathered(x):
    """``x``, or for an array spread over several processes the whole of it,
    gathered onto the host from all of them (a collective: every process
    calls this, in the same order, from its main thread). Other arrays stay
    where they are."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return multihost_utils.process_allgather(x, tiled=True)
    return x


def _host(x):
    """``x`` as a NumPy array (:func:`gathered` first)."""
    return np.asarray(jax.device_get(gathered(x)))


def _stored(x):
    """``x`` as Orbax is to write it: an array sharded over several devices
    (or spread over several processes) stays a ``jax.Array``, stored in
    chunks, one per shard, each written by the process holding it, so that
    a later load onto a mesh reads only the chunks of its shards; anything
    else (host, single-device or replicated arrays) becomes a NumPy array,
    one chunk, written by process 0."""
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or (
            len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated)):
        return x
    return np.asarray(jax.device_get(x))


def _named(names, arrays) -> dict:
    """``{name: array}`` as a tree keyed by the parameter paths (nested at
    ``"/"`` like the params; kept flat where a name is also a prefix)."""
    flat = dict(zip(names, arrays))
    try:
        return nest(flat)
    except ValueError:
        return flat


def _flat(tree) -> dict:
    """The inverse of :func:`_named`: ``{parameter name: array}``."""
    names, leaves, _ = flatten(tree)
    return dict(zip(names, leaves))


def _block_arrays(b: BlockModel, task_names) -> dict:
    """A block's Orbax tree: its parameter sets (``sets/<set>/<path>``), the
    base (masked blocks), each task's packed mask (``masks/<task>/<path>``),
    and its routing, masked flags and rescalers."""
    tree: dict[str, Any] = {
        "routing": np.asarray(b.routing, np.int32),
        "masked": np.asarray(b.masked, bool),
        "rescalers": np.asarray(b.rescalers, np.float32),
        "sets": {str(si): _named(b.leaves, [_stored(st[k]) for k in b.leaves])
                 for si, st in enumerate(b.sets)},
    }
    if b.base is not None:
        tree["base"] = _named(b.leaves, [_stored(b.base[k]) for k in b.leaves])
    if b.masks:
        tree["masks"] = {task_names[t]: _named(b.leaves, [_pack(m[k]) for k in b.leaves])
                         for t, m in sorted(b.masks.items())}
    return tree


def _block_meta(b: BlockModel) -> dict:
    return {
        "name": b.name,
        "groups": [list(g) for g in b.groups],
        "routing": b.routing.tolist(),
        "masked": b.masked.tolist(),
        "has_base": b.base is not None,
        "mask_tasks": sorted(int(t) for t in b.masks),
        "rescalers": np.asarray(b.rescalers, np.float64).tolist(),
    }


def _write_model(tmp: Path, *, layout, partition, method, task_names, n_models, step,
                 blocks, unmatched, source) -> None:
    """Writes a FlexModel directory block by block (``blocks``: an iterable).

    Consecutive blocks go into one Orbax item under ``arrays/`` up to
    :data:`PART_BYTES`, written in the background while the next blocks are
    materialized (streaming cuts), so a model larger than memory is written
    a part at a time.
    """
    metas = []
    stored = 0.0
    with _Writer(tmp / "arrays") as writer:
        for bi, (blk, pb) in enumerate(zip(blocks, partition.blocks)):
            writer.add(_key("b", bi), _block_arrays(blk, task_names))
            metas.append(_block_meta(blk))
            stored += blk.stored_parameters(pb.numel)
        if partition.unmatched:
            writer.add("unmatched", {
                t: _named(partition.unmatched, [_stored(u[k]) for k in partition.unmatched])
                for t, u in zip(task_names, unmatched)
            })
        stored += len(task_names) * partition.unmatched_numel
        writer.add("model", {
            "n_models": np.float64(n_models), "stored_parameters": np.float64(stored)})
    _write_json(tmp / _META, {
        "format": FORMAT_MODEL,
        "version": VERSION,
        "task_names": list(task_names),
        "method": method.to_json(),
        "n_models": float(n_models),
        "step": step,
        "layout": layout.to_json(),
        "partition": partition.to_json(),
        "blocks": metas,
        "parts": writer.parts,
        "stored_parameters": stored,
        "source": source,
    })


def _plan_meta(plan) -> dict:
    seqs = [
        {
            "a": s.a.tolist(),
            "b": s.b.tolist(),
            "root": s.root.tolist(),
            "sim": [None if np.isnan(v) else float(v) for v in s.sim],
        }
        for s in plan.sequences
    ]
    return {
        "format": FORMAT_PLAN,
        "version": VERSION,
        "task_names": list(plan.task_names),
        "method": plan.method.to_json(),
        "config": plan.config,
        "layout": plan._layout_json(),
        "partition": plan.partition.to_json(),
        "sequences": seqs,
        "order": [plan.order[0].tolist(), plan.order[1].tolist()],
        "sizes": plan.sizes.tolist(),
        "events": [e.to_json() for e in plan.events],
        "scales": plan.scales,
        "source": plan.source_info,
    }


def _write_json(path: Path, obj: dict) -> None:
    if jax.process_index() != 0:  # process 0 writes a multi-process save's files
        return
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")


def _nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def _handlers():
    """Orbax's type handlers, but NumPy arrays written without the copy
    Orbax makes by default (``deepcopy_host_arrays``) to guard against the
    caller changing them during the background write. The arrays a
    :class:`_Writer` is given are never written to afterwards (merge
    outputs and inputs as read; pooled buffers are not reused while the
    write references them, see :func:`~.sources.reuse_buffers`), and the
    copy was a full pass over the model on the main thread: as long as the
    write it overlapped."""
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    return th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        *[(t, th.get_type_handler(t)) for t in (int, float, bytes, np.number, jax.Array, str)])


class _Writer:
    """Collects named trees (:meth:`add`) into parts of about
    :data:`PART_BYTES` and writes each part as one Orbax checkpoint
    ``<directory>/p00000``, ... in the background while the caller prepares
    the next (at most one write in flight: Orbax's ``save`` first waits for
    the previous one). Leaving the context writes the last part and waits
    (raising the write's error, if any; after a failure ``directory`` is
    removed once the writes still in flight have ended:
    :func:`~flexmerge_jax.sources.files.discard_failed_write`). ``parts``:
    the names in each part.

    Under ``jax.distributed`` every process writes each part (Orbax's
    multi-process save): the shards of the arrays it holds (:func:`_stored`),
    process 0 the NumPy arrays and the part's metadata.

    Arrays are stored uncompressed: zstd saved ~8% of the bytes of float32
    parameters and took three times as long as the write itself.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.parts: list[list[str]] = []
        self._pending: dict[str, Any] = {}
        self._bytes = 0
        self._last: Path | None = None

    def __enter__(self):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._threads_before = set(threading.enumerate())
        # One process: no barriers. Several: all of them, process 0 primary.
        every = ocp.options.MultiprocessingOptions() if jax.process_count() > 1 \
            else this_process_only()
        self._ckpt = ocp.AsyncCheckpointer(
            ocp.PyTreeCheckpointHandler(use_compression=False, multiprocessing_options=every,
                                        type_handler_registry=_handlers()),
            multiprocessing_options=every)
        return self

    def add(self, name: str, tree: dict) -> None:
        self._pending[name] = tree
        self._bytes += _nbytes(tree)
        if self._bytes >= PART_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / _key("p", len(self.parts))
        self.parts.append(list(self._pending))
        tree, self._pending, self._bytes = self._pending, {}, 0
        self.write(path, tree)

    def write(self, path: Path, tree: dict) -> None:
        """Starts writing one part (an Orbax save in the background)."""
        self._last = path
        with os_errors(path):
            self._ckpt.save(path.absolute(), args=self._ocp.args.PyTreeSave(tree))

    def __exit__(self, typ, exc, tb):
        # Already failing (an error, Ctrl-C): the in-flight write may fail
        # too (Orbax then cannot schedule its last steps), but the first
        # error is the one to report.
        failed = typ is not None
        try:
            if typ is None:
                self._flush()
            with os_errors(self._last):
                self._ckpt.wait_until_finished()
        except Exception:
            failed = True
            if typ is None:
                raise
        finally:
            try:  # close() raises a failed write's error once more
                with os_errors(self._last):
                    self._ckpt.close()
            except Exception:
                if not failed:
                    failed = True
                    raise
            finally:
                # Under jax.distributed process 0 alone removes the directory
                # (it owns the temporary directory). Another process's writes
                # may still land after that; what they recreate bears process
                # 0's host and pid, and the next save of the same path on this
                # host removes it once this process has ended.
                if failed:
                    discard_failed_write([self.directory], self._threads_before,
                                         remove=jax.process_index() == 0)


def save(path: str | os.PathLike, obj, *, overwrite: bool = False) -> Path:
    """Saves a :class:`FlexModel` or a :class:`Plan` to a new directory.

    Args:
      path: target directory (must not exist unless ``overwrite``).
      obj: a FlexModel (routing tables, parameter sets, bit-packed masks) or
        a Plan (its schedule; a plan made from checkpoint files records their
        paths, so :func:`load` reattaches them and any size can be cut later
        without recomputing the schedule).
      overwrite: replace an existing directory saved by this library that
        holds nothing else (files someone added are named, not deleted). An
        empty directory is replaced without it.

    Returns:
      The path written.

    Raises:
      ValueError: the path exists (and ``overwrite`` is false, or it is not a
        flexmerge_jax directory, or holds other files), it was created by
        someone else while saving (of two concurrent saves of one path, one
        fails so), or ``obj`` has the wrong type. Nothing is left behind.
    """
    if isinstance(obj, FlexModel):
        def write(tmp):
            _write_model(tmp, layout=obj.layout, partition=obj.partition, method=obj.method,
                         task_names=obj.task_names, n_models=obj.n_models, step=obj.step,
                         blocks=obj.blocks.values(), unmatched=obj.unmatched, source=obj.source)
    elif isinstance(obj, Plan):
        def write(tmp):
            _write_json(tmp / _META, _plan_meta(obj))
    else:
        raise ValueError(f"save() takes a FlexModel or a Plan, got {type(obj).__name__}")
    return atomic_save(Path(path), write, overwrite)


def save_cut(path: str | os.PathLike, plan, *, size: float | None = None, step: int | None = None,
             overwrite: bool = False, progress: bool | None = None) -> Path:
    """Cuts ``plan`` at a size (or step) and saves the model, block by block.

    Equivalent to ``save(path, plan.at_size(size))`` but each block is
    materialized, written and released in turn, so host memory holds one
    block of all tasks at a time, never the whole output model. ``progress``
    reports the blocks written (see :mod:`flexmerge_jax.progress`).
    """
    if (size is None) == (step is None):
        raise ValueError("give exactly one of size= or step=")
    k = plan.step_for_size(size) if step is None else step
    plan._check_step(k)
    prepared = plan._require_inputs()
    parts = plan.partition_at(k)
    return save_groups(path, prepared, [parts[b.name] for b in plan.partition.blocks],
                       task_names=plan.task_names, n_models=float(plan.sizes[k]), step=int(k),
                       scales=plan._group_scales(k), source=plan.source_info,
                       overwrite=overwrite, progress=progress)


def save_groups(path, prepared, groups, *, task_names, n_models: float, step: int | None,
                source: dict | None, scales=None, overwrite: bool = False,
                progress: bool | None = None) -> Path:
    """Saves the model of ``prepared``'s inputs with these groups (a list
    per block, as :func:`~._engine.materialize` takes), block by block: each
    block is materialized, written and released in turn (what
    :func:`save_cut` and one-shot merges write; ``source``: the inputs'
    record, see :meth:`~._source.Source.describe`)."""
    def blocks():
        with Progress(len(groups), "cut", progress, "blocks") as bar:
            for blk in materialize_blocks(prepared, groups, scales):
                yield blk
                bar.update(1, blk.name)

    def write(tmp):
        src, part = prepared.source, prepared.partition
        unmatched = src.finetuned(part.unmatched) if part.unmatched else \
            [{} for _ in range(src.n)]
        _write_model(tmp, layout=prepared.layout, partition=part, method=prepared.method,
                     task_names=task_names, n_models=n_models, step=step, blocks=blocks(),
                     unmatched=unmatched, source=source)

    return atomic_save(Path(path), write, overwrite)


def atomic_save(path: Path, write, overwrite: bool, *, manifest: bool = True,
            shared: bool = True) -> Path:
    """Runs ``write(tmp_dir)`` (which writes ``flexmerge.json`` last: it
    marks the directory complete), then claims ``path`` (:mod:`._atomic`).

    Under ``jax.distributed`` every process calls this with the same path,
    in the same order. Process 0 checks the target and creates the
    temporary directory; its name is broadcast (all processes fail alike if
    process 0 cannot save there, or if another process cannot see the
    directory: the path must be on a filesystem they share). With
    ``shared``, every process runs ``write`` into it (Orbax's multi-process
    save: each process writes the shards it holds, process 0 the rest, see
    :class:`_Writer`); without (exports, written as whole files), process 0
    writes and the others run ``write`` into a scratch directory they delete
    (its gathers are collectives; an export writes nothing there). After a
    barrier process 0 alone claims ``path``, and broadcasts whether it did:
    no process returns before the directory is in place, and all fail if it
    could not be claimed.
    """
    if jax.process_count() == 1:
        return _claim.write_dir(path, write, overwrite=overwrite, check_ours=_read_meta,
                                manifest=manifest)

    primary = jax.process_index() == 0
    error, tmp = None, None
    if primary:
        try:
            tmp = _claim.begin(path, overwrite=overwrite, check_ours=_read_meta)
        except (ValueError, OSError) as e:
            error = e
    # Every process fails alike, before any collective in ``write``.
    got = broadcast_text("" if not primary else f"!{error}" if error else f"+{tmp.name}")
    if got[0] == "!":
        if error:
            raise error
        raise ValueError(f"{path}: process 0 cannot save there ({got[1:]})")
    tmp = path.parent / got[1:]
    seen = multihost_utils.process_allgather(np.int32(tmp.is_dir()))
    if not seen.all():
        if primary:
            _claim.abandon(tmp)
        blind = [int(i) for i in np.flatnonzero(seen == 0)]
        raise ValueError(
            f"{path}: process(es) {blind} do not see the temporary directory process 0 created "
            f"beside it; saving from several processes needs a filesystem all of them share")
    try:
        if shared or primary:
            write(tmp)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                write(Path(scratch))
    except BaseException:
        if primary:
            _claim.abandon(tmp)
        raise
    multihost_utils.sync_global_devices(f"flexmerge_jax save {path}")  # everything written
    if primary:
        try:
            _claim.finish(tmp, path, overwrite=overwrite, check_ours=_read_meta,
                          manifest=manifest)
        except Exception as e:
            error = e
    got = broadcast_text(f"!{error}" if error else "+")
    if error:
        raise error
    if got[0] == "!":
        raise ValueError(f"{path}: process 0 could not claim it ({got[1:]})")
    return path


def broadcast_text(text: str, size: int = 4096) -> str:
    """Process 0's ``text`` (its first ``size`` bytes) on every process (a
    collective)."""
    buf = np.zeros(size, np.uint8)
    raw = text.encode()[:size]
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return bytes(got).rstrip(b"\0").decode(errors="replace")


def check_target(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Fails early (before any work) if :func:`save` to ``path`` would fail
    for the target's sake: it exists and ``overwrite`` is false, or it is not
    a flexmerge_jax directory holding only what a save wrote.

    Raises:
      ValueError: naming the path and what is in the way.
    """
    _claim.check_target(Path(path), overwrite, _read_meta)


def _read_meta(path: Path) -> dict:
    meta_path = path / _META
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory saved by flexmerge_jax")
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a flexmerge_jax checkpoint (no {_META})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format") not in (FORMAT_MODEL, FORMAT_PLAN):
        raise ValueError(f"{meta_path} is not a flexmerge_jax file (format {meta.get('format')!r})")
    if meta.get("version") not in _VERSIONS:
        raise ValueError(f"{meta_path}: unsupported version {meta.get('version')!r}")
    return meta


def _read_arrays(path: Path, item: str, place=None) -> dict:
    """The arrays of Orbax item ``arrays/<item>`` as NumPy arrays; with
    ``place(keys, shape) -> Sharding | None`` (``keys``: the leaf's path of
    dict keys), the leaves it gives a sharding are restored straight onto
    it: each process holds only its shards, and reads the stored chunks that
    overlap them (arrays saved sharded are chunked by shard, see
    :func:`_stored`; others are one chunk each)."""
    import orbax.checkpoint as ocp

    arr = path / "arrays" / item
    if not arr.is_dir():
        raise ValueError(f"{path} is incomplete: no arrays/{item}")
    try:
        with warnings_quiet():
            # Host arrays: any process may read them on its own; sharded
            # ones: every process restores its shards.
            ckpt = ocp.StandardCheckpointer() if place is not None else \
                ocp.StandardCheckpointer(multiprocessing_options=this_process_only())
            return restore_tree(ckpt, arr, place)
    except Exception as e:  # a damaged Orbax item: one line naming it
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{arr}: cannot read this Orbax checkpoint ({msg[:300]})") from None


@contextlib.contextmanager
def warnings_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check(ok: bool, where: Path, what: str) -> None:
    if not ok:
        raise ValueError(f"{where / _META}: {what} (edited by hand, or damaged?)")


def _check_common(path: Path, meta: dict):
    """Task names, layout and partition of ``meta``, checked."""
    names = meta["task_names"]
    _check(isinstance(names, list) and all(isinstance(t, str) for t in names)
           and len(set(names)) == len(names) and len(names) >= 1, path,
           f"task_names must be a list of distinct names, got {names!r}")
    layout = Layout.from_json(meta["layout"])
    partition = Partition.from_json(meta["partition"])
    known = set(layout.names)
    _check(len(layout.shapes) == len(layout.names) == len(layout.dtypes), path,
           "the layout's names, shapes and dtypes differ in number")
    for b in partition.blocks:
        bad = [k for k in b.leaves if k not in known]
        _check(not bad, path,
               f"block {b.name!r} names parameter {bad[:1]!r} missing from the layout")
    bad = [k for k in partition.unmatched if k not in known]
    _check(not bad, path, f"unmatched parameter {bad[:1]!r} missing from the layout")
    return names, layout, partition


def _check_model(path: Path, meta: dict):
    """Checks a model's ``flexmerge.json`` against itself: one routing entry
    per task, each naming one of the block's parameter sets, block names as
    in the partition. Returns ``(task names, layout, partition)``."""
    names, layout, partition = _check_common(path, meta)
    n = len(names)
    _check(len(meta["blocks"]) == len(partition.blocks), path,
           f"{len(meta['blocks'])} blocks listed for a partition of {len(partition.blocks)}")
    for bm, pb in zip(meta["blocks"], partition.blocks):
        b = bm["name"]
        _check(b == pb.name, path, f"block {b!r} where the partition has {pb.name!r}")
        sets, routing = len(bm["masked"]), bm["routing"]
        _check(len(routing) == n, path,
               f"block {b!r} routes {len(routing)} tasks, but {n} task names are listed")
        _check(all(isinstance(r, int) and 0 <= r < sets for r in routing), path,
               f"block {b!r}: routing {routing} names parameter sets outside 0..{sets - 1}")
        _check(all(isinstance(t, int) and 0 <= t < n for t in bm["mask_tasks"]), path,
               f"block {b!r}: mask tasks {bm['mask_tasks']} outside 0..{n - 1}")
        _check(len(bm["rescalers"]) == n, path,
               f"block {b!r}: {len(bm['rescalers'])} rescalers for {n} tasks")
    return names, layout, partition


def _wanted(entry: dict, want: dict, v1: bool) -> dict:
    """The parts ``want`` (``{label: (version-2 key path, version-1 key)}``)
    of an Orbax item read back, as ``{label: {parameter name: array} | None}``
    (``None``: missing). Version 1 keyed leaves by position (``00000``, in
    the order of ``leaves``), version 2 by their names."""
    out = {}
    for label, (path2, key1, leaves) in want.items():
        if v1:
            d = entry.get(key1)
            out[label] = None if not isinstance(d, dict) else {
                k: d.get(_key("", j)) for j, k in enumerate(leaves) if _key("", j) in d}
            continue
        d = entry
        for k in path2:
            d = d.get(k) if isinstance(d, dict) else None
        out[label] = _flat(d) if isinstance(d, dict) else None
    return out


def _check_arrays(path: Path, item: str, parts: dict, leaves_of: dict, shapes: dict) -> None:
    """``parts`` (:func:`_wanted`) hold the parameters ``leaves_of[label]``
    with the layout's shapes (masks, labelled ``masks/...``: bit-packed, any
    shape)."""
    for label, got in parts.items():
        _check(got is not None, path, f"arrays/{item} lacks {label!r}")
        for k in leaves_of[label]:
            a = got.get(k)
            _check(a is not None, path, f"arrays/{item}/{label} lacks parameter {k!r}")
            _check(label.startswith("masks/") or tuple(a.shape) == tuple(shapes[k]), path,
                   f"arrays/{item}/{label}: parameter {k!r} has shape {tuple(a.shape)}, "
                   f"the layout says {tuple(shapes[k])}")


class _Items:
    """A saved model's Orbax trees by item name (``b00000``, ...,
    ``unmatched``), asked for in the order they were written.

    Version 3 keeps items in parts (``flexmerge.json["parts"]``): each part
    is restored once, when its first item is asked for, and only the latest
    is held. Earlier versions restore ``arrays/<item>``. ``place(keys,
    shape)`` (keys within a block, see :func:`_read_arrays`) places blocks'
    leaves, ``place_all`` the unmatched parameters; ``None``: host arrays.
    """

    def __init__(self, path: Path, meta: dict, place, place_all):
        self.path, self.place, self.place_all = path, place, place_all
        self.part_of = None
        if meta["version"] >= 3:
            parts = meta["parts"]
            _check(isinstance(parts, list) and all(
                isinstance(p, list) and all(isinstance(k, str) for k in p) for p in parts),
                path, f"'parts' must be lists of item names, got {str(parts)[:80]}")
            self.part_of = {k: i for i, keys in enumerate(parts) for k in keys}
        self._name, self._tree = None, None

    def _placer(self, item: str):
        return self.place_all if item == "unmatched" else \
            self.place if item.startswith("b") else None

    def _place_in_part(self, keys, shape):
        f = self._placer(keys[0])
        return None if f is None else f(keys[1:], shape)

    def __call__(self, item: str) -> tuple[str, dict]:
        """``(where, tree)``: the item's path under ``arrays/`` (for
        messages) and its tree."""
        if self.part_of is None:
            return item, _read_arrays(self.path, item, self._placer(item))
        i = self.part_of.get(item)
        _check(i is not None, self.path, f"no part lists the arrays of {item!r}")
        name = _key("p", i)
        if name != self._name:
            self._tree = None  # the previous part released before the next is read
            self._tree = _read_arrays(self.path, name,
                                      None if self.place is None else self._place_in_part)
            self._name = name
        tree = self._tree.get(item)
        if not isinstance(tree, dict):
            raise ValueError(f"{self.path} is incomplete: no {item} in arrays/{name}")
        return f"{name}/{item}", tree


def _load_model(path: Path, meta: dict, mesh=None, axis: str = "model",
                method=None) -> FlexModel:
    tasks, layout, partition = _check_model(path, meta)
    shapes = dict(zip(layout.names, layout.shapes))
    n = len(tasks)
    v1 = meta["version"] == 1
    place = place_all = None
    if mesh is not None:
        def place_all(keys, shape):
            return jax.sharding.NamedSharding(mesh, leaf_spec(shape, mesh, axis))

        def place(keys, shape):
            """Parameter sets and bases onto ``mesh`` as a plan on it shards
            them; packed masks, routing and rescalers stay on the host."""
            if keys[0] in ("sets", "base") or (v1 and keys[0][0] in "sb"):
                return place_all(keys, shape)
            return None

    items = _Items(path, meta, place, place_all)
    blocks = []
    for bi, (bm, pb) in enumerate(zip(meta["blocks"], partition.blocks)):
        leaves = pb.leaves
        want = {f"sets/{si}": (("sets", str(si)), _key("s", si), leaves)
                for si in range(len(bm["masked"]))}
        want.update({f"masks/{tasks[t]}": (("masks", tasks[t]), _key("m", t), leaves)
                     for t in bm["mask_tasks"]})
        if bm["has_base"]:
            want["base"] = (("base",), "base", leaves)
        where, tree = items(_key("b", bi))
        parts = _wanted(tree, want, v1)
        _check_arrays(path, where, parts, {lb: w[2] for lb, w in want.items()}, shapes)
        masks = {t: {k: _unpack(parts[f"masks/{tasks[t]}"][k], shapes[k]) for k in leaves}
                 for t in bm["mask_tasks"]}
        blocks.append(
            BlockModel(
                name=bm["name"],
                leaves=leaves,
                groups=tuple(tuple(g) for g in bm["groups"]),
                routing=np.asarray(bm["routing"], np.int32),
                sets=[parts[f"sets/{si}"] for si in range(len(bm["masked"]))],
                masked=np.asarray(bm["masked"], bool),
                base=parts["base"] if bm["has_base"] else None,
                masks=masks,
                rescalers=np.asarray(bm["rescalers"], np.float32),
            )
        )
    if partition.unmatched:
        want = {t: ((t,), _key("t", i), partition.unmatched) for i, t in enumerate(tasks)}
        where, tree = items("unmatched")
        parts = _wanted(tree, want, v1)
        _check_arrays(path, where, parts, {t: partition.unmatched for t in tasks}, shapes)
        unmatched = [{k: parts[t][k] for k in partition.unmatched} for t in tasks]
    else:
        unmatched = [{} for _ in range(n)]
    return FlexModel(
        layout=layout,
        partition=partition,
        method=methods_lib.from_json(meta["method"], method),
        task_names=meta["task_names"],
        blocks=blocks,
        unmatched=unmatched,
        n_models=meta["n_models"],
        step=meta["step"],
        source=meta.get("source"),
    )


def load(path: str | os.PathLike, *, base=None, finetuned=None, method=None, mesh=None,
         mesh_axis: str = "model"):
    """Loads a :class:`FlexModel` or a :class:`Plan` saved by :func:`save`.

    Args:
      path: the directory.
      base, finetuned: for a plan, the inputs to cut models from (pytrees or
        checkpoint paths). A plan made from checkpoint files reattaches them
        by itself when they still exist.
      method: the method the model or plan was made with; required when it
        was a custom (user-defined) method, which a file cannot rebuild.
        Built-in methods are rebuilt from the saved record (a given one must
        match it).
      mesh: a ``jax.sharding.Mesh``: a model's parameter sets are restored
        sharded over ``mesh_axis`` as :func:`~flexmerge_jax.plan` shards them
        (each process holds only its shards); a plan's inputs are read onto
        it, so its cuts are sharded. Under ``jax.distributed`` every process
        calls ``load`` alike.
      mesh_axis: the mesh axis to shard parameters over.

    Returns:
      The FlexModel (params rebuilt as nested dicts keyed by the saved
      names) or the Plan.

    Raises:
      ValueError: not a flexmerge_jax directory, incomplete, or inputs that
        do not match the plan.
    """
    path = Path(path)
    meta = _read_meta(path)
    if meta["format"] == FORMAT_MODEL:
        if base is not None or finetuned is not None:
            raise ValueError("base/finetuned are only used when loading a plan")
        if mesh is not None:
            _check_axis(mesh, mesh_axis)
        with _malformed(path):
            return _load_model(path, meta, mesh, mesh_axis, method)

    with _malformed(path):
        _check_plan(path, meta)
    plan = Plan.from_json(meta, base=base, finetuned=finetuned, method=method)
    if mesh is not None:
        plan.shard(mesh, mesh_axis)
    return plan


def _check_plan(path: Path, meta: dict) -> None:
    """Checks a plan's ``flexmerge.json``: per block n - 1 merges of task
    indices below n, an order naming each merge once."""
    names, _, partition = _check_common(path, meta)
    n, nb = len(names), len(partition.blocks)
    _check(len(meta["sequences"]) == nb, path,
           f"{len(meta['sequences'])} merge sequences for {nb} blocks")
    for b, seq in zip(partition.names, meta["sequences"]):
        for field in ("a", "b", "root", "sim"):
            _check(len(seq[field]) == n - 1, path,
                   f"block {b!r}: {len(seq[field])} merges in {field!r}; {n} tasks make {n - 1}")
        _check(all(isinstance(t, int) and 0 <= t < n for f in ("a", "b", "root") for t in seq[f]),
               path, f"block {b!r}: merges name tasks outside 0..{n - 1} ({n} task names)")
    blk, step = meta["order"]
    pairs = sorted(zip(blk, step))
    _check(pairs == [(b, s) for b in range(nb) for s in range(n - 1)], path,
           f"the order does not name each of the {nb} x {n - 1} merges once")
    _check(len(meta["sizes"]) == len(blk) + 1 and len(meta["events"]) == len(blk), path,
           f"{len(meta['sizes'])} sizes and {len(meta['events'])} events for {len(blk)} merges")


@contextlib.contextmanager
def _malformed(path: Path):
    """Missing or mistyped fields of a hand-edited ``flexmerge.json`` as one
    ``ValueError`` naming the file (not a ``KeyError`` from deep inside)."""
    try:
        yield
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"{path / _META}: malformed ({type(e).__name__}: {e})") from None
