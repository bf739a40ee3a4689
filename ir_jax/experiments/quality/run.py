"""Running the quality table's steps: each a subprocess, resumable, stoppable; then the report.

`run_all` runs every step of the plan (`ir_jax.experiments.quality.plan.steps`) not yet
complete, in order, each as a subprocess logging to RUNS/logs/<step>.log, and writes the
report; `check_plan` keeps RUNS/plan.json and refuses a rerun with other budgets. A stop
(Ctrl-C, SIGTERM) reaches the running step as SIGTERM, so ir_jax.train saves a checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import signal
import subprocess
import time
from typing import Any

from ir_jax.experiments.quality.common import PLAN_FORMAT, PROG, REPO, git_info, read_json, rel
from ir_jax.experiments.quality.options import FIXED, Options
from ir_jax.experiments.quality.plan import estimate, hms, show, steps
from ir_jax.experiments.quality.report import collect, write_report
from ir_jax.files import write_json


class StepRunner:
  """Runs steps as subprocesses; a stop (Ctrl-C, SIGTERM) reaches the child as SIGTERM, so
  ir_jax.train saves a checkpoint before exiting."""

  def __init__(self) -> None:
    self.child: subprocess.Popen | None = None
    self.stopping = False

  def _on_term(self, signum: int, frame: Any) -> None:
    self.stopping = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)

  def run(self, argv: list[str], log_path: str) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')}  {show(argv)}\n")
      log.flush()
      # The child ignores SIGINT (kept across exec): Ctrl-C stops it through _on_term.
      self.child = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
      )
      try:
        while True:
          try:
            return self.child.wait()
          except KeyboardInterrupt:
            self._on_term(signal.SIGINT, None)
      finally:
        if self.child.poll() is None:  # wait for the checkpoint, then give up on it
          try:
            self.child.wait(timeout=300)
          except subprocess.TimeoutExpired:
            self.child.kill()
        self.child = None


def _tail(path: str, n: int = 15) -> str:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return "".join(f.readlines()[-n:])
  except OSError:
    return ""


def check_plan(opts: Options, plan_path: str, command: str) -> dict[str, Any]:
  """RUNS/plan.json for this run: refuses other budgets than the run was started with."""
  mine = {k: getattr(opts, k) for k in FIXED}
  old = read_json(plan_path)
  if isinstance(old, dict) and old.get("format") == PLAN_FORMAT:
    diff = [
      f"{k} {old['fixed'].get(k)!r} vs {v!r}" for k, v in mine.items() if old["fixed"].get(k) != v
    ]
    if diff:
      raise SystemExit(
        f"{PROG}: error: {rel(opts.runs)} was started with other options "
        f"({'; '.join(diff)}); rerun with those or choose another --runs"
      )
    invocations = old.get("invocations", [])
  else:
    invocations = []
  invocations.append(
    {
      "time": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": command,
      "git": git_info(),
    }
  )
  plan = {
    "format": PLAN_FORMAT,
    "fixed": mine,
    "options": dataclasses.asdict(opts),
    "invocations": invocations,
  }
  write_json(plan_path, plan)
  return plan


def run_all(opts: Options, command: str) -> int:
  """Every step not yet complete, in order, then the report; 130 when stopped, 1 on failure."""
  todo = steps(opts)
  os.makedirs(os.path.join(opts.runs, "logs"), exist_ok=True)
  check_plan(opts, os.path.join(opts.runs, "plan.json"), command)
  est = estimate(opts)
  print(
    f"{PROG}: {len(todo)} steps into {rel(opts.runs)}"
    + ("" if opts.smoke else f"; expected about {hms(est['total'])} on a 2-core CPU from scratch")
    + f"; logs in {rel(os.path.join(opts.runs, 'logs'))}/",
    flush=True,
  )
  runner = StepRunner()
  old_term = signal.signal(signal.SIGTERM, runner._on_term)
  t0 = time.time()
  width = len(str(len(todo)))
  try:
    for i, st in enumerate(todo, 1):
      if runner.stopping:
        print(f"{PROG}: stopped on request; rerun the same command to resume", flush=True)
        return 130
      head = f"[{i:{width}d}/{len(todo)}] {st.name}"
      if st.done():
        print(f"{head}: complete, skipped (elapsed {hms(time.time() - t0)})", flush=True)
        continue
      log_path = os.path.join(opts.runs, "logs", f"{st.name}.log")
      print(f"{head} ...", end="", flush=True)
      t1 = time.time()
      rc = runner.run(st.argv, log_path)
      dt = time.time() - t1
      finished = rc == 0 and st.done()
      if runner.stopping:
        print(
          f" {'done in' if finished else 'stopped after'} {hms(dt)} (exit {rc}); stopped "
          "on request: rerun the same command to resume",
          flush=True,
        )
        return 130
      if not finished:
        why = f"exit {rc}" if rc else "finished without complete output"
        print(
          f" FAILED ({why}) after {hms(dt)}; log {rel(log_path)}, last lines:\n{_tail(log_path)}",
          flush=True,
        )
        return 1
      print(f" done in {hms(dt)} (elapsed {hms(time.time() - t0)})", flush=True)
  except KeyboardInterrupt:  # between steps: nothing is running
    print(f"\n{PROG}: stopped on request; rerun the same command to resume", flush=True)
    return 130
  finally:
    signal.signal(signal.SIGTERM, old_term)
  results = collect(opts.runs)
  path = os.path.join(opts.docs, "results.json")
  write_json(path, keep_flops_records(path, results))
  written = write_report(path, opts.docs)
  print(
    f"{PROG}: all steps complete in {hms(time.time() - t0)}; wrote "
    + ", ".join(rel(p) for p in [path, *written]),
    flush=True,
  )
  return 0


def keep_flops_records(path: str, results: dict[str, Any]) -> dict[str, Any]:
  """results.json's compute-matched rows belong to launch/budget_table.py: keep them."""
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if isinstance(old, dict) and "flops_records" in old:
      results = {**results, "flops_records": old["flops_records"]}
  return results
