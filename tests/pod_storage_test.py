"""A pod run's storage and weights, checked at start: a workdir whose filesystem cannot
rename a directory (a gcsfuse mount of a flat bucket without --rename-dir-limit) is
refused before training; metrics.jsonl is fsynced at each record; a multi-process job
refuses to import HF/GGUF weights itself (process 0 would save with orbax while the
others wait elsewhere).

What is checked against what: the refusal is provoked by an os.rename that fails as
gcsfuse's does for a directory (EIO on the probe's directory alone), and a real
filesystem must pass with nothing left behind; fsync calls are counted on the
metrics file's own descriptor; the multi-process refusals replace jax.process_count.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os

import jax
import pytest

from ir_jax.config import ConfigError
from ir_jax.train import rundir, settings_from_config
from ir_jax.train.metrics import MetricWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**model: object):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  for k, v in model.items():
    cfg.model[k] = v
  return settings_from_config(cfg)


def test_a_filesystem_that_renames_passes_and_keeps_nothing(tmp_path):
  rundir.check_renames(str(tmp_path / "w" / "deeper"))  # probes tmp_path, the nearest parent
  rundir.check_renames(str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_a_workdir_that_cannot_rename_a_directory_is_refused(tmp_path, monkeypatch):
  real = os.rename

  def gcsfuse_like(src, dst, *a, **kw):
    if os.path.isdir(src):
      raise OSError(errno.EIO, os.strerror(errno.EIO), src)
    return real(src, dst, *a, **kw)

  monkeypatch.setattr(os, "rename", gcsfuse_like)
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError) as e:
    rundir.check_workdir(workdir, _tiny())
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"--workdir {workdir}: its filesystem cannot rename a directory")
  assert "--rename-dir-limit" in msg and "hierarchical namespace" in msg
  assert os.listdir(tmp_path) == []  # the probe is gone, the workdir not created


def test_metrics_are_fsynced_at_each_record(tmp_path, monkeypatch):
  synced: list[int] = []
  real = os.fsync
  monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
  w = MetricWriter(str(tmp_path), tensorboard=False)
  fd = w._jsonl.fileno()
  for step in (10, 20, 30):
    w.write("router", step, {"loss": 1.0 / step})
    assert synced.count(fd) == step // 10
    with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
      assert [json.loads(l)["step"] for l in f] == list(range(10, step + 1, 10))
  w.close()


def test_a_multiprocess_job_refuses_to_import_weights(tmp_path, monkeypatch):
  gguf = tmp_path / "model.gguf"
  gguf.write_bytes(b"GGUF")
  s = _tiny(checkpoint=str(gguf), random_init=False)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError) as e:
    rundir.resolve_base(s, str(tmp_path / "w"))
  msg = str(e.value)
  assert "\n" not in msg and "a multi-process job does not import" in msg
  assert f"python -m ir_jax.convert import {gguf} --out DIR" in msg
  assert not os.path.exists(tmp_path / "w")

  from ir_jax.convert import import_weights

  with pytest.raises(ConfigError, match="importing .* needs one process, this is process 0 of 2"):
    import_weights(str(gguf), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
