"""Output directories that appear whole or not at all, never over someone else's.

:func:`write_dir` writes into a temporary directory beside the target and
then *claims* the target: the finished directory is renamed onto the target
path with Linux's ``renameat2(RENAME_NOREPLACE)``, which fails if anything
(even an empty directory) is there by then. A plain ``rename`` would not do:
it silently replaces an empty directory, and an existence check before it
leaves a window in which another process (a second save of the same path, a
user's ``mkdir``) can put something there that the rename then clobbers or
that clobbers ours. So of two concurrent saves of one path exactly one
succeeds; the other finds the target taken and fails, leaving it alone.
Where ``renameat2`` is missing (non-Linux, or a filesystem without it) the
claim is ``mkdir(target)`` (exclusive everywhere) followed by a rename onto
that empty directory of ours. :func:`begin` and :func:`finish` are the two
halves of :func:`write_dir`, for a directory that several processes fill (one
process begins and finishes: ``checkpointing._atomic``).

``overwrite`` replaces only a directory that this library wrote and that
holds nothing else: every save writes a manifest (:data:`MANIFEST`) of the
files it holds, and anything not in it (a user's evaluation results, say) is
named in the refusal. The old directory is first renamed aside and checked
again there, so files added after the first check are not lost either.

Temporaries are named ``.<target>.tmp-<host>-<pid>-<random>`` (and the old
directory of an overwrite ``.<target>.old-...``): the next save of the same
target removes those of processes of this host that no longer run (a
``kill -9``, a power cut).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_dir", "begin", "finish", "abandon", "remove_settled", "check_target",
           "MANIFEST"]

#: File listing what a save wrote (paths relative to the directory, ``/``
#: separated, directories with a trailing ``/``).
MANIFEST = ".flexmerge-manifest.json"
# What a directory saved before manifests existed holds (its top level).
_LEGACY_ENTRIES = ("flexmerge.json", "arrays")
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_name(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Removes the temporaries of ``target`` left by dead processes of this
    host (their pid is in the name); returns what was removed."""
    pattern = re.compile(
        rf"\.{re.escape(target.name)}\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.fullmatch(p.name)
        if m and m["host"] == _host() and not _alive(int(m["pid"])):
            abandon(p)
            removed.append(p)
    return removed


def abandon(p: Path) -> None:
    """Removes a temporary directory (or file) of an unfinished save."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


#: How long a failed write's directory must stay absent before it counts as
#: removed: see :func:`remove_settled`.
SETTLE_S = 0.3


def remove_settled(p: Path, quiet_s: float = SETTLE_S, limit_s: float = 10.0) -> None:
    """Removes ``p`` (:func:`abandon`), and again whenever it reappears, until
    it has stayed absent for ``quiet_s`` (``limit_s`` at most in all): for a
    failed write whose last writes may still land (TensorStore creates the
    directories it writes into)."""
    start = time.monotonic()
    gone_since = None
    while (now := time.monotonic()) - start < limit_s:
        if os.path.lexists(p):
            abandon(p)
            gone_since = None
        elif gone_since is None:
            gone_since = now
        elif now - gone_since >= quiet_s:
            return
        time.sleep(0.01)


def _entries(d: Path) -> set[str]:
    out = set()
    for root, dirs, files in os.walk(d):
        rel = Path(root).relative_to(d)
        out.update(f"{(rel / x).as_posix()}/" for x in dirs)
        out.update((rel / x).as_posix() for x in files)
    return out


def _write_manifest(d: Path) -> None:
    entries = sorted(_entries(d))
    with open(d / MANIFEST, "w") as f:
        json.dump({"written": entries}, f, indent=0)
        f.write("\n")


def _foreign_entries(d: Path, shown_as: Path) -> list[str]:
    """What ``d`` holds beyond what a save wrote there (top-most entries)."""
    try:
        written = set(json.loads((d / MANIFEST).read_text())["written"])
    except FileNotFoundError:  # saved before manifests: the known layout
        return sorted(e.name + ("/" if e.is_dir() else "") for e in d.iterdir()
                      if e.name not in _LEGACY_ENTRIES)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{shown_as}: its {MANIFEST} is not valid; not replaced") from None
    extra = sorted(_entries(d) - written - {MANIFEST})
    # Name a user's directory once, not every file in it.
    dirs = [x for x in extra if x.endswith("/")]
    return [e for e in extra if not any(e != x and e.startswith(x) for x in dirs)]


def _check_replaceable(d: Path, check_ours: Callable[[Path], object], shown_as: Path) -> None:
    """Raises unless ``d`` (to replace ``shown_as``, the name in messages) is
    a directory this library wrote holding nothing else."""
    target = shown_as
    if d.is_symlink() or not d.is_dir():
        raise ValueError(f"{target} exists and is not a directory; not replaced")
    try:
        check_ours(d)  # raises ValueError for what this library did not write
    except ValueError as e:
        raise ValueError(str(e).replace(str(d), str(target)) + "; not replaced") from None
    extra = _foreign_entries(d, target)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ValueError(
            f"{target} holds files flexmerge_jax did not write ({shown}); not replaced: "
            "move them out or save elsewhere")


def _is_empty_dir(p: Path) -> bool:
    try:
        return p.is_dir() and not p.is_symlink() and not any(p.iterdir())
    except OSError:
        return False


def check_target(target: Path, overwrite: bool, check_ours: Callable[[Path], object]) -> None:
    """Fails if ``target`` cannot be saved to: it exists (not an empty
    directory) and ``overwrite`` is false, or it is not ours to replace.

    Raises:
      ValueError: naming the path (and any files that are not ours).
    """
    if not os.path.lexists(target) or _is_empty_dir(target):
        return
    if not overwrite:
        raise ValueError(f"{target} exists; pass overwrite=True to replace it")
    _check_replaceable(target, check_ours, target)


try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not glibc >= 2.28
    _renameat2 = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Renames ``src`` to ``dst``, failing (``FileExistsError``) if
    ``dst`` exists, atomically (see the module docstring)."""
    if _renameat2 is not None:
        r = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if r == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS):  # else: the filesystem lacks it
            raise OSError(e, os.strerror(e), str(src), None, str(dst))
    if os.name == "nt":  # Windows' rename never replaces
        os.rename(src, dst)
        return
    os.mkdir(dst)  # exclusive: FileExistsError if anything is there
    try:
        os.rename(src, dst)  # onto our own empty directory
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


def _claim(tmp: Path, target: Path) -> None:
    if _is_empty_dir(target):  # holds nothing to lose (e.g. made by mkdtemp)
        with contextlib.suppress(OSError):
            os.rmdir(target)  # fails if something was put in meanwhile: the claim then fails
    try:
        rename_noreplace(tmp, target)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise ValueError(
                f"{target} was created by someone else while this save was writing "
                "(another save of the same path?); it was left as it is and nothing was saved"
            ) from None
        raise


def write_dir(target: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool,
              check_ours: Callable[[Path], object], manifest: bool = True) -> Path:
    """Runs ``write(tmp)`` on a new temporary directory and claims ``target``.

    Args:
      target: the directory to create (its parents are created).
      write: fills the temporary directory (files of the finished output).
      overwrite: replace an existing ``target`` that ``check_ours`` accepts
        and that holds only what a save wrote.
      check_ours: raises ``ValueError`` for a directory that is not a
        complete output of this library.
      manifest: write :data:`MANIFEST` (needed for ``overwrite`` to replace
        the directory later; exports, never replaced, are written without).

    Returns:
      ``target`` as a Path.

    Raises:
      ValueError: the target exists (or appeared while writing) and may not
        be replaced, naming what is in the way. On any error or interrupt
        (``KeyboardInterrupt``, ...) the temporary directory is removed and
        an existing target is left as it was.
    """
    target = Path(target)
    tmp = begin(target, overwrite=overwrite, check_ours=check_ours)
    try:
        write(tmp)
    except BaseException as e:
        abandon(tmp)
        _reraise_as_target(e, tmp, target)
        raise
    finish(tmp, target, overwrite=overwrite, check_ours=check_ours, manifest=manifest)
    return target


def begin(target: Path, *, overwrite: bool, check_ours: Callable[[Path], object]) -> Path:
    """The first half of :func:`write_dir`: checks ``target``, creates its
    parents and a new empty temporary directory beside it (returned), for
    :func:`finish` to claim ``target`` with once it is filled (several
    processes may fill it, see ``checkpointing._atomic``)."""
    check_target(target, overwrite, check_ours)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = _temp_name(target, "tmp")
    tmp.mkdir()
    return tmp


def finish(tmp: Path, target: Path, *, overwrite: bool, check_ours: Callable[[Path], object],
           manifest: bool = True) -> None:
    """The second half of :func:`write_dir`: writes the manifest of the
    filled ``tmp`` and claims ``target`` with it. On any error ``tmp`` is
    removed and an existing target is left as it was."""
    try:
        if manifest:
            _write_manifest(tmp)
        if overwrite and os.path.lexists(target) and not _is_empty_dir(target):
            _replace(tmp, target, check_ours)
        else:
            _claim(tmp, target)
    except BaseException as e:
        abandon(tmp)
        _reraise_as_target(e, tmp, target)
        raise


def _reraise_as_target(e: BaseException, tmp: Path, target: Path) -> None:
    """Raises an ``OSError`` about the temporary directory (gone now) as one
    about the user's path; returns for other errors."""
    if isinstance(e, OSError) and str(e.filename or "").startswith(str(tmp)):
        raise OSError(e.errno, e.strerror, str(target)) from e


def _replace(tmp: Path, target: Path, check_ours) -> None:
    """Puts ``tmp`` in the place of ``target`` after checking it is ours.

    The old directory is renamed aside first and checked again there: files
    a user added after the first check make the replacement fail (the old
    directory is put back) instead of being deleted.
    """
    _check_replaceable(target, check_ours, target)
    aside = _temp_name(target, "old")
    try:
        os.rename(target, aside)  # aside is a fresh name: nothing is replaced
    except FileNotFoundError:  # removed meanwhile: a plain claim
        _claim(tmp, target)
        return
    try:
        _check_replaceable(aside, check_ours, target)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(aside, target)
        raise
    try:
        _claim(tmp, target)
    except BaseException:
        try:
            rename_noreplace(aside, target)  # the previous output back in its place
        except OSError:
            abandon(aside)  # the target was taken meanwhile: old output of ours, replaced anyway
        raise
    abandon(aside)
