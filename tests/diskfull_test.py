"""Disk full while a training checkpoint is written: the older checkpoint survives, the run says so.

What is checked against what:
  fault     from the second checkpoint (step 6) on, every Python-level write under the
            stage's checkpoint directory fails with ENOSPC (orbax's metadata, JSON and
            data-iterator files; tensorstore's array files are C++ and are not patched):
            `run` must raise one CheckpointError line naming the directory, "no space
            left on device" and the newest complete step (3), for synchronous and for
            asynchronous checkpoints (where the error comes from a writer thread)
  intact    step 3 is the only committed step and passes its integrity record
  resume    the same command without the fault resumes from step 3 and ends with
            adapters and optimizer state bit-identical to an uninterrupted run
"""

from __future__ import annotations

import builtins
import errno
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from reliability_test import NEWS, STEPS, tiny_settings  # the same tiny forecaster run

from ir_jax.checkpoint import CheckpointError
from ir_jax.train import integrity, run

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

FULL_FROM = 6  # the first checkpoint step written to a full disk


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  if not os.path.exists(NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref") / "run")
  run(tiny_settings(data_dir, True), workdir)
  return workdir


def _stage(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints", "forecaster")


def _item(workdir: str, step: int, item: str) -> dict[str, np.ndarray]:
  tree = ocp.PyTreeCheckpointer().restore(os.path.join(_stage(workdir), str(step), item))
  return {
    jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


class FullDisk:
  """Fails every Python write under `directory` with ENOSPC once `CheckpointManager.save`
  is called for step `from_step` (after the integrity record of the step before it)."""

  def __init__(self, monkeypatch: pytest.MonkeyPatch, directory: str, from_step: int) -> None:
    self.prefix = directory.rstrip("/") + "/"
    self.armed = False
    self.refused: list[str] = []
    real_open = builtins.open
    real_save = ocp.CheckpointManager.save

    def refuse(path: object) -> None:
      if self.armed and str(path).startswith(self.prefix):
        self.refused.append(str(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def open_(file, mode="r", *args, **kwargs):
      if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
        refuse(os.fspath(file))
      return real_open(file, mode, *args, **kwargs)

    def write(real):
      def wrapped(self_path, *args, **kwargs):
        refuse(self_path)
        return real(self_path, *args, **kwargs)

      return wrapped

    def save(mgr, step, *args, **kwargs):
      if step >= from_step and str(mgr.directory).rstrip("/") + "/" == self.prefix:
        self.armed = True
      return real_save(mgr, step, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(pathlib.Path, "write_text", write(pathlib.Path.write_text))
    monkeypatch.setattr(pathlib.Path, "write_bytes", write(pathlib.Path.write_bytes))
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize("async_checkpoints", [True, False], ids=["async", "sync"])
def test_disk_full_keeps_the_previous_checkpoint_and_says_so(
  data_dir, reference, tmp_path, async_checkpoints, capsys
):
  s = tiny_settings(data_dir, async_checkpoints)
  workdir = str(tmp_path / "run")
  sdir = _stage(workdir)
  with pytest.MonkeyPatch.context() as mp:
    disk = FullDisk(mp, sdir, FULL_FROM)
    with pytest.raises(CheckpointError) as err:
      run(s, workdir)
  msg = str(err.value)
  assert disk.refused, "the fault was never hit"
  assert "\n" not in msg
  assert f"cannot write checkpoint step {FULL_FROM} in {sdir}: no space left on device" in msg
  assert "the newest complete checkpoint is step 3" in msg

  # The previous checkpoint is whole: committed, recorded, and its files match the record.
  # Step 0 is the closed-form forecaster fit's checkpoint (train.forecaster.init='fit').
  assert sorted(int(n) for n in os.listdir(sdir) if n.isdigit()) == [0, 3]
  assert os.path.isfile(os.path.join(integrity.record_dir(sdir), "3.json"))
  assert integrity.check(sdir, 3) is None

  # Space again: the same command resumes from step 3 and ends as if nothing happened.
  capsys.readouterr()
  run(s, workdir)
  assert "resumed from batch 3" in capsys.readouterr().out
  for item in ("adapters", "opt_state"):
    got, want = _item(workdir, STEPS, item), _item(reference, STEPS, item)
    assert got.keys() == want.keys() and got
    for k in got:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{item} {k}")
  assert integrity.check(sdir, STEPS) is None
