"""Plain-line progress with an ETA for long passes (log-friendly: no escape codes)."""

from __future__ import annotations

import time


class Progress:
  """`Progress("fit", total)(done)` prints `fit 3/12 (25%) 9s elapsed, ETA 27s` at most every
  `every` seconds and always at the end."""

  def __init__(self, label: str, total: int, every: float = 5.0, printer=print) -> None:
    self.label, self.total, self.every, self.printer = label, max(int(total), 1), every, printer
    self.t0 = self.last = time.time()

  def __call__(self, done: int, total: int | None = None) -> None:
    total = self.total if total is None else max(int(total), 1)
    now = time.time()
    if done < total and now - self.last < self.every:
      return
    self.last = now
    el = now - self.t0
    eta = el / max(done, 1) * (total - done)
    tail = "done" if done >= total else f"ETA {eta:.0f}s"
    self.printer(f"{self.label} {done}/{total} ({100 * done / total:.0f}%) {el:.0f}s elapsed, {tail}")
