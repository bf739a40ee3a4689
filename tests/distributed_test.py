"""Multi-process training: two local processes (1 CPU device each, gloo) run configs/tiny.py
through launch/local_multiprocess.py; the decision logic of ir_jax.distributed on its own.

What is checked against what:
  one writer   metrics.jsonl has each logged step once, and only process 0 printed them
  checkpoint   both processes wrote their part of the orbax checkpoint; restored in this
               (8-device, single) process it equals the raw saved arrays and differs
               from the untrained forecasters
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from flax import nnx

from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.distributed import plan
from ir_jax.forecast import ForecasterParam
from ir_jax.sharding import MeshConfig, make_mesh
from ir_jax.train.loop import init_state, read_run, run_result

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEWS = os.path.join(REPO, "assets", "text", "news", "lee.cor")


def _launcher():
  spec = importlib.util.spec_from_file_location(
      "local_multiprocess", os.path.join(REPO, "launch", "local_multiprocess.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# ------------------------------------------------------------ the decision
def test_explicit_flags_need_all_three():
  p = plan("127.0.0.1:1234", 2, 1, env={}, tpu_vm=False)
  assert (p.reason, p.coordinator, p.num_processes, p.process_id) == ("flags", "127.0.0.1:1234",
                                                                      2, 1)
  with pytest.raises(ConfigError, match="missing --process_id"):
    plan("127.0.0.1:1234", 2, None, env={}, tpu_vm=False)
  with pytest.raises(ConfigError, match="must be in \\[0, --num_processes=2\\)"):
    plan("127.0.0.1:1234", 2, 2, env={}, tpu_vm=False)
  with pytest.raises(ConfigError, match="HOST:PORT"):
    plan("localhost", 2, 0, env={}, tpu_vm=False)
  assert not plan("127.0.0.1:1234", 1, 0, env={}, tpu_vm=False).distributed


def test_environment_decides_when_no_flags():
  assert plan(env={}, tpu_vm=False).reason == "single"
  assert plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, tpu_vm=False).reason == "single"
  assert plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, tpu_vm=False).reason == "slurm"
  assert plan(env={}, tpu_vm=True).reason == "tpu"
  assert plan(env={"IR_JAX_DISTRIBUTED": "0"}, tpu_vm=True).reason == "single"
  assert plan(env={"IR_JAX_DISTRIBUTED": "1"}, tpu_vm=False).reason == "env"
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert plan(env=env, tpu_vm=False) == plan("10.0.0.2:8476", 4, 3, env={}, tpu_vm=False)


# ------------------------------------------------------------ two processes
def test_two_processes_train_write_once_and_restore(tmp_path):
  if not os.path.exists(NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  workdir = str(tmp_path / "w")
  args = ["--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", workdir,
          f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.train.stages=forecaster",
          "--config.train.forecaster.steps=2", "--config.train.log_every=1",
          "--config.train.checkpoint_every=1", "--config.train.eval_batches=0",
          "--config.train.async_checkpoints=False"]
  out = io.StringIO()
  status = _launcher().launch(args, num_processes=2, devices_per_process=1, cwd=REPO,
                              timeout=240, out=out)
  log = out.getvalue()
  assert status == 0, log[-3000:]
  assert "[p0] ir_jax.train: process 0 of 2 (flags), 1 local / 2 global devices" in log, log
  assert "[p1] ir_jax.train: process 1 of 2 (flags), 1 local / 2 global devices" in log, log
  assert "[p0] [forecaster 2/2]" in log
  assert "[p1] [forecaster" not in log and "[p1] ir_jax.train: 2 cpu device(s)" not in log

  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert [(r["stage"], r["step"]) for r in rows] == [("forecaster", 1), ("forecaster", 2)]
  ckpt = os.path.join(workdir, "checkpoints", "forecaster", "2", "adapters")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(ckpt))

  # Restore on this process's 8 devices (explicit target with shardings).
  ms = run_result(workdir)
  restored = {"/".join(map(str, p)): np.asarray(jax.device_get(v[...]))
              for p, v in nnx.to_flat_state(ms.state) if isinstance(v, ForecasterParam)}
  # The saved arrays as plain numpy (the checkpoint's devices are not this process's).
  handler = ocp.PyTreeCheckpointHandler()
  md = handler.metadata(epath.Path(ckpt))
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), md.tree)
  raw = handler.restore(epath.Path(ckpt), args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  saved = {}
  for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p]
    saved["/".join(n for n in names if n != "value")] = np.asarray(v)
  assert restored and set(restored) <= set(saved)
  meta = read_run(workdir)
  fresh = init_state(LlamaConfig.from_dict(meta["model"]), make_mesh(MeshConfig(data=-1)),
                     meta["base"], int(meta["seed"]))
  moved = 0
  for (p, v) in nnx.to_flat_state(fresh.state):
    key = "/".join(map(str, p))
    if key in restored:
      np.testing.assert_array_equal(restored[key], saved[key])
      moved += not np.array_equal(restored[key], np.asarray(jax.device_get(v[...])))
  assert moved > 0, "the forecasters did not change in two steps"


def test_half_given_multiprocess_flags_are_one_line_errors(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "ir_jax.train", "--config", os.path.join(REPO, "configs", "tiny.py"),
       "--workdir", str(tmp_path / "w"), "--coordinator", "127.0.0.1:1234"],
      cwd=str(tmp_path), check=False, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2
  assert out.stderr.startswith("ir_jax.train: error: multi-process flags need all of")
  assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "w")
