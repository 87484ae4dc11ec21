"""Deployable checkpoints of a merged model's tasks (``fm.export``).

A saved FlexModel stores shared parameter sets and routing tables; a serving
stack wants one ordinary checkpoint per task. :func:`export` writes each
task's full params (:meth:`FlexModel.params_for_task`) as safetensors, npz,
an Orbax checkpoint, or a Hugging Face model directory mirroring the base
input's (its config and tokenizer files, tensor names, dtypes and shards).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ._flexmodel import FlexModel
from .adapters.hf import as_name_map, to_hf
from .checkpointing import atomic_save, broadcast_text, gathered, load
from .progress import Progress
from .sources import files as io_lib
from .tree import flatten

__all__ = ["export", "FORMATS"]

FORMATS = ("safetensors", "hf", "orbax", "npz")
#: Files of a Hugging Face directory that hold weights (never copied: the
#: export writes its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


def export(model, out, *, task: int | str | None = None, format: str = "safetensors",
           base=None, mapping=None, transpose=True, progress: bool | None = None) -> Path:
    """Writes tasks' full params of a merged model as ordinary checkpoints.

    Args:
      model: a :class:`FlexModel`, or the directory of one (``fm.save``,
        ``fm.save_cut``, ``flexmerge merge``/``cut``).
      out: a new directory. With ``task`` it is that task's checkpoint;
        without, it holds one such directory per task, named after the task.
      task: a task index or name; ``None``: every task.
      format: what a task's checkpoint is (dtypes are the inputs' throughout):

        * ``"safetensors"`` — ``model.safetensors`` keyed by the params names
          (``fm.load_params(dir)`` reads the directory);
        * ``"npz"`` — ``params.npz`` keyed by the params names;
        * ``"orbax"`` — the directory is an Orbax checkpoint of the params
          pytree (``ocp.StandardCheckpointer().restore``);
        * ``"hf"`` — a Hugging Face model directory like ``base``: its other
          files (``config.json``, tokenizer files, ...) copied, the weights
          under its tensor names, in its dtypes and shard files (with
          ``model.safetensors.index.json`` when it is sharded), so
          ``from_pretrained`` or ``fm.load_params`` reads it.
      base: for ``"hf"``, the Hugging Face directory (or index, or
        ``.safetensors`` file: then no other files are copied) to mirror;
        default: the model's recorded base input, when it was planned from
        files.
      mapping, transpose: for ``"hf"`` exports of models planned through
        :func:`~flexmerge_jax.adapters.hf_source` with a name mapping: the
        same arguments (the inverse mapping and transposition give the HF
        tensors; tensors the mapping dropped, such as ``position_ids``
        buffers, are copied from ``base``).
      progress: report the tasks written on stderr (see
        :mod:`flexmerge_jax.progress`).

    Returns:
      ``out``. The export is written into a temporary sibling and renamed into
      place once complete (as :func:`flexmerge_jax.save`).

    Raises:
      ValueError: ``out`` exists, an unknown format or task, or a base that
        cannot be mirrored (named).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    if format != "hf" and (base is not None or mapping is not None):
        raise ValueError(f"base= and mapping= describe the Hugging Face directory of format 'hf', "
                         f"not {format!r}")
    if not isinstance(model, FlexModel):
        path = model
        model = load(path)
        if not isinstance(model, FlexModel):
            raise ValueError(f"{path}: a plan, not a model; cut it first "
                             "(fm.save_cut / flexmerge cut PLAN --size S --out DIR)")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; export writes a new directory")
    tasks = list(range(model.n)) if task is None else [model.task_index(task)]
    mirror = _Mirror(model, base, mapping, transpose) if format == "hf" else None
    if task is None:
        dirs = {t: _task_dir(name) for t, name in enumerate(model.task_names)}
        if len(set(dirs.values())) < len(dirs):
            raise ValueError(f"task names {list(model.task_names)} do not give distinct "
                             "directory names; export the tasks one by one")

    def write(tmp: Path) -> None:
        with Progress(len(tasks), "export", progress, "tasks") as bar:
            for t in tasks:
                dest = tmp if task is not None else tmp / dirs[t]
                _write_task(dest, model.params_for_task(t), format, mirror,
                            f"{out}: task {model.task_names[t]!r}")
                bar.update(1, model.task_names[t])

    return atomic_save(out, write, overwrite=False, manifest=False, shared=False)


def _task_dir(name: str) -> str:
    safe = name.replace("/", "_").replace(os.sep, "_")
    return safe if safe not in ("", ".", "..") else f"task_{safe}"


def _host(x) -> np.ndarray:
    return np.ascontiguousarray(jax.device_get(x))


def _write_task(dest: Path, params: Any, format: str, mirror: _Mirror | None, what: str) -> None:
    """One task's checkpoint in ``dest`` (created here; an existing empty
    directory, the top-level temporary one, is reused).

    Under ``jax.distributed`` every process gathers the task's parameters
    (collectives, in the same order everywhere) and process 0 alone writes:
    the others' copies would be thrown away, and their Orbax saves, running
    at the same time as process 0's, share its completion signals' keys in
    the coordination service (one process's finished save deleted the keys
    the other waited for: a 300 s timeout). Process 0 then tells the others
    whether it wrote, so that an error there (``what`` names the task) fails
    every process here instead of leaving them in the next gather.
    """
    # Arrays held whole by this process stay where they are: the writers
    # copy them to the host one at a time.
    params = jax.tree_util.tree_map(gathered, params)
    if jax.process_count() == 1:
        _write_host(dest, params, format, mirror)
        return
    error = None
    if jax.process_index() == 0:
        try:
            _write_host(dest, params, format, mirror)
        except Exception as e:
            error = e
    got = broadcast_text(f"!{type(error).__name__}: {error}" if error else "+")
    if error is not None:
        raise error
    if got[0] == "!":
        raise ValueError(f"{what}: process 0 could not write it ({got[1:]})")


def _write_host(dest: Path, params: Any, format: str, mirror: _Mirror | None) -> None:
    """Writes one task's checkpoint (its arrays readable on this host)."""
    if format == "orbax":
        # force: ``dest`` may be the (empty) temporary directory made for us.
        io_lib.save_orbax(dest, jax.tree_util.tree_map(_host, params), force=True)
        return
    dest.mkdir(exist_ok=True)
    if format == "hf":
        mirror.write(dest, params)
        return
    names, leaves, _ = flatten(params)
    arrays = {n: _host(x) for n, x in zip(names, leaves)}
    if format == "npz":
        with open(dest / "params.npz", "wb") as f:
            io_lib.save_npz(f, arrays, dest / "params.npz")
    else:
        save_file(arrays, str(dest / "model.safetensors"))


class _Mirror:
    """The Hugging Face checkpoint a ``"hf"`` export mirrors: where each
    tensor goes (shard file, name, dtype) and which files come along."""

    def __init__(self, model: FlexModel, base, mapping, transpose):
        if base is None:
            src = model.source or {}
            base = src.get("base")
            if base is None:
                raise ValueError("format 'hf' needs base= (the Hugging Face directory to mirror): "
                                 "this model was not planned from files")
        self.reader = r = io_lib._Reader(base)
        if r.format not in ("safetensors", "hf"):
            raise ValueError(f"{r.path}: a {r.format} checkpoint; format 'hf' mirrors a Hugging "
                             "Face directory, index or .safetensors file (pass base=)")
        self.shard_of = r.shard_map() or dict.fromkeys(r.names, r.file.name)
        self.dtype = dict(zip(r.names, r.dtypes))
        self.mapping, self.transpose = mapping, transpose
        layout = set(model.layout.names)
        if mapping is None:
            missing = sorted(layout - set(r.names))
            if missing:
                raise ValueError(f"{r.path} has no tensor {missing[0]!r} of the model "
                                 f"({len(missing)} missing); if the model was planned through a "
                                 "name mapping, pass the same mapping= and transpose=")
            self.copied = sorted(set(r.names) - layout)
        else:
            kept = as_name_map(mapping).map_names(r.names)
            self.copied = sorted(set(r.names) - set(kept))
        # Other files of the model directory: config.json, tokenizer files, ...
        home = r.path if r.path.is_dir() else r.file.parent if r.format == "hf" else None
        self.files = [] if home is None else sorted(
            f for f in home.iterdir() if f.is_file() and not f.name.endswith(
                _WEIGHT_SUFFIXES + (io_lib.INDEX_SUFFIX,)))
        self.index = r.file if r.format == "hf" else None

    def tensors(self, params) -> dict[str, np.ndarray]:
        """``{HF name: array}`` of one task: the model's, then the copied ones."""
        if self.mapping is None:
            names, leaves, _ = flatten(params)
            out = {n: _host(x) for n, x in zip(names, leaves)}
        else:
            out = to_hf(params, self.mapping, transpose=self.transpose, like=self.reader.names)
        out.update(self.reader.read(self.copied) if self.copied else {})
        unknown = sorted(set(out) - set(self.shard_of))
        if unknown:
            raise ValueError(f"{self.reader.path} has no tensor {unknown[0]!r} "
                             f"({len(unknown)} unknown)")
        return {k: a if str(a.dtype) == self.dtype[k] else a.astype(_np_dtype(self.dtype[k]))
                for k, a in out.items()}

    def write(self, dest: Path, params) -> None:
        tensors = self.tensors(params)
        shards: dict[str, dict] = {}
        for k in sorted(tensors):
            shards.setdefault(self.shard_of[k], {})[k] = tensors[k]
        for name, part in shards.items():
            save_file(part, str(dest / name), metadata=self._metadata(name))
        if self.index is not None:
            meta = json.loads(self.index.read_text()).get("metadata") or {}
            meta["total_size"] = int(sum(a.nbytes for a in tensors.values()))
            with open(dest / self.index.name, "w") as f:
                weight_map = {k: self.shard_of[k] for k in sorted(tensors)}
                json.dump({"metadata": meta, "weight_map": weight_map}, f, indent=2)
                f.write("\n")
        for f in self.files:
            shutil.copy2(f, dest / f.name)

    def _metadata(self, shard: str) -> dict[str, str]:
        """The base shard's header metadata (``transformers`` requires
        ``{"format": "pt"}`` or another framework there)."""
        f = self.reader.file.parent / shard if self.index is not None else self.reader.file
        with safe_open(str(f), framework="numpy") as st:
            return st.metadata() or {"format": "pt"}


def _np_dtype(name: str):
    return io_lib._RUN_DTYPES.get(name, name)
