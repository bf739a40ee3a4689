"""No silent stretch: a command's output never pauses for long (ir_jax.progress.Heartbeat).

What is checked against what:
  heartbeat   lines written by a quiet block vs the intervals the heartbeat was given
              (real time, sub-second intervals), the block's label in them, a pending
              progress bar ended first, silence outside a command
  tiny run    `python -m ir_jax.train` on configs/tiny.py (every default stage: the
              closed-form fits, SGD steps, calibration, held-out evaluation, summary
              picture) and its rerun once finished: each output line is timestamped as it
              arrives through a pipe, and the longest gap between lines must stay under
              MAX_GAP_S

Why MAX_GAP_S = 10 s: that is the promise (no silent stretch over 10 s). While a
command runs, the heartbeat speaks after 8 s of quiet (checked every 0.5 s), so a gap
is at most about 8.5 s; the remaining 1.5 s is room for a busy machine's scheduling.
The stretch before the first line is bounded apart (STARTUP_S): Python imports the
`ir_jax` package, which imports JAX, before the command's own code (and its
heartbeat) can run.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import train_argv

from ir_jax import progress as pg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_GAP_S = 10.0
STARTUP_S = 30.0


class Out(io.StringIO):
  def isatty(self) -> bool:
    return False


def _beat(monkeypatch, every: float) -> tuple[Out, pg.Heartbeat]:
  out = Out()
  monkeypatch.setattr(sys, "stdout", out)
  return out, pg.Heartbeat(every=every, poll=0.02)


def test_a_quiet_block_gets_lines_that_name_it(monkeypatch):
  out, beat = _beat(monkeypatch, every=0.2)
  with beat:
    t0 = time.time()
    with pg.doing("solving the ridge regressions"):
      time.sleep(0.75)
    quiet = time.time() - t0
  lines = out.getvalue().splitlines()
  # one line per 0.2 s of quiet, none sooner: 3 in 0.75 s (fewer if the thread was late)
  assert 1 <= len(lines) <= int(quiet / 0.2), (quiet, lines)
  assert all(
    re.fullmatch(r"  \.\.\. solving the ridge regressions \(\d+s so far\)", l) for l in lines
  )
  assert sys.stdout is out  # restored


def test_output_keeps_the_heartbeat_quiet(monkeypatch):
  out, beat = _beat(monkeypatch, every=0.3)
  with beat:
    for i in range(8):
      print(f"step {i}")
      time.sleep(0.1)
  assert out.getvalue().splitlines() == [f"step {i}" for i in range(8)]


def test_an_unnamed_stretch_says_how_long_it_has_been_quiet(monkeypatch):
  out, beat = _beat(monkeypatch, every=0.2)
  with beat:
    time.sleep(0.3)
  assert re.fullmatch(r"  \.\.\. working \(\d+s since the last line\)\n", out.getvalue())


def test_a_progress_bar_line_is_ended_before_a_heartbeat_line(monkeypatch):
  out, beat = _beat(monkeypatch, every=0.2)
  with beat:
    sys.stdout.write("\rfit [###.....] 3/8")
    time.sleep(0.3)
  assert out.getvalue().startswith("\rfit [###.....] 3/8\n  ... working (")


def test_counters_report_under_a_command_and_are_silent_in_library_use(monkeypatch):
  out, beat = _beat(monkeypatch, every=60.0)
  quiet = pg.counter("solves", 4, unit="units")
  for i in range(1, 5):
    quiet(i)
  assert out.getvalue() == ""
  with beat:
    loud = pg.counter("solves", 4, unit="units")
    for i in range(1, 5):
      loud(i)
  assert re.fullmatch(r"solves 4/4 \(100%\) .* units/s, 0s elapsed, done\n", out.getvalue())


def _timed_lines(cmd: list[str], timeout: float) -> tuple[int, list[tuple[float, str]]]:
  """Runs `cmd` with stdout and stderr on one pipe; each line with its arrival time
  (seconds since the start)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONUNBUFFERED", None)  # a plain pipe, as a log sees it
  env.pop("XLA_FLAGS", None)  # one CPU device, as the README's commands run
  t0 = time.time()
  proc = subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  lines = []
  for line in proc.stdout:
    lines.append((time.time() - t0, line.rstrip("\n")))
    assert time.time() - t0 < timeout, "the run took too long:\n" + "\n".join(l for _, l in lines)
  proc.wait()
  lines.append((time.time() - t0, "<exit>"))
  return proc.returncode, lines


def _longest_gap(lines: list[tuple[float, str]]) -> tuple[float, str]:
  """The longest wait between consecutive lines (after the first) and the line it ended."""
  gaps = [(b[0] - a[0], b[1]) for a, b in zip(lines, lines[1:])]
  return max(gaps)


@pytest.mark.slow
def test_no_silent_stretch_in_a_tiny_training_run_and_its_rerun(tmp_path):
  cmd = train_argv(
    str(tmp_path / "run"),
    f"data.data_dir={tmp_path / 'tfds'}",
    "train.forecaster.steps=2",
    "train.router.steps=2",
    "train.log_every=1",
    "train.checkpoint_every=2",
  )
  for what in ("run", "rerun of the finished run"):
    rc, lines = _timed_lines(cmd, timeout=900)
    text = "\n".join(f"{t:7.1f}s  {l}" for t, l in lines)
    assert rc == 0, text
    assert lines[-2][1].startswith("held-out perplexity"), text
    assert lines[0][0] < STARTUP_S, f"{what}: first line after {lines[0][0]:.1f}s\n{text}"
    gap, after = _longest_gap(lines)
    assert gap < MAX_GAP_S, f"{what}: {gap:.1f}s of silence before {after!r}\n{text}"
