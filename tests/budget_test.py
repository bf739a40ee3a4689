"""Executed-FLOPs budgets: allocation, the static policy, calibration on packed batches,
and the LoRA stage's routing (ir_jax.routing.budget, .calibrate, ir_jax.train.stages)."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config

from ir_jax import routing as R
from ir_jax.config import ConfigError, LlamaConfig
from tests.routing_test import CFG, SMOL, make_model, tokens


def _problem(seed: int, cfg: LlamaConfig = SMOL, n: int = 400):
  """Heavy-tailed per-unit damages and error shapes from random token errors and scores."""
  rng = np.random.RandomState(seed)
  damage = np.exp(rng.randn(cfg.num_layers, 2) * 1.5) * 0.01
  err = np.exp(rng.randn(cfg.num_layers, 2, n))
  scores = np.log(err) + rng.randn(cfg.num_layers, 2, n)  # informative, imperfect routers
  return damage, R.error_shape(scores, err)


def _estimate(table, damage, shape):
  """Estimated damage of a table under the allocator's model, by a plain loop."""
  total = 0.0
  n = shape.shape[-1] - 1
  for l, u in itertools.product(range(table.shape[0]), range(2)):
    c = table[l, u]
    if c >= 1:
      continue
    if c <= 0:
      total += damage[l, u]
      continue
    pos = (1 - c) * n
    lo = int(np.floor(pos))
    frac = shape[l, u, min(lo, n)] + (pos - lo) * (shape[l, u, min(lo + 1, n)] - shape[l, u, lo])
    total += damage[l, u] * frac
  return total


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("budget", [0.9, 0.8, 0.7])
def test_flops_table_meets_its_budget_and_beats_static(seed, budget):
  damage, shape = _problem(seed)
  table = R.allocate_flops(SMOL, 256, budget, damage, shape)
  spec = R.RoutingSpec(capacities=tuple(map(tuple, table)))
  got = R.flops(SMOL, spec, 256)["executed_fraction"]
  assert abs(got - budget) <= 0.005, (got, budget)
  static = R.allocate_flops(SMOL, 256, budget, damage, None, policy="static", routed=False)
  assert set(np.unique(static)) <= {0.0, 1.0}
  s_spec = R.RoutingSpec(policy="static", capacities=tuple(map(tuple, static)))
  s_got = R.flops(SMOL, s_spec, 256)["executed_fraction"]
  assert budget - 0.02 <= s_got <= budget + 1e-9
  # The routed table contains every static choice, so it is never estimated worse.
  assert _estimate(table, damage, shape) <= _estimate(static, damage, shape) + 1e-12


def test_static_allocation_is_the_best_subset_on_a_small_model():
  # 2 layers x 2 units: every one of the 16 execute/forecast choices, checked by brute force.
  cfg = tiny_llama_config(
    vocab_size=64, hidden_size=64, intermediate_size=256, num_heads=4, num_kv_heads=2
  )
  rng = np.random.RandomState(3)
  for _ in range(20):
    damage = rng.exponential(size=(2, 2))
    budget = rng.uniform(0.45, 0.95)
    best, best_d = None, np.inf
    for bits in itertools.product((0.0, 1.0), repeat=4):
      t = np.array(bits).reshape(2, 2)
      spec = R.RoutingSpec(policy="static", capacities=tuple(map(tuple, t)))
      if R.flops(cfg, spec, 32)["executed_fraction"] <= budget + 1e-12:
        d = float(damage[t == 0].sum())
        if d < best_d:
          best, best_d = t, d
    if best is None:
      with pytest.raises(ConfigError, match="below the cheapest table"):
        R.allocate_flops(cfg, 32, budget, damage, None, policy="static", routed=False)
      continue
    got = R.allocate_flops(cfg, 32, budget, damage, None, policy="static", routed=False)
    assert float(damage[got == 0].sum()) == pytest.approx(best_d)


def test_table_for_flops_moves_a_table_and_keeps_the_trained_one():
  damage, shape = _problem(5)
  table = R.allocate_flops(SMOL, 256, 0.8, damage, shape)
  same = np.asarray(R.table_for_flops(SMOL, table, 0.8, 256))
  np.testing.assert_array_equal(same, table)
  for target in (0.9, 0.7):
    moved = R.table_for_flops(SMOL, table, target, 256)
    got = R.flops(SMOL, R.RoutingSpec(capacities=moved), 256)["executed_fraction"]
    assert abs(got - target) < 2e-3
    assert all(m[u] == 1.0 for m, t in zip(moved, table) for u in range(2) if t[u] == 1.0)


def test_trained_spec_resolves_a_flops_budget_and_refuses_without_a_table():
  m = make_model()
  spec = R.RoutingSpec(flops=0.8)
  with pytest.raises(ConfigError, match="needs the model's capacity table"):
    R.trained_spec(m, spec, seq_len=32)
  damage, shape = _problem(2, CFG)
  table = R.allocate_flops(CFG, 32, 0.8, damage, shape)
  m.routing.capacity[...] = jnp.asarray(table, jnp.float32)
  got = R.trained_spec(m, spec, seq_len=32)
  np.testing.assert_allclose(np.asarray(got.capacities), table, atol=1e-7)
  with pytest.raises(ValueError, match="seq_len"):
    R.trained_spec(m, spec)
  with pytest.raises(ConfigError, match="static"):
    R.RoutingSpec(policy="static", sparsity=0.5)


def test_calibration_on_a_packed_batch_equals_separate_documents():
  # One layer, attention executed (capacity 1) and the MLP routed at 0.5: the MLP's scores
  # depend only on each document's own tokens when segments and positions are honoured.
  cfg = CFG.replace(num_layers=1)
  m = make_model(cfg)
  spec = R.RoutingSpec(capacities=((1.0, 0.5),))
  docs = np.asarray(tokens(2, 16, 4))
  packed = {
    "inputs": docs.reshape(1, 32),
    "positions": np.tile(np.arange(16), 2)[None],
    "segment_ids": np.repeat([1, 2], 16)[None],
  }
  separate = R.calibrate_thresholds(m, [docs], spec).copy()
  together = R.calibrate_thresholds(m, [packed], spec).copy()
  np.testing.assert_allclose(together, separate, rtol=0, atol=1e-6)
  # Without segment ids and positions the second document attends to the first.
  blind = R.calibrate_thresholds(m, [packed["inputs"]], spec)
  assert not np.allclose(blind[0, 1], separate[0, 1], atol=1e-4)


def test_lora_trains_under_the_routing_it_is_evaluated_with(tmp_path):
  from ir_jax.config_file import load_config
  from ir_jax.train.config import settings_from_config
  from ir_jax.train.stages import STAGES, stage_settings

  cfg = load_config("configs/tiny.py")
  cfg.routing.flops = 0.8
  s = settings_from_config(cfg)
  mcfg = s.model if hasattr(s, "model") else None
  m = make_model(mcfg) if isinstance(mcfg, LlamaConfig) else None
  if m is None:
    pytest.skip("settings carry no model config")
  seq = s.stage_data("lora").seq_len
  damage, shape = _problem(7, m.config)
  table = R.allocate_flops(m.config, seq, 0.8, damage, shape)
  m.routing.capacity[...] = jnp.asarray(table, jnp.float32)
  lora_spec = STAGES["lora"].spec(stage_settings(s, "lora", m))
  eval_spec = R.trained_spec(m, s.routing.inference(), seq_len=seq)
  assert lora_spec == eval_spec
  np.testing.assert_allclose(np.asarray(lora_spec.capacities), table, atol=1e-7)
  assert lora_spec.mode == "topk" and lora_spec.gate == "hard"


@pytest.mark.parametrize("flops", [0.0, 0.8])
def test_router_steps_gate_as_evaluation_does(flops):
  # The router stage trains under the table its fit allocated (train_stage asks
  # stage_settings after the fit): with straight-through gates (hard top-k forward) a
  # router step executes exactly the tokens evaluation executes with the trained table.
  from ir_jax.config_file import load_config
  from ir_jax.train.config import settings_from_config
  from ir_jax.train.stages import STAGES, stage_settings

  cfg = load_config("configs/tiny.py")
  cfg.routing.flops = flops
  cfg.train.router.gate = "ste"
  s = settings_from_config(cfg)
  m = make_model(s.model)
  seq = s.stage_data("router").seq_len
  if flops:
    damage, shape = _problem(7, m.config)
    table = R.allocate_flops(m.config, seq, flops, damage, shape)
  else:  # pair sparsity 0.4, routing.sparsity of configs/tiny.py
    table = np.array([[0.5, 0.75], [0.375, 0.775]])
  m.routing.capacity[...] = jnp.asarray(table, jnp.float32)
  toks = tokens(2, seq, vocab=m.config.vocab_size)

  def gates(spec: R.RoutingSpec) -> np.ndarray:
    _, aux = R.routed_forward(m, toks, None, None, spec, return_aux=True)
    return np.asarray(aux["gate_BxT"])

  eval_spec = R.trained_spec(m, s.routing.inference(), seq_len=seq)
  router_spec = STAGES["router"].spec(stage_settings(s, "router", m))
  assert router_spec.gate == "ste" and router_spec.capacities == eval_spec.capacities
  np.testing.assert_allclose(np.asarray(router_spec.capacities), table, atol=1e-6)
  np.testing.assert_array_equal(gates(router_spec), gates(eval_spec))
  # Before the fit there is no table to read, and the configured routing gates uniformly.
  assert not np.array_equal(gates(STAGES["router"].spec(s)), gates(eval_spec))
  # Gumbel gates sample, but route by the same table.
  cfg.train.router.gate = "gumbel"
  s_gumbel = settings_from_config(cfg)
  spec_g = STAGES["router"].spec(stage_settings(s_gumbel, "router", m))
  assert spec_g.gate == "gumbel" and spec_g.capacities == eval_spec.capacities


def test_forecast_only_attention_runs_its_slots_on_their_own_keys():
  # Rows of 128 tokens keep 2 sink slots; three documents start at 0, 50 and 90, so the
  # first two starts execute attention (each attends only to itself) and everything else
  # is forecast; the MLPs execute. Reference from the modules, attention over the row.
  import jax
  from flax import nnx

  m = make_model()
  t = 128
  starts = (0, 50, 90)
  seg = np.zeros(t, np.int32)
  pos = np.zeros(t, np.int32)
  for i, s0 in enumerate(starts):
    end = starts[i + 1] if i + 1 < len(starts) else t
    seg[s0:end] = i + 1
    pos[s0:end] = np.arange(end - s0)
  toks = tokens(1, t, 9)
  pos_, seg_ = jnp.asarray(pos[None]), jnp.asarray(seg[None])
  spec = R.RoutingSpec(capacities=((0.0, 1.0),) * CFG.num_layers)
  ours = np.asarray(m(toks, pos_, seg_, routing=spec))
  index = jnp.arange(t)[None]
  gd, st = nnx.split(m.layers)
  rgd, rst = nnx.split(m.routing)
  x = m.embed(toks)
  for l in range(CFG.num_layers):
    layer = nnx.merge(gd, jax.tree.map(lambda a: a[l], st))
    routing_layer = nnx.merge(rgd, jax.tree.map(lambda a: a[l], rst))
    n = layer.input_layernorm(x)
    full = layer.self_attn(n, pos_, index, seg_)
    delta = routing_layer.attn_lff(n).at[:, [0, 50]].set(full[:, [0, 50]])
    x = x + delta
    x = x + layer.mlp(layer.post_attention_layernorm(x))
  np.testing.assert_allclose(ours, np.asarray(m.logits(x)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [0.9, 0.8])
def test_error_curve_table_meets_its_budget(budget):
  from ir_jax import fit

  rng = np.random.RandomState(11)
  err = np.exp(rng.randn(30, 2, 300))
  scores = np.log(err) + rng.randn(30, 2, 300)
  cost = R.unit_flops(SMOL, 256)
  table = R.budget.curves_for_flops(
    SMOL,
    256,
    budget,
    lambda sp: fit.allocate_curves(scores, err, sp, max_sparsity=0.875, unit_cost=cost),
  )
  spec = R.RoutingSpec(capacities=tuple(map(tuple, table)))
  assert abs(R.flops(SMOL, spec, 256)["executed_fraction"] - budget) <= 0.005
  assert table.min() >= 0.125 - 1e-9  # every unit keeps some execution


def test_a_static_run_can_ask_for_a_flops_budget():
  """policy static + routing.flops is a valid run config (its 0/1 table comes from the
  router stage's allocation); a static spec with neither a table nor 0/1 capacity is not."""
  from ir_jax.config_file import load_config
  from ir_jax.train.config import settings_from_config

  cfg = load_config("configs/tiny.py")
  cfg.routing.policy = "static"
  cfg.routing.flops = 0.8
  s = settings_from_config(cfg)
  assert s.routing.policy == "static" and s.routing.flops == 0.8
  with pytest.raises(ConfigError, match="static"):
    R.RoutingSpec(policy="static", sparsity=0.25)
  with pytest.raises(ConfigError, match="static"):
    R.RoutingSpec(policy="static", flops=0.8, capacities=((0.5, 1.0),) * 3)


@pytest.mark.slow
def test_static_run_at_a_flops_budget_trains_a_0_1_table_that_meets_it(tmp_path):
  import subprocess
  import sys

  wd = tmp_path / "static"
  cmd = [sys.executable, "-m", "ir_jax.train", "--config", "configs/tiny.py"]
  cmd += ["--workdir", str(wd), "--config.routing.policy=static", "--config.routing.flops=0.8"]
  cmd += ["--config.train.eval_batches=0", f"--config.data.data_dir={tmp_path / 'tfds'}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  from ir_jax import load_model

  m = load_model(str(wd))
  table = np.asarray(m.routing.capacity[...])
  assert set(np.unique(table)) <= {0.0, 1.0} and (table == 0).any()
  spec = R.trained_spec(m, R.RoutingSpec(policy="static", flops=0.8), seq_len=cfg_seq(wd))
  got = R.flops(m.config, spec, cfg_seq(wd))["executed_fraction"]
  # Within one unit's switch of the budget (a few units: coarse), and never far above it.
  from ir_jax.routing.budget import unit_step

  assert abs(got - 0.8) <= max(0.02, unit_step(m.config, cfg_seq(wd), "static")) + 1e-9


def cfg_seq(wd) -> int:
  import json

  run = json.loads((wd / "run.json").read_text())
  return int(run["config"]["data"]["seq_len"])
