"""Progress on the console: a tqdm bar on a terminal, plain periodic lines in batch logs.

tqdm redraws its bar with carriage returns; in a SLURM or sweep log (not a terminal) every redraw
becomes part of one ever-growing line. Off a terminal :func:`progress` therefore returns a
:class:`PlainProgress` that prints an ordinary line at most every ``every`` seconds (and one at the
end). Both offer the part of tqdm's API that bavq uses: ``update``, ``set_postfix``, a settable
``total``, ``close`` and ``with``. Used by the trainer, ``bavq-prep``, ``bavq-eval`` and ``bavq-sweep``.
"""

from __future__ import annotations

import os
import sys
import time

PLAIN_EVERY_S = float(os.environ.get("BAVQ_PROGRESS_EVERY", 30))  # seconds between plain lines


def interactive(stream=None) -> bool:
    """True when ``stream`` (default stderr) is a terminal, where a redrawn bar is readable."""
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    """1 h 02 min / 3 min 05 s / 42 s."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h} h {m:02d} min"
    return f"{m} min {s:02d} s" if m else f"{s} s"


class PlainProgress:
    """Plain-line progress for logs: ``desc: 120/300 step (40%), 2.1 step/s, 1 min 25 s left, k=v``."""

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
                 every: float | None = None, file=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = PLAIN_EVERY_S if every is None else every
        self.file = file
        self.postfix: dict = {}
        self._start_n, self._start = initial, time.monotonic()
        self._last = self._start
        self._printed_n = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._print(now)

    def set_postfix(self, refresh: bool = True, **kwargs) -> None:
        self.postfix = {k: v for k, v in kwargs.items()}

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.3g} {self.unit}/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", {format_duration((self.total - self.n) / rate)} left"
        if self.postfix:
            text += ", " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.file or sys.stderr, flush=True)
        self._last, self._printed_n = now, self.n

    def close(self) -> None:
        if self.n != self._printed_n:
            self._print(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0,
             enabled: bool = True, every: float | None = None, file=None, **tqdm_kwargs):
    """A tqdm bar on a terminal, a :class:`PlainProgress` elsewhere, a silent tqdm when not ``enabled``
    (e.g. on ranks other than the main one). ``tqdm_kwargs`` (mininterval, unit_scale, ...) only
    reach tqdm."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if not interactive(file):
        return PlainProgress(total, desc, unit, initial, every, file)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file, dynamic_ncols=True, **tqdm_kwargs)


def track(iterable, total: int | None = None, **kwargs):
    """Iterate ``iterable`` with :func:`progress` (total from ``len`` when it has one)."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    with progress(total=total, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update(1)
