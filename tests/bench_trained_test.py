"""`python -m ir_jax.bench --checkpoint/--workdir`: a trained model's own table, timed.

A tiny checkpoint carries a per-unit capacity table (one unit executed, one
forecast, two routed) and the sparsity it was trained at. Checked: the table
routed at each length, each ideal as 1 / the executed FLOPs fraction counted by
hand from the per-token costs, decode after a full prompt at the table's
per-unit rates, and the JSON's `speed` summary; a FLOPs budget (what a workdir
routes by) moves the table to the budget at each length. No timing thresholds.
(The tiny model's forecasters cost as much as its units: it is not faster routed.)
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ir_jax import bench, checkpoint
from ir_jax import bench_trained as BT
from ir_jax import routing as R
from ir_jax.config import ConfigError
from ir_jax.forecast import ForecasterParam
from ir_jax.model import init_model

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

TABLE = ((1.0, 0.25), (0.25, 0.0))  # [layer][attention, MLP]; mean sparsity 0.625


def _hand_fraction(cfg, table, t: int) -> float:
  """Executed FLOPs fraction of a top-k prefill of t tokens at `table` (k = c x t rounded,
  k_multiple 1), from the per-token costs written out here."""
  d, h, n, k, f = (
    cfg.hidden_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.intermediate_size,
  )
  c = R.token_flops(cfg, t)
  q_o, kv, core, mlp = 4 * d * h * k, 4 * d * n * k, 4 * (t + 1) / 2 * h * k, 6 * d * f
  assert (q_o, kv, core, mlp) == (c["q_o"], c["kv"], c["core"], c["mlp"])
  dense = cfg.num_layers * (q_o + kv + core + mlp) + c["head"]
  slots = max(1, -(-t // 64))
  run = c["head"]
  for row in table:
    for u, cap in enumerate(row):
      unit = q_o + core if u == 0 else mlp
      always = kv if u == 0 else 0.0
      if cap >= 1:
        run += always + unit
      elif cap <= 0:
        run += c["lff"] + (always + unit) * slots / t
      else:
        kk = round(cap * t)
        run += always + c["lff"] + c["router"] + unit * kk / t
  return run / dense


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  cfg = bench.load_model_config("configs/tiny.py")
  model = init_model(cfg, seed=1)
  rng = np.random.RandomState(2)
  for _, var in nnx.to_flat_state(nnx.state(model.routing, nnx.Param)):
    std = 0.05 if isinstance(var, ForecasterParam) else 1.0
    var[...] = jnp.asarray(std * rng.randn(*var.shape), var[...].dtype)
  model.routing.capacity[...] = jnp.asarray(TABLE, jnp.float32)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  routing = dict(policy="informed", sparsity=0.625, k_multiple=1)
  path = checkpoint.save(str(tmp_path_factory.mktemp("bt") / "tiny"), cfg, params, routing=routing)
  return path, cfg, model


def test_flops_budget_moves_the_table_to_each_length(ckpt):
  _, cfg, model = ckpt
  budget = R.flops(cfg, R.RoutingSpec(capacities=TABLE), 128)["executed_fraction"]
  spec = R.RoutingSpec(policy="informed", flops=budget)
  at128 = BT.spec_for(model, spec, 128, 1)
  at64 = BT.spec_for(model, spec, 64, 1)
  assert at64.mode == "topk" and at64.k_multiple == 1
  np.testing.assert_allclose(at128.capacities, TABLE)  # the length it was allocated at
  assert at64.capacities != at128.capacities
  hand = _hand_fraction(cfg, at64.capacities, 64)
  assert budget - 1 / 64 <= hand <= budget + 0.005  # the budget, to a token per unit
  assert at64.capacities[0][0] == 1.0 and at64.capacities[1][1] == 0.0  # forms kept


def test_checkpoint_table_timed_at_two_lengths_and_decode(ckpt, tmp_path, capsys):
  path, cfg, _ = ckpt
  out = tmp_path / "trained.json"
  argv = ["--checkpoint", path, "--seq-lens", "64,128", "--decode-steps", "4"]
  argv += ["--reps", "2", "--warmup", "0", "--quiet", "--json", str(out)]
  assert bench.main(argv) == 0
  printed = capsys.readouterr().out
  assert "prefill 1 x 64" in printed and "decode 1 row x 4 steps at 124-127" in printed
  r = json.loads(out.read_text())
  assert r["kind"] == "trained" and r["seq_lens"] == [64, 128] and r["k_multiple"] == 1
  assert r["routing"]["sparsity"] == 0.625 and r["routing"]["flops"] == 0
  p64, p128 = r["prefill"]
  assert [p64["seq_len"], p128["seq_len"]] == [64, 128]
  for p in (p64, p128):
    t = p["seq_len"]
    np.testing.assert_allclose(p["capacities"], TABLE)  # already at the run's sparsity
    hand = _hand_fraction(cfg, TABLE, t)
    assert math.isclose(p["executed_fraction"], hand, rel_tol=1e-9)
    assert math.isclose(p["ideal_speedup"], 1 / hand, rel_tol=1e-9)
    assert math.isclose(p["efficiency"], p["speedup"] / p["ideal_speedup"], rel_tol=1e-9)
    assert len(p["dense"]["times_s"]) == 2 and len(p["routed"]["times_s"]) == 2
    assert p["routed"]["peak_bytes"] > 0 and p["speedup"] > 0
  d = r["decode"]
  assert (d["cache_len"], d["first_position"], d["steps"]) == (128, 124, 4)
  rate = np.asarray(d["exec_rate"])
  caps = np.asarray(d["capacities"])
  # executed units always run, forecast ones never (no segment start after position 0)
  np.testing.assert_array_equal(rate[caps >= 1], 1.0)
  np.testing.assert_array_equal(rate[caps <= 0], 0.0)
  assert math.isclose(d["realized_sparsity"], 1 - rate.mean())
  keys = 124 + (4 + 1) / 2  # a step at position p attends p + 1 keys
  spec = R.RoutingSpec(mode="causal", capacities=tuple(map(tuple, rate.tolist())))
  want = R.flops(cfg, spec, int(2 * keys - 1))["ideal_fraction"]
  assert R.token_flops(cfg, int(2 * keys - 1))["core"] == 4 * keys * cfg.num_heads * cfg.head_dim
  assert math.isclose(d["ideal_fraction"], want) and math.isclose(d["ideal_speedup"], 1 / want)
  assert r["speed"] == {
    "prefill_64": p64["speedup"],
    "prefill_128": p128["speedup"],
    "prefill_64_ideal": p64["ideal_speedup"],
    "prefill_128_ideal": p128["ideal_speedup"],
    "decode": d["speedup"],
    "decode_ideal": d["ideal_speedup"],
  }


def test_bad_paths_and_lengths_are_one_line_errors(ckpt, tmp_path):
  path, cfg, _ = ckpt
  with pytest.raises(ConfigError, match="no run.json"):
    bench.main(["--workdir", str(tmp_path)])
  with pytest.raises(ConfigError, match="not both"):
    bench.main(["--workdir", str(tmp_path), "--checkpoint", path])
  with pytest.raises(ConfigError, match="max_position_embeddings"):
    bench.main(["--checkpoint", path, "--seq-lens", f"64,{cfg.max_position_embeddings + 1}"])
