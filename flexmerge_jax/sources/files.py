"""Params files on disk: ``.npz``, ``.safetensors``, Hugging Face model
directories and Orbax checkpoints.

A params *path* is any of: a ``.npz`` or ``.safetensors`` file; a Hugging
Face model directory (``config.json`` beside one ``model.safetensors``, or
beside ``model.safetensors.index.json`` and its shards, read lazily tensor by
tensor across the shards); the ``*.safetensors.index.json`` file itself; an
Orbax checkpoint directory. One shard of a sharded checkpoint is refused
(naming its index): merging it alone would silently merge part of a model.
PyTorch pickles (``.bin``, ``.pt``) are refused with how to convert them.

* :func:`load_params` / :func:`save_params` — whole pytrees (by file type).
* :class:`PathSource` — a :class:`~flexmerge_jax.Source` over one base file
  and n fine-tuned files that reads **only the parameters asked for**
  (one block at a time), from headers/metadata without loading anything up
  front: ``np.load`` members, ``safetensors.safe_open`` tensors and Orbax
  partial restores. ``fm.plan(base_path, [paths...])`` uses it, so host
  memory stays at one block of all tasks.

Names: ``.npz`` and ``.safetensors`` keys are the parameter names (keys
containing ``"/"`` are nested into dicts by :func:`load_params`, which gives
the same ``"/"``-joined names); Orbax trees are named by their key paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .. import _atomic
from ..tree import Layout, flatten, layout_mismatch, nest
from ._source import (
    MemorySource,
    Source,
    aligned_empty,
    check_names,
    flat_runs,
    region_runs,
)

__all__ = ["detect_format", "load_params", "save_params", "PathSource", "path_source", "is_path",
           "fingerprint", "fingerprint_change", "hf_weights", "task_name", "as_source"]

PyTree = Any


def is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


_SAMPLES, _SAMPLE_BYTES = 64, 4096
VERIFY = ("fast", "full")


def _files(p: Path) -> list[Path]:
    """The files of an input: a directory's, an index and its shards, or ``p``."""
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    if p.name.endswith(INDEX_SUFFIX):
        return [p, *(p.parent / s for s in sorted(set(_index_shards(p).values())))]
    return [p]


def fingerprint(path, verify: str = "fast") -> dict:
    """What a plan records of an input file (or checkpoint directory).

    Args:
      path: the file or directory.
      verify: ``"fast"``: size, modification time and a BLAKE2b hash of 64
        evenly spaced 4 KiB samples of each file (a few hundred KiB read
        whatever the model size); ``"full"``: also a BLAKE2b hash of every
        byte (reads the whole input once more).

    Returns:
      ``{"size": bytes, "mtime_ns": latest modification, "sample":
      "blake2b:<hex>"}`` and, for ``"full"``, ``"full": "blake2b:<hex>"``
      (directories: over every file, with its relative path; a safetensors
      index: over it and its shards).

    Raises:
      ValueError: the path does not exist, or ``verify`` is unknown.
    """
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {list(VERIFY)}, got {verify!r}")
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or directory")
    sample = hashlib.blake2b(digest_size=16)
    full = hashlib.blake2b(digest_size=16) if verify == "full" else None
    total, mtime = 0, 0
    files = _files(p)
    root = p if p.is_dir() else p.parent
    for f in files:
        st = f.stat()
        size = st.st_size
        total, mtime = total + size, max(mtime, st.st_mtime_ns)
        name = f"{f.relative_to(root) if len(files) > 1 or p.is_dir() else ''}\0{size}\0".encode()
        sample.update(name)
        with open(f, "rb") as fh:
            span = max(size - _SAMPLE_BYTES, 0)
            for k in range(_SAMPLES if size > _SAMPLE_BYTES else 1):
                fh.seek(span * k // (_SAMPLES - 1))
                sample.update(fh.read(_SAMPLE_BYTES))
            if full is not None:
                full.update(name)
                fh.seek(0)
                while chunk := fh.read(1 << 22):
                    full.update(chunk)
    out = {"size": total, "mtime_ns": mtime, "sample": "blake2b:" + sample.hexdigest()}
    if full is not None:
        out["full"] = "blake2b:" + full.hexdigest()
    return out


def fingerprint_change(recorded, path) -> str | None:
    """Why ``path`` is not the input ``recorded`` (a :func:`fingerprint`),
    or ``None`` if it is. Checked as recorded: with a full hash, the content
    decides (a copy with another modification time is the same input);
    without, a different modification time counts as a change too (the
    samples cannot see an in-place edit of a few values)."""
    p = Path(path)
    if not p.exists():
        return "no longer exists"
    if not isinstance(recorded, dict):  # recorded by an older version: not comparable
        return None
    now = fingerprint(p, "full" if "full" in recorded else "fast")
    if now["size"] != recorded["size"]:
        return f"size {recorded['size']} -> {now['size']} bytes"
    if now["sample"] != recorded["sample"] or now.get("full") != recorded.get("full"):
        return "content differs"
    if "full" not in recorded and now["mtime_ns"] != recorded["mtime_ns"]:
        return ("modified since (same size and sampled bytes, other modification time: an edit, "
                "or a copy; verify='full' tells them apart)")
    return None


def fingerprints(base, finetuned, verify: str = "fast") -> dict:
    """``{"base": fingerprint, "finetuned": [fingerprint, ...]}`` of paths."""
    return {"base": fingerprint(base, verify),
            "finetuned": [fingerprint(f, verify) for f in finetuned]}


class FileInputs:
    """For sources reading files: their fingerprints, taken when the source
    is made (before anything is read), for ``describe()`` and
    :meth:`changed`."""

    def _record_inputs(self, base, finetuned, task_names, verify: str) -> None:
        self._inputs = [("the base", Path(base))] + [
            (f"task {t!r}", Path(f)) for t, f in zip(task_names, finetuned)]
        self._fingerprints = fingerprints(base, finetuned, verify)

    def changed(self) -> list[str]:
        """The input files that differ from when this source was made, each
        as ``"task 'x' PATH (why)"``."""
        recs = [self._fingerprints["base"], *self._fingerprints["finetuned"]]
        out = []
        for (who, path), rec in zip(self._inputs, recs):
            why = fingerprint_change(rec, path)
            if why:
                out.append(f"{who} {path} ({why})")
        return out


INDEX_SUFFIX = ".safetensors.index.json"
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _torch_error(p: Path) -> ValueError:
    return ValueError(
        f"{p}: a PyTorch pickle, which flexmerge_jax does not read (it would need torch and "
        "runs arbitrary code); convert it to safetensors first, e.g. transformers' "
        "model.save_pretrained(dir, safe_serialization=True) or "
        "safetensors.torch.save_file(torch.load(path), 'model.safetensors')")


def _index_shards(index: Path) -> dict[str, str]:
    """``{tensor name: shard file name}`` of a ``*.safetensors.index.json``."""
    try:
        wm = json.loads(index.read_text())["weight_map"]
        if not (isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values())):
            raise TypeError("weight_map is not a {name: file} object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    return wm


def hf_weights(directory) -> Path | None:
    """The weights of a Hugging Face model directory: its
    ``*.safetensors.index.json`` if it has one, else its single
    ``.safetensors`` file; ``None`` when it has neither.

    Raises:
      ValueError: several indexes, several ``.safetensors`` files without an
        index, or only PyTorch pickles (``pytorch_model.bin``).
    """
    d = Path(directory)
    indexes = sorted(d.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        shown = ", ".join(i.name for i in indexes)
        raise ValueError(f"{d}: several safetensors indexes ({shown}); "
                         "pass the one to read")
    if indexes:
        return indexes[0]
    files = sorted(d.glob("*.safetensors"))
    if len(files) > 1:
        raise ValueError(f"{d}: several .safetensors files and no {INDEX_SUFFIX[1:]} index "
                         f"({', '.join(f.name for f in files[:3])}, ...); pass the file to read")
    if files:
        return files[0]
    torch = sorted(f for f in d.iterdir() if f.suffix in _TORCH_SUFFIXES)
    if torch:
        raise _torch_error(torch[0])
    return None


def _owning_index(shard: Path) -> Path | None:
    """The index beside ``shard`` that lists it as one of its shards."""
    for index in sorted(shard.parent.glob("*" + INDEX_SUFFIX)):
        try:
            if shard.name in set(_index_shards(index).values()):
                return index
        except ValueError:
            continue
    return None


def detect_format(path) -> str:
    """``"npz"``, ``"safetensors"``, ``"hf"`` (a Hugging Face model directory
    or a safetensors index file) or ``"orbax"``.

    Raises:
      ValueError: the path does not exist, is not a params file we read, is
        one shard of a sharded checkpoint (the message names the index) or a
        PyTorch pickle (the message says how to convert it).
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file or directory")
    if p.is_dir():
        if (p / "_METADATA").exists() or (p / "_CHECKPOINT_METADATA").exists():
            return "orbax"
        if (p / "flexmerge.json").exists():
            raise ValueError(
                f"{p}: a flexmerge_jax output directory, not a params checkpoint "
                "(load it with flexmerge_jax.load)"
            )
        if hf_weights(p) is not None:
            return "hf"
        raise ValueError(f"{p}: a directory that is neither an Orbax checkpoint nor a Hugging Face "
                         "model directory (no model.safetensors or model.safetensors.index.json)")
    if p.name.endswith(INDEX_SUFFIX):
        return "hf"
    if p.suffix == ".npz":
        return "npz"
    if p.suffix == ".safetensors":
        index = _owning_index(p)
        if index is not None:
            raise ValueError(f"{p}: one shard of the sharded checkpoint {index}; pass the index "
                             "or its directory to read the whole model")
        return "safetensors"
    if p.suffix in _TORCH_SUFFIXES:
        raise _torch_error(p)
    raise ValueError(f"{p}: unsupported params file (use .npz, .safetensors, a Hugging Face model "
                     "directory or index, or an Orbax directory)")


def task_name(path) -> str:
    """A task's default name from its params path: the file's stem, or the
    directory's name (for an index file, its directory's)."""
    p = Path(path)
    if p.name.endswith(INDEX_SUFFIX):
        return p.absolute().parent.name
    return p.stem if p.suffix and not p.is_dir() else p.name


class _Reader:
    """Lazy access to one params path: names/shapes/dtypes, then arrays.

    ``path`` is what the user gave (named in messages, recorded in plans);
    ``file`` is what is read: the same, or a Hugging Face directory's
    ``.safetensors`` file or index. A sharded checkpoint reads through one
    reader per shard, each tensor from the shard holding it (``_shard_of``).
    """

    def __init__(self, path, _format: str | None = None):
        self.path = Path(path)
        self.format = _format or detect_format(path)
        self.file = self.path
        if self.format == "hf":
            self.file = self.path if self.path.is_file() else hf_weights(self.path)
            if self.file.suffix == ".safetensors":
                self.format = "safetensors"
        if self.format == "hf":  # shard readers name the file at fault themselves
            self.names, self.shapes, self.dtypes = self._index_header()
        else:
            try:
                self.names, self.shapes, self.dtypes = self._header()
            except Exception as e:  # corrupt/foreign files: one clear line
                why = f"no field {e} in its metadata" if isinstance(e, KeyError) else e
                raise ValueError(f"{self.file}: cannot read {self.format} params ({why})") from None
        if not self.names:
            raise ValueError(f"{self.path}: contains no parameters")
        bad = [k for k, d in zip(self.names, self.dtypes) if d == "object"]
        if bad:
            raise ValueError(f"{self.path}: parameter {bad[0]!r} is an array of Python objects "
                             "(pickled), not numbers")

    def _index_header(self):
        """Names/shapes/dtypes of a sharded checkpoint, from its shards' headers."""
        wm = _index_shards(self.file)
        shards: dict[str, _Reader] = {}
        for shard in sorted(set(wm.values())):
            f = self.file.parent / shard
            if not f.is_file():
                raise ValueError(f"{self.file}: lists the shard {shard}, which does not exist")
            shards[shard] = _Reader(f, "safetensors")
        self._shard_of: dict[str, _Reader] = {}
        header = {}
        for shard, r in shards.items():
            for k, shp, dt in zip(r.names, r.shapes, r.dtypes):
                if wm.get(k) == shard:
                    self._shard_of[k] = r
                    header[k] = (shp, dt)
        missing = sorted(set(wm) - set(header))
        if missing:
            raise ValueError(f"{self.file}: lists {missing[0]!r} in {wm[missing[0]]}, which "
                             f"lacks it ({len(missing)} missing)")
        keys = sorted(header)
        return keys, [header[k][0] for k in keys], [header[k][1] for k in keys]

    def shard_map(self) -> dict[str, str] | None:
        """``{name: shard file name}`` of a sharded checkpoint, else ``None``."""
        if self.format != "hf":
            return None
        return {k: r.file.name for k, r in self._shard_of.items()}

    def _by_shard(self, names) -> dict:
        groups: dict = {}
        for k in names:
            groups.setdefault(self._shard_of[k], []).append(k)
        return groups

    def _header(self):
        if self.format == "npz":
            out = []
            with zipfile.ZipFile(self.file) as zf:
                for member in zf.namelist():
                    if not member.endswith(".npy"):
                        continue
                    with zf.open(member) as f:
                        version = np.lib.format.read_magic(f)
                        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read(f)
                    out.append((member[:-4], tuple(shape), np.dtype(dtype).name))
            out.sort()
            return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]
        if self.format == "safetensors":
            with safe_open(str(self.file), framework="numpy") as f:
                keys = sorted(f.keys())
                shapes = [tuple(f.get_slice(k).get_shape()) for k in keys]
                dtypes = [_st_dtype(f.get_slice(k).get_dtype()) for k in keys]
            self._offsets = _st_offsets(self.file)
            self._dtype = dict(zip(keys, dtypes))
            return keys, shapes, dtypes
        import orbax.checkpoint as ocp

        ck = ocp.StandardCheckpointer(multiprocessing_options=this_process_only())
        md = ck.metadata(self.path.absolute()).item_metadata
        if md is None:
            raise ValueError("no readable tree metadata (_METADATA missing or damaged)")
        md = md.tree
        pairs = jax.tree_util.tree_flatten_with_path(
            md, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
        )[0]
        names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in pairs]
        self._orbax_paths = {n: p for n, (p, _) in zip(names, pairs)}
        return (
            names,
            [tuple(int(d) for d in m.shape) for _, m in pairs],
            [np.dtype(m.dtype).name for _, m in pairs],
        )

    def layout(self) -> Layout:
        return Layout(tuple(self.names), tuple(self.shapes), tuple(self.dtypes))

    def read(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        names = list(names)
        if self.format == "hf":
            got = {}
            for r, sub in self._by_shard(names).items():
                got.update(r.read(sub))
            return {k: got[k] for k in names}
        if self.format == "npz":
            with np.load(self.file) as z:
                return {k: z[k] for k in names}
        if self.format == "safetensors":
            return self._read_safetensors(names)
        return self._read_orbax(names)

    def _read_safetensors(self, names) -> dict[str, np.ndarray]:
        """Floating-point tensors read straight from the file into 64-byte
        aligned arrays (one copy; XLA's CPU client then aliases them instead
        of copying, and the read releases the GIL for a prefetching thread);
        other dtypes through ``safetensors``."""
        out, other = {}, []
        shape = dict(zip(self.names, self.shapes))
        with open(self.file, "rb", buffering=0) as f:
            for k in names:
                if self._dtype[k] not in _RUN_DTYPES:
                    other.append(k)
                    continue
                a = aligned_empty(shape[k], np.dtype(_RUN_DTYPES[self._dtype[k]]))
                view, got = memoryview(a.reshape(-1).view(np.uint8)), 0
                f.seek(self._offsets[k])
                while got < a.nbytes:
                    r = f.readinto(view[got:])
                    if not r:
                        raise ValueError(f"{self.file}: truncated data for parameter {k!r}")
                    got += r
                out[k] = a
        if other:
            with safe_open(str(self.file), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in other})
        return {k: out[k] for k in names}

    def read_runs(self, requests) -> list[np.ndarray]:
        """Per ``(name, starts, length)`` request, ``[m, length]`` arrays of
        the flat entries ``[s, s + length)``. Safetensors: byte ranges in the
        file's dtype, nothing else read; other formats: the parameters read
        whole, runs as float32."""
        if self.format == "hf":
            out: list = [None] * len(requests)
            groups: dict = {}
            for j, req in enumerate(requests):
                groups.setdefault(self._shard_of[req[0]], []).append(j)
            for r, idx in groups.items():
                for j, runs in zip(idx, r.read_runs([requests[j] for j in idx])):
                    out[j] = runs
            return out
        ranged = self.format == "safetensors" and all(
            self._dtype[r[0]] in _RUN_DTYPES for r in requests)
        if not ranged:
            got = self.read([r[0] for r in requests])
            return [flat_runs(got[name], st, ln) for name, st, ln in requests]
        out = []
        with open(self.file, "rb", buffering=0) as f:
            fd = f.fileno()
            for name, starts, length in requests:
                dt = np.dtype(_RUN_DTYPES[self._dtype[name]])
                begin, want = self._offsets[name], length * dt.itemsize
                runs = np.empty((len(starts), length), dt)
                for i, s in enumerate(np.asarray(starts, np.int64)):
                    buf = os.pread(fd, want, begin + int(s) * dt.itemsize)
                    if len(buf) != want:
                        raise ValueError(f"{self.file}: truncated data for parameter {name!r}")
                    runs[i] = np.frombuffer(buf, dt)
                out.append(runs)
        return out

    def read_region(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """``read([name])[name][index]``: from safetensors only the region's
        byte ranges (one per run of contiguous entries); other formats read
        the parameter whole."""
        if self.format == "hf":
            return self._shard_of[name].read_region(name, index)
        if self.format != "safetensors" or self._dtype[name] not in _RUN_DTYPES:
            return self.read([name])[name][index]
        shape = dict(zip(self.names, self.shapes))[name]
        starts, length = region_runs(shape, index)
        region = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))
        return self.read_runs([(name, starts, length)])[0].reshape(region)

    def _read_orbax(self, names):
        import orbax.checkpoint as ocp

        flat = {}
        for k in names:
            flat[k] = self._orbax_paths[k]
        item: dict = {}
        rargs: dict = {}
        shapes = dict(zip(self.names, self.shapes))
        dtypes = dict(zip(self.names, self.dtypes))
        for k, path in flat.items():
            node, rnode = item, rargs
            keys = [getattr(e, "key", getattr(e, "idx", None)) for e in path]
            for key in keys[:-1]:
                node = node.setdefault(key, {})
                rnode = rnode.setdefault(key, {})
            node[keys[-1]] = np.zeros(shapes[k], dtypes[k])
            rnode[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        # Read by every process for itself, possibly in a prefetching thread.
        one = this_process_only()
        out = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=one),
                               multiprocessing_options=one).restore(
            self.path.absolute(),
            args=ocp.args.PyTreeRestore(item=item, restore_args=rargs, partial_restore=True),
        )
        got_names, got_leaves, _ = flatten(out)
        got = dict(zip(got_names, got_leaves))
        return {k: got[k] for k in names}


def _st_offsets(path) -> dict[str, int]:
    """Absolute byte offset of each tensor's data in a safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: 8 + size + int(v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def _run_dtypes() -> dict:
    return {"float32": "<f4", "float16": "<f2", "float64": "<f8",
            "bfloat16": ml_dtypes.bfloat16}


_RUN_DTYPES = _run_dtypes()


def _st_dtype(code: str) -> str:
    table = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
             "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    return table.get(code, code.lower())


def load_params(path) -> PyTree:
    """Loads a whole params file into a pytree of numpy arrays.

    ``.npz`` / ``.safetensors``: a dict keyed by the file's names (nested at
    ``"/"``); Orbax: the saved tree.
    """
    r = _Reader(path)
    if r.format == "orbax":
        import orbax.checkpoint as ocp

        return restore_tree(ocp.StandardCheckpointer(multiprocessing_options=this_process_only()),
                            r.path)
    flat = r.read(r.names)
    return nest(flat) if any("/" in k for k in flat) else flat


def this_process_only():
    """Orbax options for reading or writing from this process alone.

    Orbax's defaults end each restore and save with a barrier of every
    process of ``jax.distributed``, a device collective
    (``sync_global_devices``): issued from a reader thread, or by one process
    alone, it hangs or meets another program's collective (Gloo: "context
    initialization failed").
    """
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


def restore_tree(checkpointer, path, place=None) -> PyTree:
    """The tree of the Orbax checkpoint at ``path`` (restored with
    ``checkpointer``, an ``orbax.checkpoint.StandardCheckpointer``), each
    leaf a NumPy array, or restored onto the sharding that ``place(keys,
    shape)`` gives it (``keys``: the leaf's path of dict keys; ``None``:
    NumPy).

    Every leaf gets a target: without one, Orbax restores arrays saved
    sharded as jax.Arrays on the saving topology (devices, processes), and
    refuses any other (a pod's model on one host).
    """
    path = Path(path).absolute()

    def target(kp, m):
        sharding = None if place is None else place(tuple(str(k.key) for k in kp), tuple(m.shape))
        if sharding is None:
            return np.zeros(m.shape, m.dtype)  # zero pages, never touched: only the type
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)

    md = checkpointer.metadata(path).item_metadata.tree
    return checkpointer.restore(path, jax.tree_util.tree_map_with_path(target, md))


def save_npz(file, arrays: dict[str, np.ndarray], path) -> None:
    """``np.savez`` of ``arrays`` to ``file``, refusing dtypes NumPy cannot
    store (bfloat16 would be read back as raw ``V2`` bytes)."""
    for k, a in arrays.items():
        if a.dtype.kind == "V" or a.dtype.name == "bfloat16":
            raise ValueError(f"{path}: .npz cannot store {a.dtype.name} (parameter {k!r}); "
                             "use .safetensors or Orbax")
    np.savez(file, **arrays)


def save_params(path, params: PyTree) -> Path:
    """Saves a params pytree to ``.npz``, ``.safetensors`` or an Orbax dir.

    The format follows the suffix (no suffix: Orbax). Names are the leaves'
    ``"/"``-joined key paths. The write is atomic (temporary + rename).
    Under ``jax.distributed`` it writes from the calling process alone
    (arrays spread over processes cannot be saved so); Orbax directories only
    from process 0 (Orbax writes NumPy arrays from no other).

    Raises:
      ValueError: ``path`` exists, or an Orbax save on a process other than 0.
      OSError: a failed write (a full disk), naming ``path``; nothing is left.
    """
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists")
    if path.suffix not in (".npz", ".safetensors") and jax.process_index() != 0:
        raise ValueError(f"{path}: Orbax writes NumPy arrays only from process 0 of a "
                         f"jax.distributed run (this is process {jax.process_index()}); "
                         "save it from process 0, or as .safetensors or .npz")
    host = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), params)
    names, leaves, _ = flatten(host)
    arrays = dict(zip(names, leaves))
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with os_errors(path):
            if path.suffix == ".npz":
                with open(tmp, "wb") as f:
                    save_npz(f, arrays, path)
            elif path.suffix == ".safetensors":
                save_file(arrays, str(tmp))
            else:
                save_orbax(tmp, host)
        os.replace(tmp, path)
    except BaseException as e:
        _atomic.abandon(tmp)
        _atomic.abandon(tmp.with_name(tmp.name + ORBAX_TMP_SUFFIX))  # an interrupted Orbax save's
        if isinstance(e, OSError) and e.errno and str(e.filename or tmp).startswith(str(tmp)):
            raise OSError(e.errno, e.strerror, str(path)) from e  # the user's name, not tmp's
        raise
    return path


def save_orbax(dest: Path, tree: PyTree, *, force: bool = False) -> None:
    """Writes ``tree`` (host arrays) as an Orbax checkpoint ``dest`` from
    this process alone (:func:`this_process_only`; Orbax writes NumPy arrays
    only from process 0 of ``jax.distributed``, whatever the options say).

    ``dest``: a new path, or with ``force`` an empty directory made for it
    (then removed on failure too). On failure removes what it wrote
    (:func:`discard_failed_write`) and raises.
    """
    import orbax.checkpoint as ocp

    # Orbax writes into this sibling and renames it to dest when done.
    written = [dest.with_name(dest.name + ORBAX_TMP_SUFFIX)]
    if force or not os.path.lexists(dest):
        written.append(dest)
    before = set(threading.enumerate())
    ck = ocp.StandardCheckpointer(multiprocessing_options=this_process_only())
    try:
        ck.save(dest.absolute(), tree, force=force)
        ck.wait_until_finished()
    except BaseException:
        try:
            with contextlib.suppress(Exception):  # raises the write's error once more
                ck.close()
        finally:  # also after a second Ctrl-C during close()
            discard_failed_write(written, before)
        raise
    ck.close()


#: The suffix of the directory Orbax writes a checkpoint into before
#: renaming it into place.
ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


@contextlib.contextmanager
def os_errors(path: Path | None):
    """Reraises TensorStore's errors for a failed system call (a screenful
    of JSON specification ending in ``[os_error_code='28']``) and
    safetensors' (``... (os error 28)``) as the ``OSError`` they are:
    ``[Errno 28] No space left on device: 'path'``."""
    try:
        yield
    except Exception as e:
        if isinstance(e, OSError):
            raise
        code = re.search(r"os_error_code='(\d+)'|\(os error (\d+)\)", str(e))
        if code is None:
            raise
        code = int(code.group(1) or code.group(2))
        raise OSError(code, os.strerror(code), str(path)) from e


def discard_failed_write(directories: Sequence[Path], threads_before: set, *,
                         remove: bool = True) -> None:
    """Removes what a failed Orbax save wrote, once its stragglers are done.

    After a failed write Orbax reports the first error it waits for and no
    longer waits for the rest: its threads writing other arrays may still be
    running, and so may TensorStore's writes, which go on after the thread
    that started them gave up; a write that lands after the caller removed
    the directory recreates it (TensorStore creates missing directories) and
    leaves it behind. So this joins the Orbax threads not in
    ``threads_before`` (``threading.enumerate()`` before the save; 30 s at
    most in all: one waiting for another process's signal would otherwise
    hold up a Ctrl-C until Orbax's timeout), then, with ``remove``, removes
    each of ``directories`` until it has stayed absent for
    :data:`_atomic.SETTLE_S` (:func:`_atomic.remove_settled`): TensorStore's
    last writes land within moments, but nothing tells when.
    """
    deadline = time.monotonic() + 30
    for t in set(threading.enumerate()) - threads_before:
        # Orbax's writing threads: orbax.checkpoint._src.futures.future._SignalingThread.
        if type(t).__module__.startswith("orbax.") and t is not threading.current_thread():
            with contextlib.suppress(Exception):  # Orbax's join reraises the thread's error
                t.join(timeout=max(0.0, deadline - time.monotonic()))
    if remove:
        for d in directories:
            _atomic.remove_settled(d)


class PathSource(FileInputs, Source):
    """Base + n fine-tuned params files, read one set of parameters at a time.

    Layouts are checked up front from headers (names, shapes, dtypes), naming
    the file at fault.
    """

    prefetch = True

    def __init__(self, base, finetuned: Sequence, task_names=None, verify: str = "fast"):
        if is_path(finetuned) or not isinstance(finetuned, Sequence):
            raise ValueError("finetuned must be a list of paths")
        if len(finetuned) < 2:
            raise ValueError(f"FlexMerge needs at least 2 fine-tuned models, got {len(finetuned)}")
        self._base = _Reader(base)
        self._ft = [_Reader(p) for p in finetuned]
        self.layout = self._base.layout()
        for name, dt in zip(self.layout.names, self.layout.dtypes):
            if dt != "bfloat16" and not np.issubdtype(np.dtype(dt), np.floating):
                raise ValueError(f"{self._base.path}: parameter {name!r} has dtype {dt}; "
                                 "FlexMerge merges floating-point parameters only (for Hugging "
                                 "Face files with integer buffers such as position_ids use "
                                 "flexmerge_jax.adapters.hf_source)")
        for i, r in enumerate(self._ft):
            msg = layout_mismatch(self.layout, r.layout())
            if msg:
                raise ValueError(f"task {i} ({r.path}): {msg}")
        default = [task_name(p) for p in finetuned]
        if task_names is None and len(set(default)) == len(default):
            task_names = default
        self.task_names = check_names(task_names, len(finetuned))
        self._record_inputs(base, finetuned, self.task_names, verify)

    def base(self, names):
        return self._base.read(names)

    def finetuned(self, names):
        return [r.read(names) for r in self._ft]

    def finetuned_tasks(self, names, tasks):
        return {int(t): self._ft[t].read(names) for t in tasks}

    def base_region(self, name, index):
        return self._base.read_region(name, index)

    def finetuned_region(self, name, index, tasks):
        return [self._ft[t].read_region(name, index) for t in tasks]

    def sample_runs(self, requests):
        base = self._base.read_runs(requests)
        fts = [r.read_runs(requests) for r in self._ft]
        return [np.stack([f[j].astype(np.float32) - b.astype(np.float32) for f in fts])
                for j, b in enumerate(base)]

    def describe(self) -> dict:
        return {
            "kind": "paths",
            "base": str(self._base.path.absolute()),
            "finetuned": [str(r.path.absolute()) for r in self._ft],
            "task_names": list(self.task_names),
            "fingerprints": self._fingerprints,
        }


def path_source(base, finetuned, task_names=None, verify: str = "fast") -> PathSource:
    """A :class:`PathSource` (``finetuned``: list of paths; ``verify``: see
    :func:`fingerprint`)."""
    return PathSource(base, finetuned, task_names, verify)


def as_source(base, finetuned, task_names=None, verify: str = "fast") -> Source:
    """Coerces (pytree, [pytrees]) or a :class:`Source` to a Source
    (``verify``: how its inputs are fingerprinted, see :func:`flexmerge_jax.plan`)."""
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {list(VERIFY)}, got {verify!r}")
    if isinstance(base, Source):
        if finetuned is not None:
            raise ValueError("pass finetuned=None when base is a Source")
        return base
    if finetuned is None:
        raise ValueError("finetuned models are required")
    if isinstance(base, (str, os.PathLike)):
        return path_source(base, finetuned, task_names, verify)
    return MemorySource(base, finetuned, task_names, verify)
