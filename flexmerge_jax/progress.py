"""Progress on stderr for long work: plan, cut, merge, export, sweep, tune.

Every function with a ``progress`` argument takes ``True`` (always report:
a bar on a terminal, else one line every :attr:`Progress.interval`
seconds and one when done, for logs), ``False`` (silent) or ``None`` (the
:data:`DEFAULT`, which the ``flexmerge`` command sets: ``True``, or
``False`` with ``--quiet``; in Python it is ``None``: a bar on a terminal
only).

Plans report the parameters read (a pass over the model may be followed by
another: TIES thresholds, then the schedule), cuts and merges the blocks
written, exports the tasks, sweeps and tuning the models evaluated.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

from .sources._source import Source

__all__ = ["Progress", "DEFAULT", "counting"]

#: ``progress=None`` means this: ``None`` (a bar on a terminal only),
#: ``True`` or ``False``.
DEFAULT: bool | None = None


class Progress:
    """A dependency-free progress report on stderr.

    Args:
      total: units of work (at least 1).
      label: what is being done (``"plan"``, ``"cut"``, ...).
      enabled: ``True``, ``False`` or ``None`` (see the module docstring).
      unit: shown after the counts in line mode (``"blocks"``, ``"tasks"``).

    Thread-safe: :meth:`update` may be called from reading threads.
    """

    #: Seconds between two lines when stderr is not a terminal.
    interval = 10.0

    def __init__(self, total: int, label: str = "", enabled: bool | None = None, unit: str = ""):
        self.total, self.done, self.label, self.unit = max(int(total), 1), 0, label, unit
        if enabled is None:
            enabled = DEFAULT
        self.tty = sys.stderr.isatty()
        self.enabled = self.tty if enabled is None else bool(enabled)
        self.t0 = self._last = time.time()
        self._lock = threading.Lock()
        self._note = ""

    def update(self, k: int = 1, note: str = "") -> None:
        """Marks ``k`` more units done (``note``: a short description)."""
        with self._lock:
            self.done += k
            self._note = note or self._note
            if not self.enabled:
                return
            now = time.time()
            if self.tty:
                self._bar(now)
            elif now - self._last >= self.interval:
                self._last = now
                self._line(now)

    def _fraction(self) -> float:
        return min(self.done / self.total, 1.0)

    def _bar(self, now: float) -> None:
        frac = self._fraction()
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        el = now - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {el:5.0f}s "
                         f"eta {eta:4.0f}s {self._note[:30]:30s}")
        sys.stderr.flush()

    def _line(self, now: float) -> None:
        unit = f" {self.unit}" if self.unit else ""
        note = f" ({self._note})" if self._note else ""
        sys.stderr.write(f"flexmerge: {self.label}: {self.done}/{self.total}{unit}, "
                         f"{100 * self._fraction():.0f}%, {now - self.t0:.0f}s{note}\n")
        sys.stderr.flush()

    def close(self) -> None:
        """Ends the report (a newline after a bar; a last line otherwise)."""
        if not self.enabled:
            return
        with self._lock:
            if self.tty:
                sys.stderr.write("\n")
                sys.stderr.flush()
            else:
                self._line(time.time())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Counting(Source):
    """``source``, reporting the fine-tuned parameters read to a :class:`Progress`
    (in units of one parameter entry of every task; a pass over the model is
    one total, the count wraps around for the next)."""

    def __init__(self, source: Source, bar: Progress):
        self._src, self._bar = source, bar
        self.layout, self.task_names = source.layout, source.task_names
        for k, v in vars(Source).items():  # the flags (host_capable, prefetch, ...) of source
            if not k.startswith("_") and not callable(v) and not isinstance(v, property):
                setattr(self, k, getattr(source, k))
        self._numel = dict(zip(source.layout.names, source.layout.sizes))
        self._passes = 1

    def _count(self, names: Sequence[str]) -> None:
        k = sum(self._numel.get(n, 0) for n in names)
        bar = self._bar
        with bar._lock:
            if bar.done + k > bar.total:  # another pass over the parameters
                bar.done, self._passes = 0, self._passes + 1
        bar.update(k, f"pass {self._passes}")

    def base(self, names):
        return self._src.base(names)

    def finetuned(self, names):
        self._count(names)
        return self._src.finetuned(names)

    def finetuned_tasks(self, names, tasks):
        self._count(names)
        return self._src.finetuned_tasks(names, tasks)

    def task_vectors(self, names, threshold=None):
        self._count(names)
        return self._src.task_vectors(names, threshold)

    def inputs(self, names, tasks, threshold=None, task_vectors: bool = True, out=None):
        self._count(names)
        return self._src.inputs(names, tasks, threshold, task_vectors, out)



def _delegate(name: str):
    def method(self, *args, **kwargs):
        return getattr(self._src, name)(*args, **kwargs)

    method.__name__ = method.__qualname__ = name
    return method


# Every other Source method (describe, changed, sample_runs, region reads,
# and any added later) is the wrapped source's own.
for _name, _value in vars(Source).items():
    if callable(_value) and not _name.startswith("_") and _name not in vars(_Counting):
        setattr(_Counting, _name, _delegate(_name))


def counting(source: Source, label: str, enabled: bool | None) -> tuple[Source, Progress]:
    """``(source, bar)``: ``source`` wrapped to report the parameters read
    to ``bar`` when progress is shown (else as it is)."""
    bar = Progress(source.layout.total, label, enabled, unit="parameters")
    return (_Counting(source, bar) if bar.enabled else source), bar
