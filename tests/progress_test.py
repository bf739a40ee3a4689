"""ir_jax.progress: hand-worked lines (rate, ETA), plain lines off a terminal, a bar on one."""

from __future__ import annotations

import io

from ir_jax import progress as pg


class Clock:
  def __init__(self, t: float) -> None:
    self.t = t

  def __call__(self) -> float:
    return self.t


def test_plain_lines_at_most_every_interval_and_always_at_the_end(monkeypatch):
  clock = Clock(100.0)
  monkeypatch.setattr(pg.time, "time", clock)
  lines: list[str] = []
  p = pg.Progress("fit", 12, every=5.0, printer=lines.append, unit="batches")
  clock.t = 103.0
  p(1)  # 3 s < 5 s: quiet
  clock.t = 106.0
  p(3)  # 3 batches in 6 s: 0.5/s; 9 left at 2 s each: ETA 18 s
  clock.t = 107.0
  p(4)  # 1 s after the last line: quiet
  clock.t = 124.0
  p(12)
  assert lines == [
    "fit 3/12 (25%) 0.5 batches/s, 6s elapsed, ETA 18s",
    "fit 12/12 (100%) 0.5 batches/s, 24s elapsed, done",
  ]


class Tty(io.StringIO):
  def isatty(self) -> bool:
    return True


def test_a_terminal_gets_one_line_redrawn_in_place(monkeypatch):
  clock = Clock(0.0)
  monkeypatch.setattr(pg.time, "time", clock)
  out = Tty()
  monkeypatch.setattr(pg.sys, "stdout", out)
  p = pg.Progress("eval", 4)
  for i in range(1, 5):
    clock.t = float(i)
    p(i)
  text = out.getvalue()
  assert text.count("\r") == 4 and text.endswith("done\n") and text.count("\n") == 1
  assert f"eval [{'#' * 12}{'.' * 12}] 2/4 (50%) 1/s, 2s elapsed, ETA 2s" in text


def test_no_escape_codes_when_stdout_is_not_a_terminal(monkeypatch, capsys):
  clock = Clock(0.0)
  monkeypatch.setattr(pg.time, "time", clock)
  p = pg.Progress("eval", 2, every=0.0)
  clock.t = 1.0
  p(1)
  clock.t = 2.0
  p(2)
  out = capsys.readouterr().out
  assert "\r" not in out and "\x1b" not in out
  assert out.splitlines() == [
    "eval 1/2 (50%) 1/s, 1s elapsed, ETA 1s",
    "eval 2/2 (100%) 1/s, 2s elapsed, done",
  ]


def test_a_signal_handler_may_print_while_a_write_holds_the_lock():
  # A SIGTERM handler that prints (ir_jax.train.loop) runs in the main thread between
  # bytecodes, possibly inside a watched write that holds the heartbeat's lock: its own
  # write must get the lock again (it deadlocked the training run with a plain Lock).
  beat = pg.Heartbeat()
  out = io.StringIO()
  watched = pg._Watched(out, beat)
  assert beat.lock.acquire(timeout=2)  # the interrupted write
  try:
    assert beat.lock.acquire(timeout=2), "a handler that prints would deadlock here"
    beat.lock.release()
    watched.write("ir_jax.train: SIGTERM received\n")
  finally:
    beat.lock.release()
  assert out.getvalue() == "ir_jax.train: SIGTERM received\n"
