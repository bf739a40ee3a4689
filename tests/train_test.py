"""Training: two stages of configs/tiny.py on a 2x4 mesh of 8 fake CPU devices.

What is checked against what:
  losses       the logged loss of the last steps vs the first steps of each stage
  frozen       every leaf before vs after a stage, bitwise, grouped by parameter type
  resume       a run stopped twice and resumed vs an uninterrupted run: adapters
               and optimizer state bitwise equal
  other mesh   a checkpoint written on 8 devices resumed by a 1-device process
  bad input    one-line errors before compilation; a NaN loss keeps the last checkpoint
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import train_argv, train_cli
from flax import nnx

from ir_jax import sharding as sh
from ir_jax.config import ConfigError
from ir_jax.forecast import CalibratedFor, ForecasterParam, RouterParam, Threshold
from ir_jax.model import LoraParam
from ir_jax.train import Preempted, TrainingError, run, settings_from_config
from ir_jax.train.rundir import run_result
from ir_jax.train.state import init_state

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEWS = os.path.join(REPO, "assets", "text", "news", "lee.cor")
STEPS = 8


def tiny_config(data_dir: str, **overrides):
  spec = importlib.util.spec_from_file_location(
    "tiny_cfg", os.path.join(REPO, "configs", "tiny.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.data.files = (NEWS,)
  cfg.data.data_dir = data_dir
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 4, 1
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = 3
  cfg.train.eval_batches = 1
  cfg.train.forecaster.steps = STEPS
  cfg.train.router.steps = STEPS
  # Capacity 0.25 and routers starting from bias 0: they execute ~half the
  # tokens, so the sparsity term starts high and must come down.
  cfg.routing.sparsity = 0.75
  cfg.train.router.prior_bias = False
  # The SGD path from the small random init (the closed-form fits are checked in
  # fit_test.py, export_test.py and distributed_test.py).
  cfg.train.forecaster.init = "none"
  cfg.train.router.init = "none"
  for key, value in overrides.items():
    section, *rest = key.split(".")
    node = cfg[section]
    for r in rest[:-1]:
      node = node[r]
    node[rest[-1]] = value
  return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  if not os.path.exists(NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  return str(tmp_path_factory.mktemp("tfds"))


def _leaves(state) -> dict[str, tuple[type, np.ndarray]]:
  """path -> (variable type, value) for every leaf of an nnx.State."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    out["/".join(map(str, path))] = (type(var), np.asarray(jax.device_get(var[...])))
  return out


def _saved(workdir: str, stage: str, step: int, item: str) -> dict[str, np.ndarray]:
  """A checkpoint item as {'a/b/c': array}, read back without any target."""
  path = os.path.join(workdir, "checkpoints", stage, str(step), item)
  tree = ocp.PyTreeCheckpointer().restore(path)
  out = {}
  for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p]
    out["/".join(n for n in names if n != "value")] = np.asarray(v)
  return out


def _adapters(workdir: str, stage: str, step: int) -> dict[str, np.ndarray]:
  return _saved(workdir, stage, step, "adapters")


def _opt_state(workdir: str, stage: str, step: int) -> dict[str, np.ndarray]:
  return _saved(workdir, stage, step, "opt_state")


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
  """An uninterrupted forecaster + router run, and the state it started from."""
  workdir = str(tmp_path_factory.mktemp("full"))
  s = settings_from_config(tiny_config(data_dir))
  mesh = sh.make_mesh(s.mesh)
  initial = _leaves(
    init_state(s.model, mesh, {"kind": "random", "seed": s.train.seed}, s.train.seed).state
  )
  summary = run(s, workdir)
  final = _leaves(summary.pop("state").state)
  return dict(workdir=workdir, settings=s, initial=initial, final=final, summary=summary)


def _metrics(workdir: str) -> dict[str, list[dict]]:
  by_stage: dict[str, dict[int, dict]] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      by_stage.setdefault(r["stage"], {})[r["step"]] = r  # a resumed step overwrites
  return {k: [v[i] for i in sorted(v)] for k, v in by_stage.items()}


def test_losses_decrease_in_both_stages(full_run):
  m = _metrics(full_run["workdir"])

  def drop(stage: str, key: str) -> float:
    values = [r[key] for r in m[stage]]
    assert len(values) == STEPS
    return np.mean(values[-3:]) / np.mean(values[:3])

  assert drop("forecaster", "loss") < 0.8
  assert drop("router", "loss") < 0.95
  # Forecasts explain more of the unit outputs after training than at the start.
  assert m["forecaster"][-1]["explained_mlp"] > m["forecaster"][0]["explained_mlp"] + 0.2
  # The routers move the execute rate toward the target (sparsity 0.75 from ~0.5).
  assert drop("router", "sparsity_penalty") < 0.75
  assert m["router"][-1]["sparsity_mlp"] > m["router"][0]["sparsity_mlp"] + 0.05


def test_prior_bias_starts_fresh_routers_at_the_target_rate(full_run, data_dir, tmp_path):
  # A forecaster-only run leaves its routers untrained (output bias exactly 0).
  run(
    settings_from_config(
      tiny_config(
        data_dir,
        **{"train.stages": "forecaster", "train.forecaster.steps": 1, "train.eval_batches": 0},
      )
    ),
    str(tmp_path / "f"),
  )
  prior = np.log(0.25 / 0.75)  # logit(capacity)

  def router_run(init_from: str, name: str) -> tuple[dict, dict]:
    cfg = tiny_config(
      data_dir,
      **{
        "train.stages": "router",
        "train.init_from": init_from,
        "train.router.steps": 1,
        "train.router.prior_bias": True,
        "train.eval_batches": 0,
      },
    )
    run(settings_from_config(cfg), str(tmp_path / name))
    (first,) = _metrics(str(tmp_path / name))["router"]
    return first, _adapters(str(tmp_path / name), "router", 1)

  first, saved = router_run(str(tmp_path / "f"), "fresh")
  # P(execute) = sigmoid(score) = sigmoid(~prior) = 0.25 for untrained routers.
  for key in ("sparsity_attn", "sparsity_mlp"):
    assert abs(first[key] - 0.75) < 0.05, first
  np.testing.assert_allclose(saved["routing/mlp_router/b2"], prior, atol=0.01)
  # Trained routers keep their bias (one step of lr 2e-3 moves it by < 0.01).
  _, saved = router_run(full_run["workdir"], "trained")
  trained = _adapters(full_run["workdir"], "router", STEPS)["routing/mlp_router/b2"]
  assert np.abs(trained - prior).min() > 0.5
  np.testing.assert_allclose(saved["routing/mlp_router/b2"], trained, atol=0.01)


def test_each_stage_changes_only_its_parameters(full_run):
  w = full_run["workdir"]
  init = {k: v for k, (t, v) in full_run["initial"].items()}
  types = {k: t for k, (t, v) in full_run["initial"].items()}
  after_f = _adapters(w, "forecaster", STEPS)
  after_r = _adapters(w, "router", STEPS)
  key = lambda path: path
  changed = {"forecaster": set(), "router": set()}
  for path, t in types.items():
    if t in (ForecasterParam, RouterParam, Threshold, CalibratedFor, LoraParam):
      a, b, c = init[path], after_f[key(path)], after_r[key(path)]
      if not np.array_equal(a, b):
        changed["forecaster"].add(t)
      if not np.array_equal(b, c):
        changed["router"].add(t)
    else:  # base weights: never touched
      np.testing.assert_array_equal(full_run["final"][path][1], init[path], err_msg=path)
  assert changed["forecaster"] == {ForecasterParam}
  # Calibration at the end of the router stage sets the causal thresholds, and records
  # the capacity they were calibrated for (the run routes uniformly: 1 - sparsity).
  assert changed["router"] == {RouterParam, Threshold, CalibratedFor}
  capacity = 1.0 - full_run["settings"].routing.sparsity
  np.testing.assert_allclose(after_r["routing/calibrated_for"], capacity, rtol=0, atol=1e-6)
  # And the final in-memory state is what the last checkpoint holds.
  for path, t in types.items():
    if t in (ForecasterParam, RouterParam, Threshold):
      np.testing.assert_array_equal(full_run["final"][path][1], after_r[key(path)])


def test_stopped_and_resumed_run_is_bit_identical(full_run, data_dir, tmp_path):
  workdir = str(tmp_path / "resumed")
  s = full_run["settings"]
  stops = iter([("forecaster", 5), ("router", 4)])
  target = next(stops)
  for _ in range(2):
    with pytest.raises(Preempted) as e:
      run(s, workdir, should_stop=lambda stage, step: (stage, step) == target)
    assert (e.value.stage, e.value.step) == target
    target = next(stops, None)
  run(s, workdir)
  # Training time per stage accumulates over the interrupted invocations.
  summary = json.load(open(os.path.join(workdir, "train_summary.json")))
  assert [st["stage"] for st in summary["stages"]] == ["forecaster", "router"]
  assert summary["stages"][0]["steps_run"] == 0 and summary["stages"][0]["train_s"] > 0
  assert summary["stages"][1]["resumed_from"] == 4
  assert summary["stages"][1]["train_s"] > 0
  for stage in ("forecaster", "router"):
    a, b = _adapters(workdir, stage, STEPS), _adapters(full_run["workdir"], stage, STEPS)
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{stage} {k}")
    oa, ob = _opt_state(workdir, stage, STEPS), _opt_state(full_run["workdir"], stage, STEPS)
    assert oa.keys() == ob.keys() and len(oa) > 0
    for k in oa:
      np.testing.assert_array_equal(oa[k], ob[k], err_msg=f"{stage} optimizer {k}")
  # The stop saved at the step it happened, beside the periodic checkpoints (3, 6, 8).
  saved = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "forecaster")).all_steps()
  assert 5 in saved and STEPS in saved


def test_checkpoint_from_8_devices_resumes_on_1(full_run, data_dir, tmp_path):
  """Stop on the 2x4 mesh, then finish in a process that has a single device."""
  workdir = str(tmp_path / "one")
  s = full_run["settings"]
  with pytest.raises(Preempted):
    run(s, workdir, should_stop=lambda stage, step: (stage, step) == ("router", 4))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = train_cli(
    workdir,
    f"data.data_dir={data_dir}",
    f"data.files=('{NEWS}',)",
    "mesh.data=1",
    "mesh.fsdp=1",
    f"train.forecaster.steps={STEPS}",
    f"train.router.steps={STEPS}",
    "train.checkpoint_every=3",
    "routing.sparsity=0.75",
    "train.eval_batches=1",
    "train.log_every=1",
    cwd=str(tmp_path),
    env=env,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "1 cpu device(s)" in out.stdout
  assert "[router] resumed from batch 4" in out.stdout
  assert "[forecaster] already finished" in out.stdout
  # Same data, same updates; only the reduction order over devices differs.
  a, b = _adapters(workdir, "router", STEPS), _adapters(full_run["workdir"], "router", STEPS)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_run_result_restores_onto_one_device(full_run):
  dev = jax.devices()[:1]
  mesh = sh.make_mesh(sh.MeshConfig(data=1), devices=dev)
  model_state = run_result(full_run["workdir"], mesh)
  got = _leaves(model_state.state)
  for path, (t, v) in full_run["final"].items():
    np.testing.assert_array_equal(got[path][1], v, err_msg=path)
  assert {d for leaf in jax.tree.leaves(model_state.state) for d in leaf.devices()} == set(dev)


def test_eval_reports_dense_and_routed_perplexity(full_run):
  ev = json.load(open(os.path.join(full_run["workdir"], "eval.json")))
  assert ev["dense"]["tokens"] == ev["routed"]["tokens"] > 0
  assert ev["policy"] == "informed" and ev["sparsity"] == 0.75
  assert abs(ev["routed"]["realized_sparsity"] - 0.75) < 0.02
  assert np.isclose(np.exp(ev["dense"]["nll"]), ev["dense"]["perplexity"])


def test_lora_stage_from_another_run_trains_only_lora(full_run, data_dir, tmp_path):
  cfg = tiny_config(
    data_dir,
    **{
      "train.stages": "lora",
      "train.init_from": full_run["workdir"],
      "train.lora.steps": 6,
      "train.eval_batches": 0,
    },
  )
  s = settings_from_config(cfg)
  assert s.model.lora_rank == 4
  summary = run(s, str(tmp_path / "lora"))
  after = _leaves(summary.pop("state").state)
  n_lora = 0
  for path, (t, v) in after.items():
    if t is LoraParam:
      n_lora += 1
      if path.endswith("/b"):  # B starts at zero; training moved it
        assert np.abs(v).max() > 0, path
    else:  # base weights, forecasters, routers and thresholds as the other run left them
      np.testing.assert_array_equal(v, full_run["final"][path][1], err_msg=path)
  assert n_lora == 6  # a and b of q, v and the MLP gate
  losses = [r["loss"] for r in _metrics(str(tmp_path / "lora"))["lora"]]
  assert len(losses) == 6 and np.isfinite(losses).all()


def test_distill_stage_from_another_run_trains_only_forecasters(full_run, data_dir, tmp_path):
  cfg = tiny_config(
    data_dir,
    **{
      "train.stages": "distill",
      "train.init_from": full_run["workdir"],
      "train.distill.steps": 4,
      "train.eval_batches": 0,
    },
  )
  summary = run(settings_from_config(cfg), str(tmp_path / "distill"))
  after = _leaves(summary.pop("state").state)
  n_moved = 0
  for path, (t, v) in after.items():
    if t is ForecasterParam:
      n_moved += int(not np.array_equal(v, full_run["final"][path][1]))
    else:  # base weights, routers, thresholds and the table as the other run left them
      np.testing.assert_array_equal(v, full_run["final"][path][1], err_msg=path)
  assert n_moved == 8  # w1, b1, w2, b2 of both units' forecasters (stacked over layers)
  losses = [r["loss"] for r in _metrics(str(tmp_path / "distill"))["distill"]]
  assert len(losses) == 4 and np.isfinite(losses).all() and min(losses) >= 0


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
  "args, expect",
  [
    (["--config.train.bogus=1"], "unknown field"),
    (["--config.mesh.data=3"], "needs 3 devices but 8 are available"),
    (
      ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.data.batch_size=6"],
      "not divisible by the 8 data shards",
    ),
    (["--config.train.stages=forecaster,prune"], "train.stages must list stages"),
    (["--config.routing.sparsity=1.5"], "routing.sparsity must be a number in [0, 1]"),
  ],
)
def test_bad_config_is_one_line_before_compiling(args, expect, tmp_path):
  t0 = time.time()
  out = train_cli(str(tmp_path / "w"), *args, cwd=str(tmp_path), timeout=120)
  assert out.returncode == 2, out.stderr
  assert expect in out.stderr
  assert "Traceback" not in out.stderr
  assert out.stderr.startswith("ir_jax.train: error:")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
  assert time.time() - t0 < 60


def test_workdir_of_another_model_is_refused(full_run, data_dir):
  cfg = tiny_config(data_dir, **{"model.hidden_size": 32})
  with pytest.raises(ConfigError, match="different model .*hidden_size 64 vs 32"):
    run(settings_from_config(cfg), full_run["workdir"])


def test_unknown_field_in_a_config_file_is_refused(data_dir):
  cfg = tiny_config(data_dir)
  cfg.train.forecaster.unlock()
  cfg.train.forecaster.stepz = 3
  with pytest.raises(ConfigError, match=r"unknown train.forecaster config fields \['stepz'\]"):
    settings_from_config(cfg)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  # Adam's normalised steps of size 1e30 blow the forecasters up on step 2.
  cfg = tiny_config(
    data_dir,
    **{
      "train.stages": "forecaster",
      "train.checkpoint_every": 1,
      "train.forecaster.learning_rate": 1e30,
      "train.forecaster.grad_clip": 0.0,
    },
  )
  workdir = str(tmp_path / "nan")
  with pytest.raises(
    TrainingError,
    match=r"loss is (nan|inf) at step (\d+).*last good checkpoint "
    r"is batch (\d+)",
  ) as e:
    run(settings_from_config(cfg), workdir)
  import re

  bad, good = map(int, re.search(r"at step (\d+).*batch (\d+)", str(e.value)).groups())
  assert good == bad - 1
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "forecaster"))
  assert mgr.latest_step() == good
  for k, v in _adapters(workdir, "forecaster", good).items():
    assert np.isfinite(v).all(), k


def test_sigterm_saves_then_exits_and_rerun_finishes(data_dir, tmp_path):
  workdir = str(tmp_path / "term")
  overrides = [
    f"data.data_dir={data_dir}",
    f"data.files=('{NEWS}',)",
    "train.stages=forecaster",
    "train.forecaster.steps=400",
    "train.checkpoint_every=1000",
    "train.log_every=1",
    "train.eval_batches=0",
    "mesh.data=-1",
  ]
  proc = subprocess.Popen(
    train_argv(workdir, *overrides, python=(sys.executable, "-u")),
    cwd=str(tmp_path),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  for line in proc.stdout:  # wait until training is under way
    if line.startswith("[forecaster 3/"):
      break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  assert "rerun the same command to resume" in err
  mgr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints", "forecaster"))
  stopped = mgr.latest_step()
  assert stopped is not None and 3 <= stopped < 400
  out = train_cli(
    workdir, *overrides, f"train.forecaster.steps={stopped + 2}", cwd=str(tmp_path), timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"resumed from batch {stopped}" in out.stdout


@pytest.mark.parametrize("missing", [("capacity", "calibrated_for"), ("calibrated_for",)])
def test_checkpoints_from_before_capacity_tables_still_load(full_run, tmp_path, missing):
  """A router checkpoint without `capacity` and `calibrated_for` leaves (written before
  tables existed), or without `calibrated_for` alone (before calibration records), loads;
  the missing leaves are NO_TABLE (uniform routing, thresholds to recalibrate) and every
  other adapter is bitwise the same."""
  import shutil

  from ir_jax import routing as R
  from ir_jax.train import integrity

  work = str(tmp_path / "old")
  shutil.copytree(full_run["workdir"], work)
  total = full_run["settings"].train.router.steps
  sdir = os.path.join(work, "checkpoints", "router")
  path = os.path.join(sdir, str(total), "adapters")
  tree = ocp.PyTreeCheckpointer().restore(path)
  for key in missing:
    assert key in tree["routing"]
    del tree["routing"][key]
  shutil.rmtree(path)
  ocp.PyTreeCheckpointer().save(path, tree)
  integrity.write_record(sdir, total)
  model = nnx.merge(
    *(lambda model_state: (model_state.graphdef, model_state.state))(run_result(work))
  )
  assert R.model_table(model) is None
  got = _leaves(nnx.state(model))
  for k, (kind, v) in full_run["final"].items():
    if k.startswith("routing/") and k.split("/")[1] in missing:
      assert (np.asarray(got[k][1]) == -1.0).all(), k
    else:
      np.testing.assert_array_equal(got[k][1], v, err_msg=k)
