"""Progress with rate and ETA for long passes, and a heartbeat for the ones that cannot count.

`Progress`: on a terminal one line redraws in place (a bar); otherwise (logs,
pipes, a custom printer) plain lines at most every `every` seconds, never escape
codes. `Heartbeat`: while a command runs, a `  ... WHAT (Ns so far)` line whenever
its output has been quiet for 8 seconds (a compile, a solve, a restore), WHAT
named by the innermost `doing(...)` block; `counter(...)` is a `Progress` under a
heartbeat and silent in library use.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator

BAR_WIDTH = 24


def _on_terminal() -> bool:
  try:
    return sys.stdout.isatty()
  except (AttributeError, ValueError):  # replaced or closed stdout
    return False


def _print(text: str) -> None:
  print(text, flush=True)  # a log read through a pipe sees each line when it is made


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
    self.printer = printer or _print
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


# ------------------------------------------------------------ no silent minute
class _Watched:
  """sys.stdout as the heartbeat sees it: every write stamps the time of the last output."""

  def __init__(self, inner, beat: "Heartbeat") -> None:
    self._inner, self._beat = inner, beat

  def write(self, text: str) -> int:
    with self._beat.lock:
      n = self._inner.write(text)
      if text:
        if "\n" in text:  # line-buffered: a log read through a pipe sees each line at once
          self._inner.flush()
        self._beat.last = time.time()
        self._beat.open_line = not text.endswith("\n")
    return n

  def flush(self) -> None:
    self._inner.flush()

  def __getattr__(self, name: str):  # isatty, fileno, encoding, ...
    return getattr(self._inner, name)


_ACTIVE: list["Heartbeat"] = []


class Heartbeat:
  """While active, a line `  ... WHAT (Ns so far)` whenever stdout has been quiet for
  `every` seconds: a compile, a solve or a restore that cannot count its work still
  shows it is alive, so no stretch of a command's output is silent for long.

  WHAT is the innermost `doing(...)` label (default "working"). Command-line entry
  points turn it on (`with Heartbeat():`); library calls never print on their own.
  While one is active, `counter(...)` gives a `Progress` (otherwise a no-op), so a
  library loop reports progress only under a command.
  """

  def __init__(self, every: float = 8.0, poll: float = 0.5) -> None:
    self.every, self.poll = every, poll
    # Reentrant: a signal handler that prints (train.loop's SIGTERM notice) runs in the
    # main thread, possibly while that thread is inside a write holding this lock.
    self.lock = threading.RLock()
    self.last = time.time()
    self.open_line = False  # a progress bar is being redrawn on the current line
    self.labels: list[tuple[str, float]] = []
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._saved = None

  def start(self) -> "Heartbeat":
    self._saved = sys.stdout
    sys.stdout = _Watched(self._saved, self)
    self.last = time.time()
    self._thread = threading.Thread(target=self._run, name="ir_jax-heartbeat", daemon=True)
    self._thread.start()
    _ACTIVE.append(self)
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self in _ACTIVE:
      _ACTIVE.remove(self)
    if self._saved is not None and isinstance(sys.stdout, _Watched) and sys.stdout._beat is self:
      sys.stdout = self._saved
    self._saved = None

  def __enter__(self) -> "Heartbeat":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def line(self, now: float) -> str:
    if self.labels:
      what, since = self.labels[-1]
      return f"  ... {what} ({now - since:.0f}s so far)"
    return f"  ... working ({now - self.last:.0f}s since the last line)"

  def _run(self) -> None:
    while not self._stop.wait(self.poll):
      now = time.time()
      with self.lock:
        if now - self.last < self.every or self._saved is None:
          continue
        text = ("\n" if self.open_line else "") + self.line(now) + "\n"
        try:
          self._saved.write(text)
          self._saved.flush()
        except (OSError, ValueError):  # stdout closed under us: nothing left to tell
          return
        self.last, self.open_line = now, False


def log(msg: str) -> None:
  """Prints `msg` on process 0 only, so a multi-host run logs each line once."""
  import jax  # only where a run logs: progress lines themselves need no JAX

  if jax.process_index() == 0:
    print(msg, flush=True)


def active() -> Heartbeat | None:
  """The innermost active heartbeat of this process, if any."""
  return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def doing(label: str) -> Iterator[None]:
  """Names what runs inside the block (e.g. "compiling the router step") for the
  heartbeat's `  ... WHAT (Ns so far)` lines; prints nothing itself."""
  beat = active()
  if beat is None:
    yield
    return
  entry = (label, time.time())
  beat.labels.append(entry)
  try:
    yield
  finally:
    if entry in beat.labels:
      beat.labels.remove(entry)


def _quiet(done: int, total: int | None = None, note: str = "") -> None:
  return None


def counter(label: str, total: int, unit: str = "") -> Callable[..., None]:
  """A `Progress(label, total, unit=unit)` while a heartbeat is active (a command is
  running); otherwise a callable that says nothing, for library use."""
  if active() is None:
    return _quiet
  return Progress(label, total, unit=unit)
