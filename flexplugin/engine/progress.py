"""Progress lines with elapsed time and ETA, flushed so Scipion's run log shows them live."""
from __future__ import annotations

import sys
import time


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


class Progress:
    """Call `step(done, extra)` after each unit of work; prints at most every `every` seconds (and at the end).

    `stream` is a text stream (default stdout) or a callable taking the line."""

    def __init__(self, total: int, label: str, every: float = 5.0, stream=None):
        self.total, self.label, self.every = max(1, total), label, every
        if stream is not None and callable(stream) and not hasattr(stream, "write"):
            self.emit = stream
        else:
            out = stream or sys.stdout
            self.emit = lambda line: print(line, file=out, flush=True)
        self.t0 = time.monotonic()
        self._last = -1e9

    def step(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.monotonic()
        if not force and done < self.total and now - self._last < self.every:
            return
        self._last = now
        el = now - self.t0
        eta = el / done * (self.total - done) if done else float("nan")
        eta_s = _fmt(eta) if done else "?"
        msg = f"{self.label}: {done}/{self.total} ({100 * done / self.total:.0f}%) elapsed {_fmt(el)} ETA {eta_s}"
        self.emit(msg + (f" | {extra}" if extra else ""))
