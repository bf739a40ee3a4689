"""Progress with rate and ETA for long passes.

On a terminal one line redraws in place (a bar); otherwise (logs, pipes, a
custom printer) plain lines at most every `every` seconds, never escape codes.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

BAR_WIDTH = 24


def _on_terminal() -> bool:
  try:
    return sys.stdout.isatty()
  except (AttributeError, ValueError):  # replaced or closed stdout
    return False


class Progress:
  """`Progress("fit", total)(done)` reports `fit 3/12 (25%) 0.9 batches/s, 3s elapsed, ETA 9s`
  at most every `every` seconds and always at the end."""

  def __init__(
    self,
    label: str,
    total: int,
    every: float = 5.0,
    printer: Callable[[str], None] | None = None,
    unit: str = "",
  ) -> None:
    self.label, self.total, self.every, self.unit = label, max(int(total), 1), every, unit
    self.bar = printer is None and _on_terminal()
    self.printer = printer or print
    self.t0 = time.time()
    self.last = self.t0 - (every if self.bar else 0.0)

  def line(self, done: int, total: int, elapsed: float, note: str = "") -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    unit = f" {self.unit}/s" if self.unit else "/s"
    tail = "done" if done >= total else f"ETA {elapsed / max(done, 1) * (total - done):.0f}s"
    head = self.label
    if self.bar:
      filled = int(BAR_WIDTH * min(done, total) / total)
      head = f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"
    note = f", {note}" if note else ""
    return (
      f"{head} {done}/{total} ({100 * done / total:.0f}%) {rate:.3g}{unit}{note}, "
      f"{elapsed:.0f}s elapsed, {tail}"
    )

  def __call__(self, done: int, total: int | None = None, note: str = "") -> None:
    """Reports `done` of `total` (default: the constructor's), with `note` (e.g. counts
    the rate does not show) after the rate."""
    total = self.total if total is None else max(int(total), 1)
    now = time.time()
    finished = done >= total
    if not finished and now - self.last < (0.5 if self.bar else self.every):
      return
    self.last = now
    text = self.line(done, total, now - self.t0, note)
    if self.bar:  # redraw in place; the finished line stays
      sys.stdout.write("\r" + text + ("\n" if finished else ""))
      sys.stdout.flush()
    else:
      self.printer(text)
