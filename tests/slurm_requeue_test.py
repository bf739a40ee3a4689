"""launch/slurm_gpu.sbatch at the time limit: run for real (not a dry run) with stand-ins
for srun and scontrol on PATH, the batch shell gets SIGUSR1 as SLURM's --signal=B:USR1@300
sends it; srun must get SIGTERM (which it forwards to the tasks), and only after srun has
returned is the job requeued (scontrol requeue <job id>); the batch script then exits 0.
Without the signal, srun's status is the script's and nothing is requeued.

What is checked against what: the stand-ins record what they were asked, in order, into a
file; the expected order and arguments are the ones SLURM's documentation gives for a
requeue on time limit (signal to the batch shell, scontrol requeue of the job id).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from launchers_test import BASH, SLURM

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$EVENTS"
trap 'echo "srun got TERM" >> "$EVENTS"; sleep 0.3; echo "srun exits 143" >> "$EVENTS"; exit 143' TERM
if [ -n "$SRUN_STATUS" ]; then exit "$SRUN_STATUS"; fi
touch "$EVENTS.ready"
while true; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = show ]; then echo node01; exit 0; fi
echo "scontrol $*" >> "$EVENTS"
"""


def _setup(tmp_path):
  bin_dir = tmp_path / "fakebin"
  bin_dir.mkdir()
  for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  events = tmp_path / "events"
  env = {
    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    "HOME": str(tmp_path),
    "EVENTS": str(events),
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_SUBMIT_DIR": str(tmp_path),
  }
  return env, events


def test_time_limit_signal_stops_the_tasks_then_requeues(tmp_path):
  env, events = _setup(tmp_path)
  job = subprocess.Popen(
    [BASH, SLURM, "--config", "configs/llama7b.py", "--workdir", "/shared/runs/7b"],
    env=env,
    cwd=str(tmp_path),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    end = time.time() + 30
    while not os.path.exists(f"{events}.ready"):
      assert time.time() < end and job.poll() is None, "srun did not start"
      time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=30)
  finally:
    if job.poll() is None:  # a failure above: the stand-in srun must not outlive the test
      job.send_signal(signal.SIGUSR1)
      job.wait(timeout=30)
  assert job.returncode == 0, out
  lines = events.read_text().splitlines()
  assert lines[0].startswith("srun --kill-on-bad-exit=1 bash -c ")
  assert lines[1:] == ["srun got TERM", "srun exits 143", "scontrol requeue 4242"], lines
  assert "tasks stopped with status 143; scontrol requeue 4242" in out


def test_without_the_signal_the_status_is_srun_s(tmp_path):
  env, events = _setup(tmp_path)
  for status in ("0", "3"):
    events.unlink(missing_ok=True)
    done = subprocess.run(
      [BASH, SLURM, "--config", "c", "--workdir", "w"],
      env={**env, "SRUN_STATUS": status},
      cwd=str(tmp_path),
      capture_output=True,
      text=True,
      timeout=30,
      check=False,
    )
    assert done.returncode == int(status), done.stdout + done.stderr
    assert not any("requeue" in l for l in events.read_text().splitlines())


def test_dry_run_names_the_requeue(tmp_path):
  env, _ = _setup(tmp_path)
  out = subprocess.run(
    [BASH, SLURM, "--dry-run", "--config", "c", "--workdir", "w"],
    env=env,
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    timeout=30,
    check=True,
  )
  assert "+ scontrol requeue 4242" in out.stdout and "on SIGUSR1" in out.stdout
  with open(SLURM, encoding="utf-8") as f:
    header = [l.strip() for l in f if l.startswith("#SBATCH")]
  assert {"#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append"} <= set(
    header
  )
