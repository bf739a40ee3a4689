"""Multi-process training: two local processes (1 CPU device each, gloo) run configs/tiny.py
through launch/local_multiprocess.py; the decision logic of ir_jax.distributed on its own.

What is checked against what:
  one writer   metrics.jsonl has each logged step once, and only process 0 printed them
  checkpoint   both processes wrote their part of the orbax checkpoint; restored in this
               (8-device, single) process it equals the raw saved arrays and differs
               from the untrained forecasters
  one process  the same training in this process on 2 of its devices (same mesh
               data=2, same global batches): final forecasters, optimizer state and
               every logged metric bitwise equal to the two-process run
  restore      a copy with its newest step damaged, rerun as two processes: both
               restore the step before (process 0's integrity verdict), retrain and
               end bitwise equal to the undamaged run

Same global batch: each process reads every process_count-th document
(ir_jax/data/pipeline.py) and packs its own rows, so an unmodified
single-process run sees other batches (its one shard is all documents,
shuffled together). The single-process reference is therefore fed the
two-process job's global batches: the train iterators of process 0 and 1
(process_count=2), their rows stacked in process order, which is where
`jax.make_array_from_process_local_data` puts them on the mesh [p0's device,
p1's device] (the loss is a mean over rows, so swapping the two halves
would give the same result: the order itself is not what is tested). That
the two-process run consumed exactly these documents is
checked through the data iterator states in its checkpoint; with those
batches the step computes the same per-device programs, and the cross-device
sums have two terms (commutative in floating point), so parameters agree
bitwise, not just within a tolerance.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import load_launcher, train_cli
from etils import epath
from flax import nnx

from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.data import pipeline
from ir_jax.distributed import plan
from ir_jax.forecast import ForecasterParam
from ir_jax.sharding import MeshConfig, make_mesh
from ir_jax.train import run, settings_from_config
from ir_jax.train.rundir import read_run, run_result
from ir_jax.train.state import init_state

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEWS = os.path.join(REPO, "assets", "text", "news", "lee.cor")


def _launcher():
  return load_launcher("local_multiprocess")


# ------------------------------------------------------------ the decision
def test_explicit_flags_need_all_three():
  p = plan("127.0.0.1:1234", 2, 1, env={}, tpu_vm=False)
  assert (p.reason, p.coordinator, p.num_processes, p.process_id) == (
    "flags",
    "127.0.0.1:1234",
    2,
    1,
  )
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
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
  }
  assert plan(env=env, tpu_vm=False) == plan("10.0.0.2:8476", 4, 3, env={}, tpu_vm=False)


# ------------------------------------------------------------ two processes
STEPS = 3
# The config of both runs: configs/tiny.py with these fields changed.
OVERRIDES = {
  "train.stages": "forecaster",
  "train.forecaster.steps": STEPS,
  "train.log_every": 1,
  "train.checkpoint_every": 1,
  "train.eval_batches": 0,
  "train.async_checkpoints": False,
}


def _tiny_config(data_dir: str, overrides: dict[str, Any] = OVERRIDES) -> Any:
  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(REPO, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.data.data_dir = data_dir
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for k in parents:
      node = node[k]
    node[leaf] = value
  return cfg


def _raw(path: str) -> dict[str, np.ndarray]:
  """An orbax checkpoint item as {'a/b/c': numpy array}, whatever devices wrote it."""
  handler = ocp.PyTreeCheckpointHandler()
  md = handler.metadata(epath.Path(path))
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), md.tree)
  raw = handler.restore(epath.Path(path), args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  out = {}
  for p, v in jax.tree_util.tree_flatten_with_path(raw)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p]
    out["/".join(n for n in names if n != "value")] = np.asarray(v)
  return out


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


_TRAIN_ITERATOR = pipeline.train_iterator  # the real ones (the tests below replace them)
_MAKE_ITERATOR = pipeline.make_iterator


class _ProcessShards(grain.DatasetIterator):
  """The global training batches of a `process_count`-process job, built in one process.

  Process i's train iterator (process_index=i) gives rows [i*B/P, (i+1)*B/P) of
  each global batch of B rows; they are placed on `mesh` as the multi-process
  job places them (process i holds the i-th block of the data axis).
  """

  def __init__(
    self,
    cfg: Any,
    mesh: jax.sharding.Mesh,
    batch_axes: Any,
    process_count: int,
    make: Any = _TRAIN_ITERATOR,
    **kwargs: Any,
  ) -> None:
    self.shards: list[pipeline.DataIterator] = []
    super().__init__()
    self.mesh, self.batch_axes = mesh, batch_axes
    self.shards = [
      make(cfg, process_index=i, process_count=process_count, **kwargs)
      for i in range(process_count)
    ]

  def __next__(self) -> dict[str, jax.Array]:
    rows = [it.next_local() for it in self.shards]
    return {
      k: jax.device_put(
        np.concatenate([r[k] for r in rows]),
        pipeline.batch_sharding(self.mesh, self.batch_axes, rows[0][k].ndim),
      )
      for k in rows[0]
    }

  def local_batch_count(self) -> int:
    """What the processes agree a pass over the split takes: the most any shard needs."""
    return max(it.local_batch_count() for it in self.shards)

  def get_state(self) -> dict[str, Any]:
    return {"shards": [it.get_state() for it in self.shards]}

  def set_state(self, state: dict[str, Any]) -> None:
    for it, st in zip(self.shards, state["shards"]):
      it.set_state(st)

  def close(self) -> None:
    for it in self.shards:
      it.close()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict[str, str]:
  """configs/tiny.py, forecaster stage, 2 processes x 1 CPU device (mesh data=2)."""
  if not os.path.exists(NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  root = tmp_path_factory.mktemp("mp")
  workdir, data_dir = str(root / "w"), str(root / "tfds")
  args = [
    "--config",
    os.path.join(REPO, "configs", "tiny.py"),
    "--workdir",
    workdir,
    f"--config.data.data_dir={data_dir}",
    *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
  ]
  out = io.StringIO()
  status = _launcher().launch(
    args, num_processes=2, devices_per_process=1, cwd=REPO, timeout=400, out=out
  )
  log = out.getvalue()
  assert status == 0, log[-3000:]
  return {"workdir": workdir, "data_dir": data_dir, "log": log}


def test_two_processes_train_write_once_and_restore(two_process_run):
  workdir, log = two_process_run["workdir"], two_process_run["log"]
  assert "[p0] ir_jax.train: process 0 of 2 (flags), 1 local / 2 global devices" in log, log
  assert "[p1] ir_jax.train: process 1 of 2 (flags), 1 local / 2 global devices" in log, log
  assert f"[p0] [forecaster {STEPS}/{STEPS}]" in log
  assert "[p1] [forecaster" not in log and "[p1] ir_jax.train: 2 cpu device(s)" not in log

  rows = _metrics(workdir)
  steps = [r for r in rows if "loss" in r]
  assert [(r["stage"], r["step"]) for r in steps] == [("forecaster", i + 1) for i in range(STEPS)]
  # The closed-form fit (step 0) is recorded once as well.
  assert [r["step"] for r in rows if "fit_tokens" in r] == [0]
  ckpt = os.path.join(workdir, "checkpoints", "forecaster", str(STEPS), "adapters")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(ckpt))

  # Restore on this process's 8 devices (explicit target with shardings).
  model_state = run_result(workdir)
  restored = {
    "/".join(map(str, p)): np.asarray(jax.device_get(v[...]))
    for p, v in nnx.to_flat_state(model_state.state)
    if isinstance(v, ForecasterParam)
  }
  # The saved arrays as plain numpy (the checkpoint's devices are not this process's).
  saved = _raw(ckpt)
  assert restored and set(restored) <= set(saved)
  meta = read_run(workdir)
  fresh = init_state(
    LlamaConfig.from_dict(meta["model"]),
    make_mesh(MeshConfig(data=-1)),
    meta["base"],
    int(meta["seed"]),
  )
  moved = 0
  for p, v in nnx.to_flat_state(fresh.state):
    key = "/".join(map(str, p))
    if key in restored:
      np.testing.assert_array_equal(restored[key], saved[key])
      moved += not np.array_equal(restored[key], np.asarray(jax.device_get(v[...])))
  assert moved > 0, f"the forecasters did not change in {STEPS} steps"


def test_two_processes_agree_on_the_restore_step_of_a_damaged_run(two_process_run, tmp_path):
  """A copy of the finished run with its newest step damaged, rerun as two processes:
  process 0's integrity check rejects step 3, both restore step 2 (orbax, each its
  shards), retrain step 3 and end bitwise equal to the uninterrupted run."""
  import shutil

  workdir = str(tmp_path / "w")
  shutil.copytree(two_process_run["workdir"], workdir)
  newest = os.path.join(workdir, "checkpoints", "forecaster", str(STEPS), "adapters")
  files = [os.path.join(r, n) for r, _, names in os.walk(newest) for n in names]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  args = [
    "--config",
    os.path.join(REPO, "configs", "tiny.py"),
    "--workdir",
    workdir,
    f"--config.data.data_dir={two_process_run['data_dir']}",
    *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
  ]
  out = io.StringIO()
  status = _launcher().launch(  # a fresh start: model load and compiles, as the first run
    args, num_processes=2, devices_per_process=1, cwd=REPO, timeout=400, out=out
  )
  log = out.getvalue()
  assert status == 0, log[-3000:]
  assert f"[p0] checkpoint step {STEPS} of " in log and "changed since it was written" in log
  assert f"using step {STEPS - 1}" in log, log[-3000:]
  assert f"[p0] [forecaster] resumed from batch {STEPS - 1}" in log, log[-3000:]
  for item in ("adapters", "opt_state"):
    a = _raw(os.path.join(workdir, "checkpoints", "forecaster", str(STEPS), item))
    b = _raw(
      os.path.join(two_process_run["workdir"], "checkpoints", "forecaster", str(STEPS), item)
    )
    assert set(a) == set(b) and a
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{item} {key}")


def test_two_processes_equal_one_process_on_the_same_global_batches(
  two_process_run, tmp_path, monkeypatch
):
  mp_dir = two_process_run["workdir"]
  s = settings_from_config(_tiny_config(two_process_run["data_dir"]))
  shards: list[_ProcessShards] = []

  def two_shards(data_cfg: Any, *, mesh: Any, batch_axes: Any, **kwargs: Any) -> _ProcessShards:
    shards.append(_ProcessShards(data_cfg, mesh, batch_axes, 2, **kwargs))
    return shards[-1]

  monkeypatch.setattr(pipeline, "train_iterator", two_shards)
  one_dir = str(tmp_path / "one")
  # One process, 2 of its CPU devices: the same mesh (data=2, fsdp=1, tensor=1).
  run(s, one_dir, devices=jax.devices()[:2])
  assert len(shards) == 1 and dict(shards[0].mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}

  # The two processes consumed exactly these documents: their iterator states at the end
  # are those of the two shards this process read.
  def data_state(workdir: str, process: int, count: int) -> dict[str, Any]:
    path = os.path.join(
      workdir, "checkpoints", "forecaster", str(STEPS), "data", f"process_{process}-of-{count}.json"
    )
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  one_states = data_state(one_dir, 0, 1)["shards"]
  assert [data_state(mp_dir, i, 2) for i in range(2)] == one_states
  assert [st["process_index"] for st in one_states] == [0, 1]
  # The closed-form fit's statistics batches come first, then one per step.
  assert all(st["batches"] == s.train.forecaster.fit_batches + STEPS for st in one_states)

  # Every logged metric (loss, explained variance, ...) of every step, bitwise.
  timing = {"step_time_s", "tokens_per_s", "time"}

  def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]

  assert strip(_metrics(one_dir)) == strip(_metrics(mp_dir))

  for item in ("adapters", "opt_state"):
    mp = _raw(os.path.join(mp_dir, "checkpoints", "forecaster", str(STEPS), item))
    one = _raw(os.path.join(one_dir, "checkpoints", "forecaster", str(STEPS), item))
    assert set(mp) == set(one) and mp, item
    for key in mp:
      np.testing.assert_array_equal(mp[key], one[key], err_msg=f"{item} {key}")


def test_half_given_multiprocess_flags_are_one_line_errors(tmp_path):
  out = train_cli(
    str(tmp_path / "w"),
    flags=("--coordinator", "127.0.0.1:1234"),
    cwd=str(tmp_path),
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=120,
  )
  assert out.returncode == 2
  assert out.stderr.startswith("ir_jax.train: error: multi-process flags need all of")
  assert "Traceback" not in out.stderr and not os.path.exists(tmp_path / "w")


# ------------------------------------------------------------ every stage, every layout
# configs/tiny.py's default recipe plus LoRA, cut to the fewest batches that still run
# every pass: the closed-form forecaster fit and its held-out report, the router warm
# start and the error-curve capacity table (allocation "error", the default), Gumbel
# router steps, causal-threshold calibration, LoRA steps, the held-out evaluation.
RECIPE = {
  "train.stages": "forecaster,router,lora",
  "train.forecaster.steps": 2,
  "train.forecaster.fit_batches": 2,
  "train.router.steps": 4,
  "train.router.fit_batches": 2,
  "train.router.allocation_batches": 1,
  "train.router.calibration_batches": 1,
  "train.lora.steps": 2,
  "train.log_every": 1,
  "train.checkpoint_every": 2,
  "train.eval_batches": 1,
  "train.async_checkpoints": False,
}
FINAL = {"forecaster": 2, "router": 4, "lora": 2}  # each stage's last checkpoint step
# name -> (processes, devices per process, mesh). "fsdp" splits the weights (embed dim)
# and the batch over the two processes; "2x2" both, with two devices in each process.
LAYOUTS = {
  "dp": (2, 1, {"mesh.data": -1}),
  "fsdp": (2, 1, {"mesh.data": 1, "mesh.fsdp": 2}),
  "2x2": (2, 2, {"mesh.data": 2, "mesh.fsdp": 2}),
}
TIMING = {"step_time_s", "tokens_per_s", "time", "wall_s"}


def _recipe_overrides(layout: str) -> dict[str, Any]:
  return {**RECIPE, **LAYOUTS[layout][2]}


def _train_args(workdir: str, data_dir: str, overrides: dict[str, Any]) -> list[str]:
  return [
    "--config",
    os.path.join(REPO, "configs", "tiny.py"),
    "--workdir",
    workdir,
    f"--config.data.data_dir={data_dir}",
    *(f"--config.{k}={v}" for k, v in overrides.items()),
  ]


def _stacked_iterators(monkeypatch, process_count: int) -> None:
  """Every iterator the run makes (training streams, held-out report, evaluation) gives
  the global batches of a `process_count`-process job (see `_ProcessShards`)."""

  def make(
    cfg: Any, split: str | None = None, *, mesh: Any = None, batch_axes: Any = "data", **kwargs: Any
  ) -> _ProcessShards:
    for key in ("process_index", "process_count"):
      kwargs.pop(key, None)
    return _ProcessShards(
      cfg, mesh, batch_axes, process_count, make=_MAKE_ITERATOR, split=split, **kwargs
    )

  monkeypatch.setattr(pipeline, "make_iterator", make)  # train_iterator calls it too


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> str:
  """The tiny dataset, prepared once for every layout."""
  if not os.path.exists(NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  from ir_jax.data.builder import open_split

  data_dir = str(tmp_path_factory.mktemp("recipe_tfds"))
  s = settings_from_config(_tiny_config(data_dir, RECIPE))
  open_split(s.data, s.data.train_split, prepare_if_missing=True)
  open_split(s.data, s.data.eval_split, prepare_if_missing=True)
  return data_dir


@pytest.fixture(scope="module", params=list(LAYOUTS))
def recipe(request, recipe_data, tmp_path_factory) -> dict[str, Any]:
  """The recipe run as a 2-process job with the layout's mesh, and in this process on as
  many of its devices with the same mesh and the job's global batches."""
  layout = request.param
  procs, per_process, _ = LAYOUTS[layout]
  root = tmp_path_factory.mktemp(f"recipe_{layout}")
  mp_dir, one_dir = str(root / "mp"), str(root / "one")
  overrides = _recipe_overrides(layout)
  out = io.StringIO()
  status = _launcher().launch(
    _train_args(mp_dir, recipe_data, overrides),
    num_processes=procs,
    devices_per_process=per_process,
    cwd=REPO,
    timeout=400,
    out=out,
  )
  assert status == 0, out.getvalue()[-4000:]
  s = settings_from_config(_tiny_config(recipe_data, overrides))
  with pytest.MonkeyPatch.context() as mp:
    _stacked_iterators(mp, procs)
    run(s, one_dir, devices=jax.devices()[: procs * per_process])
  return {
    "layout": layout,
    "mp": mp_dir,
    "one": one_dir,
    "log": out.getvalue(),
    "data_dir": recipe_data,
  }


def _json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _untimed(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _untimed(v) for k, v in x.items() if k not in TIMING}
  if isinstance(x, list):
    return [_untimed(v) for v in x]
  return x


def _assert_close(a: Any, b: Any, rtol: tuple[float, ...], what: str) -> None:
  """Equal JSON-like values; numbers within rtol[0], R^2 within rtol[1] (0: bitwise)."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and set(a) == set(b), f"{what}: {sorted(a)} != {sorted(b)}"
    for k in a:
      _assert_close(a[k], b[k], rtol, f"{what}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, rtol, f"{what}[{i}]")
  elif isinstance(a, float) and not isinstance(b, str):
    tol = rtol[1] if "_r2_" in what else rtol[0]
    np.testing.assert_allclose(a, b, rtol=tol, atol=0, err_msg=what)
  else:
    assert a == b, f"{what}: {a!r} != {b!r}"


# Tolerances. With two devices every cross-device sum (gradients, statistics moments,
# losses) has two terms, which floating point adds commutatively: the per-device
# programs are the same in both runs, so everything is bitwise equal. With four devices
# gloo's all-reduce and the in-process one add the four partial sums in another order:
# moments, losses and evaluation differ by ~1e-7 relative (measured: at most 1.03e-6,
# the router grad norm). The router warm start's ridge solve, on 2 batches of
# statistics, amplifies that to ~2e-4 of a router weight's scale (measured 2.1e-4), and
# its logged R^2, a difference of nearly equal terms, to ~2e-3 (measured 1.8e-3).
# (JSON numbers rtol, R^2 rtol, arrays: |a - b| <= tol * max |b|)
RTOL = {"dp": (0.0, 0.0, 0.0), "fsdp": (0.0, 0.0, 0.0), "2x2": (1e-5, 1e-2, 1e-3)}


def test_every_stage_across_processes_equals_one_process(recipe):
  mp, one, rtol = recipe["mp"], recipe["one"], RTOL[recipe["layout"]]
  log = recipe["log"]
  assert "[p0] [router] capacity table (error" in log and "[p0] [lora 2/2]" in log, log[-3000:]
  assert "[p0] [router] calibrating causal-mode thresholds" in log
  # Every logged record: fit statistics, R^2, table sparsities, every step's losses and
  # realized sparsities, the forecasters' held-out fit.
  _assert_close(_untimed(_metrics(one)), _untimed(_metrics(mp)), rtol, "metrics")
  assert any("table_sparsity_mlp" in r for r in _metrics(mp))
  _assert_close(
    _json(os.path.join(one, "forecasters.json")),
    _json(os.path.join(mp, "forecasters.json")),
    rtol,
    "forecasters.json",
  )
  ev_one, ev_mp = _json(os.path.join(one, "eval.json")), _json(os.path.join(mp, "eval.json"))
  _assert_close(_untimed(ev_one), _untimed(ev_mp), rtol, "eval.json")
  assert ev_mp["routed"]["tokens"] > 0 and ev_mp["capacity_table"]
  # Every stage's final checkpoint: forecasters, routers, thresholds, capacity table,
  # LoRA adapters, and their optimizer states.
  for stage, step in FINAL.items():
    for item in ("adapters", "opt_state"):
      a = _raw(os.path.join(mp, "checkpoints", stage, str(step), item))
      b = _raw(os.path.join(one, "checkpoints", stage, str(step), item))
      assert set(a) == set(b) and a, (stage, item)
      for key in a:
        ref = b[key].astype(np.float64)
        scale = np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0)
        np.testing.assert_allclose(
          a[key], ref, rtol=0, atol=rtol[2] * scale, err_msg=f"{stage}/{step} {item} {key}"
        )
  router = _raw(os.path.join(mp, "checkpoints", "router", str(FINAL["router"]), "adapters"))
  thresholds = [v for k, v in router.items() if "threshold" in k]
  # Calibrated: finite where a unit approximates, -inf where the table keeps it dense.
  assert thresholds and not np.isnan(thresholds[0]).any() and np.isfinite(thresholds[0]).any()


def test_export_of_a_multiprocess_run_equals_one_process(recipe, tmp_path):
  if recipe["layout"] != "fsdp":  # one layout suffices: export reads the checkpoint alone
    pytest.skip("checked on the fsdp layout")
  from safetensors.numpy import load_file

  from ir_jax.convert.export import export

  def tensors(workdir: str, name: str) -> dict[str, np.ndarray]:
    out = export(workdir, str(tmp_path / name))
    got = {}
    for f in sorted(os.listdir(out)):
      if f.endswith(".safetensors"):
        got.update({f"{f}:{k}": v for k, v in load_file(os.path.join(out, f)).items()})
    return got

  a, b = tensors(recipe["mp"], "mp"), tensors(recipe["one"], "one")
  assert set(a) == set(b) and any(k.startswith("routing") for k in a), sorted(a)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(recipe, tmp_path):
  """SIGTERM reaches process 1 only, while the router stage compiles its first step:
  both processes agree to stop at the same step, save it together, exit 143; rerunning
  resumes there, and the result equals the uninterrupted job's bit for bit."""
  if recipe["layout"] != "dp":
    pytest.skip("checked on the dp layout")
  workdir = str(tmp_path / "w")
  args = _train_args(workdir, recipe["data_dir"], _recipe_overrides("dp"))
  sent: list[int] = []

  def preempt_p1(line: str, procs: list[subprocess.Popen]) -> None:
    if not sent and line.startswith("[p0] [router] training"):
      procs[1].send_signal(signal.SIGTERM)
      sent.append(1)

  out = io.StringIO()
  status = _launcher().launch(
    args,
    num_processes=2,
    devices_per_process=1,
    cwd=REPO,
    timeout=300,
    out=out,
    on_line=preempt_p1,
  )
  log = out.getvalue()
  assert sent and status == 143, log[-3000:]
  assert "[p1] ir_jax.train: SIGTERM received (process 1)" in log, log[-3000:]
  assert "[p0] ir_jax.train: SIGTERM received" not in log.split("stopped at")[0]
  stopped = {
    line.split("]")[0][1:]: line.split("stopped at router step ")[1].split()[0]
    for line in log.splitlines()
    if "stopped at router step" in line
  }
  assert set(stopped) == {"p0", "p1"} and len(set(stopped.values())) == 1, log[-3000:]
  step = int(stopped["p0"])
  assert 0 < step < FINAL["router"]
  rdir = os.path.join(workdir, "checkpoints", "router", str(step))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(rdir, "adapters")))

  out = io.StringIO()
  status = _launcher().launch(
    args, num_processes=2, devices_per_process=1, cwd=REPO, timeout=300, out=out
  )
  log = out.getvalue()
  assert status == 0, log[-3000:]
  assert f"[p0] [router] resumed from batch {step}" in log, log[-3000:]
  ref = recipe["mp"]
  for stage, final in FINAL.items():
    for item in ("adapters", "opt_state"):
      a = _raw(os.path.join(workdir, "checkpoints", stage, str(final), item))
      b = _raw(os.path.join(ref, "checkpoints", stage, str(final), item))
      assert set(a) == set(b) and a
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{stage} {item} {key}")
  _assert_close(
    _untimed(_json(os.path.join(workdir, "eval.json"))),
    _untimed(_json(os.path.join(ref, "eval.json"))),
    (0.0, 0.0),
    "eval.json",
  )
