"""Damaged training checkpoints: refused with a clear message, never loaded silently.

What is checked against what:
  damage      the newest checkpoint of a finished forecaster run, damaged three ways
              (bytes flipped inside an array file, a truncated file, emptied
              orbax metadata), then the same command rerun:
              it must say which step is damaged and why, move it aside, resume
              from the previous whole step and end bit-identical to the
              undamaged run (adapters and optimizer state)
  no record   the same with the integrity records deleted (a checkpoint written
              before records existed): orbax's own read error must trigger the
              same fallback for a deleted file
  all bad     every step damaged: a CheckpointError naming each step, nothing moved
  records     every kept step has a record, and records of deleted steps are gone
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ir_jax.checkpoint import CheckpointError
from ir_jax.train import integrity, run, settings_from_config
from ir_jax.train.rundir import run_result

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEWS = os.path.join(REPO, "assets", "text", "news", "lee.cor")
STEPS = 8  # checkpoints at 3, 6 and 8 (every 3 and at the end)


def tiny_settings(data_dir: str, async_checkpoints: bool | None = None):
  """configs/tiny.py, forecaster only, 8 steps, checkpoints at 3, 6 and 8 (also used by
  tests/diskfull_test.py)."""
  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(REPO, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.data.files = (NEWS,)
  cfg.data.data_dir = data_dir
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
  cfg.train.stages = "forecaster"
  cfg.train.forecaster.steps = STEPS
  cfg.train.checkpoint_every = 3
  cfg.train.keep_checkpoints = 3
  cfg.train.eval_batches = 0
  cfg.train.log_every = 4
  if async_checkpoints is not None:
    cfg.train.async_checkpoints = async_checkpoints
  return settings_from_config(cfg)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  if not os.path.exists(NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  s = tiny_settings(data_dir)
  run(s, workdir)
  return s, workdir


def _stage(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints", "forecaster")


def _item(workdir: str, step: int, item: str) -> dict[str, np.ndarray]:
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(_stage(workdir), str(step), item))
  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _assert_same_final(a: str, b: str) -> None:
  for item in ("adapters", "opt_state"):
    x, y = _item(a, STEPS, item), _item(b, STEPS, item)
    assert x.keys() == y.keys() and x
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f"{item} {k}")


def _largest(step_dir: str, item: str) -> str:
  files = [
    p
    for p in glob.glob(os.path.join(step_dir, item, "**", "*"), recursive=True)
    if os.path.isfile(p)
  ]
  return max(files, key=os.path.getsize)


def flip_bytes(step_dir: str) -> None:
  path = _largest(step_dir, "adapters")
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])
    f.seek(0)
    f.write(data)


def truncate(step_dir: str) -> None:
  path = _largest(step_dir, "opt_state")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def delete_array_file(step_dir: str) -> None:
  os.remove(_largest(step_dir, "adapters"))


def empty_metadata(step_dir: str) -> None:
  open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w").close()


@pytest.mark.parametrize("damage", [flip_bytes, truncate, empty_metadata])
def test_damaged_newest_checkpoint_falls_back_and_finishes_bit_identical(
  reference, damage, tmp_path, capsys
):
  s, ref = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  damage(os.path.join(_stage(workdir), str(STEPS)))
  run(s, workdir)
  out = capsys.readouterr().out
  assert f"checkpoint step {STEPS} of {_stage(workdir)} is damaged" in out
  assert "using step 6" in out and "resumed from batch 6" in out
  moved = glob.glob(os.path.join(_stage(workdir) + ".damaged", f"{STEPS}-*"))
  assert sorted(os.path.isdir(p) for p in moved) == [False, True]  # the step + its record
  _assert_same_final(workdir, ref)
  assert integrity.check(_stage(workdir), STEPS) is None  # the new step 8 has a fresh record


def test_without_records_orbax_read_errors_still_fall_back(reference, tmp_path, capsys):
  s, ref = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  shutil.rmtree(integrity.record_dir(_stage(workdir)))
  delete_array_file(os.path.join(_stage(workdir), str(STEPS)))
  run(s, workdir)
  out = capsys.readouterr().out
  assert f"checkpoint step {STEPS} of {_stage(workdir)} is damaged (restoring it failed" in out
  _assert_same_final(workdir, ref)


def test_every_checkpoint_damaged_is_refused_and_nothing_moves(reference, tmp_path):
  s, ref = reference
  workdir = str(tmp_path / "run")
  shutil.copytree(ref, workdir)
  steps = sorted(int(n) for n in os.listdir(_stage(workdir)) if n.isdigit())
  assert steps == [3, 6, STEPS]
  for n in steps:
    flip_bytes(os.path.join(_stage(workdir), str(n)))
  with pytest.raises(
    CheckpointError,
    match=r"every checkpoint in .* is damaged \(step 8: .*"
    r"step 6: .*step 3: ",
  ):
    run(s, workdir)
  with pytest.raises(CheckpointError, match="is damaged"):
    run_result(workdir)
  assert sorted(int(n) for n in os.listdir(_stage(workdir)) if n.isdigit()) == steps
  assert not os.path.exists(_stage(workdir) + ".damaged")


def test_records_follow_the_kept_steps(reference):
  _, ref = reference
  kept = sorted(int(n) for n in os.listdir(_stage(ref)) if n.isdigit())
  recs = sorted(int(n[:-5]) for n in os.listdir(integrity.record_dir(_stage(ref))))
  assert recs == kept == [3, 6, STEPS]
  for n in kept:
    assert integrity.check(_stage(ref), n) is None


def test_run_result_reads_the_newest_whole_step_without_moving_anything(reference, tmp_path):
  _, ref = reference
  damaged, older = str(tmp_path / "damaged"), str(tmp_path / "older")
  shutil.copytree(ref, damaged)
  shutil.copytree(ref, older)
  flip_bytes(os.path.join(_stage(damaged), str(STEPS)))
  shutil.rmtree(os.path.join(_stage(older), str(STEPS)))  # the run as it was at step 6
  got = jax.tree.leaves(run_result(damaged).state)
  want = jax.tree.leaves(run_result(older).state)
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.isdir(os.path.join(_stage(damaged), str(STEPS)))  # read-only: nothing moved
