"""The restore step of a multi-process job is decided once: two local processes (gloo on
CPU, launch/local_multiprocess.py) call ir_jax.train.checkpoints.restore_whole on views
that disagree, and both must come back with the same step.

What is checked against what: each case's expected step is worked out by hand from the
rule (process 0's step list; process 0's integrity verdict; a step counts when every
process restored it); a process deciding alone would pick another step in every case
(named in each case's comment), so the test fails without the agreement.
"""

from __future__ import annotations

import io
import json
import os

import pytest
from conftest import load_launcher

from ir_jax.train import integrity

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--root")
p.add_argument("--coordinator")
p.add_argument("--num_processes", type=int)
p.add_argument("--process_id", type=int)
a = p.parse_args()
from ir_jax.distributed import maybe_initialize
maybe_initialize(a.coordinator, a.num_processes, a.process_id)
import jax
from ir_jax import checkpoint as model_ckpt
from ir_jax.train import checkpoints

me = jax.process_index()


class Manager:  # what restore_whole reads of an orbax CheckpointManager
  def __init__(self, steps):
    self.steps = steps

  def all_steps(self):
    return list(self.steps)


def run(case, steps, directory, fail_on=(), quarantine=False):
  def restore(step):
    if step in fail_on:
      raise OSError(f"cannot read step {step} here")
    return {"step": step, "process": me}

  try:
    found = checkpoints.restore_whole(Manager(steps), directory, restore, quarantine=quarantine)
    out = None if found is None else [found[0], found[1]["step"]]
  except model_ckpt.CheckpointError as e:
    out = "CheckpointError: " + str(e)
  print("RESULT " + json.dumps({"case": case, "process": me, "out": out}), flush=True)


shared = os.path.join(a.root, "shared")
# Process 1 lists a newer step 3 that process 0 does not (alone, it would restore 3).
run("lists", [1, 2] + ([3] if me == 1 else []), shared)
# Process 1 cannot read step 2 (alone, process 0 would restore 2).
run("host_fails", [1, 2], shared, fail_on=(2,) if me == 1 else ())
# Process 0's copy of step 2 disagrees with its record, process 1's does not (alone,
# process 1 would restore 2); process 0 moves its damaged step aside.
run("record", [1, 2], os.path.join(a.root, f"view{me}"), quarantine=True)
# No process can use any step on process 1: both refuse, neither restores.
run("none", [1, 2], shared, fail_on=(1, 2) if me == 1 else ())
run("empty", [], os.path.join(a.root, "empty"))
"""


def _launcher():
  return load_launcher("local_multiprocess")


def _stage(directory: str, steps: list[int]) -> None:
  """Committed-looking step directories with a file each, and their integrity records."""
  for step in steps:
    os.makedirs(os.path.join(directory, str(step), "adapters"))
    with open(os.path.join(directory, str(step), "adapters", "data"), "wb") as f:
      f.write(bytes([step]) * 64)
    assert integrity.write_record(directory, step)


def test_two_processes_restore_the_same_step(tmp_path, monkeypatch):
  root = tmp_path / "root"
  _stage(str(root / "shared"), [1, 2])
  _stage(str(root / "view0"), [1, 2])
  _stage(str(root / "view1"), [1, 2])
  with open(root / "view0" / "2" / "adapters" / "data", "r+b") as f:
    f.write(b"\xff")  # same size, other bytes: only the SHA-256 tells
  os.makedirs(root / "empty")
  probe_dir = tmp_path / "probe"
  probe_dir.mkdir()
  (probe_dir / "restore_probe.py").write_text(PROBE)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(probe_dir), REPO]))
  out = io.StringIO()
  status = _launcher().launch(
    [f"--root={root}"],
    num_processes=2,
    module="restore_probe",
    cwd=REPO,
    timeout=240,
    out=out,
  )
  log = out.getvalue()
  assert status == 0, log[-3000:]
  results: dict[str, dict[int, object]] = {}
  for line in log.splitlines():
    if " RESULT " in line:
      r = json.loads(line.split(" RESULT ", 1)[1])
      results.setdefault(r["case"], {})[r["process"]] = r["out"]

  assert results["lists"] == {0: [2, 2], 1: [2, 2]}
  assert results["host_fails"] == {0: [1, 1], 1: [1, 1]}
  assert "[p1] ir_jax.train: process 1 cannot restore checkpoint step 2" in log
  assert "[p0] checkpoint step 2 of " in log and "restoring it failed on process 1" in log
  assert results["record"] == {0: [1, 1], 1: [1, 1]}
  assert "file adapters/data has changed since it was written" in log
  # Process 0 moved its damaged copy aside; process 1's copy is not its to move.
  assert sorted(os.listdir(root / "view0")) == ["1"]
  assert len(os.listdir(integrity.damaged_dir(str(root / "view0")))) == 2  # step + record
  assert sorted(os.listdir(root / "view1")) == ["1", "2"]
  for p in (0, 1):
    msg = results["none"][p]
    assert msg.startswith("CheckpointError: every checkpoint in ") and (
      "step 2: restoring it failed on process 1" in msg
      and "step 1: restoring it failed on process 1" in msg
    ), msg
  assert sorted(os.listdir(root / "shared")) == ["1", "2"]  # nothing moved without quarantine
  assert results["empty"] == {0: None, 1: None}
