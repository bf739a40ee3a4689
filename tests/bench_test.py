"""`python -m ir_jax.bench` runs end to end on the tiny preset and writes well-formed JSON.

No timing thresholds: timings depend on the machine. The numbers that do not
(FLOPs fractions, realized sparsity, HLO structure) are checked.
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from ir_jax import bench
from ir_jax import routing as R
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.model import init_model

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'


def test_tiny_preset_end_to_end(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert (
    bench.main(
      [
        "--preset",
        "tiny",
        "--sparsity",
        "0.4",
        "--reps",
        "2",
        "--warmup",
        "1",
        "--decode-steps",
        "4",
        "--quiet",
        "--json",
        str(out),
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert "prefill 2 x 64 tokens" in printed and "decode 2 row(s) x 4 steps" in printed
  r = json.loads(out.read_text())
  assert r["preset"] == "tiny" and r["batch"] == 2 and r["seq_len"] == 64
  assert r["sparsities"] == [0.4] and r["reps"] == 2
  names = {
    "prefill/dense",
    "prefill/routed@0.4",
    "prefill/mask@0.4",
    "decode/dense",
    "decode/routed@0.4",
    "decode/rows@0.4",
  }
  assert set(r["variants"]) == names
  for name, v in r["variants"].items():
    assert len(v["times_s"]) == 2 and all(t > 0 for t in v["times_s"]), name
    assert v["time_s"]["min"] <= v["time_s"]["median"] <= v["time_s"]["max"]
    assert v["tokens_per_s"] > 0 and v["memory"]["peak_bytes"] > 0
    assert v["memory"]["argument_bytes"] > 0 and v["compile_s"] > 0
  assert r["variants"]["prefill/dense"]["tokens"] == 2 * 64
  assert r["variants"]["decode/dense"]["tokens"] == 2 * 4
  assert [p["sparsity"] for p in r["prefill"]] == [0.4]
  assert [d["sparsity"] for d in r["decode"]] == [0.4]
  cfg = LlamaConfig(**r["model"])
  for p in r["prefill"]:
    spec = R.RoutingSpec(sparsity=p["sparsity"], k_multiple=r["k_multiple"])
    fl = R.flops(cfg, spec, 64, 2)
    assert math.isclose(p["ideal_speedup"], 1 / fl["executed_fraction"], rel_tol=1e-9)
    assert math.isclose(p["efficiency"], p["speedup"] / p["ideal_speedup"], rel_tol=1e-9)
    k = spec.k(64, 0, 0)
    assert k == 40  # capacity 0.6 x 64 = 38.4 -> 38, rounded up to a multiple of 8
    assert math.isclose(p["realized_sparsity"], 1 - k / 64)
    assert p["mask"]["executed_fraction"] > 1.0  # every unit plus forecasters and routers
    for key in ("speedup", "tokens_per_s", "peak_bytes"):
      assert p["mask"][key] > 0
  for d in r["decode"]:
    assert 0.0 <= d["realized_sparsity"] <= 1.0
    assert d["ideal_speedup"] > 0 and d["speedup"] > 0 and d["executed_fraction"] > 0
  # The gathered program gathers and scatters; the mask program runs the MLP on all rows.
  assert r["variants"]["prefill/routed@0.4"]["hlo"]["scatter"] >= 2
  assert r["variants"]["decode/routed@0.4"]["hlo"]["conditional"] >= 2


def test_decode_only_row_capacity(tmp_path, capsys):
  """--no-prefill times decode only; static row capacity at 4 rows and sparsity 0.7 runs
  ceil(0.3 x 4) = 2 rows per unit after the all-sink first step: realized 3/4 x 1/2."""
  out = tmp_path / "bench.json"
  assert (
    bench.main(
      [
        "--preset",
        "tiny",
        "--batch",
        "4",
        "--sparsity",
        "0.7",
        "--reps",
        "1",
        "--decode-steps",
        "4",
        "--no-prefill",
        "--quiet",
        "--json",
        str(out),
      ]
    )
    == 0
  )
  assert "static row capacity" in capsys.readouterr().out
  r = json.loads(out.read_text())
  assert set(r["variants"]) == {"decode/dense", "decode/routed@0.7", "decode/rows@0.7"}
  assert r["prefill"] == [] and "prefill" not in r["dense"]
  (row,) = r["decode_rows"]
  assert math.isclose(row["realized_sparsity"], 3 / 4 * (1 - 2 / 4))
  assert math.isclose(row["executed_fraction"], row["ideal_fraction"])
  assert r["variants"]["decode/rows@0.7"]["exec_rate"] == [[5 / 8, 5 / 8]] * 2


def test_capacity_table(tmp_path):
  """--capacities routes prefill by the table rescaled to the sparsity (k per unit)."""
  path = tmp_path / "table.json"
  path.write_text(json.dumps({"capacities": [[0.5, 0.5], [1.0, 0.2]]}))
  out = tmp_path / "bench.json"
  assert (
    bench.main(
      [
        "--preset",
        "tiny",
        "--sparsity",
        "0.4",
        "--reps",
        "1",
        "--decode-steps",
        "0",
        "--no-mask",
        "--capacities",
        str(path),
        "--quiet",
        "--json",
        str(out),
      ]
    )
    == 0
  )
  (p,) = json.loads(out.read_text())["prefill"]
  # Table sparsities (0.5, 0.5, 0, 0.8), mean 0.45, scaled by 0.4 / 0.45; k rounded up to 8s.
  caps = [[1 - 0.5 * 0.4 / 0.45] * 2, [1.0, 1 - 0.8 * 0.4 / 0.45]]
  ks = [min(64, -(-round(c * 64) // 8) * 8) for row in caps for c in row]
  assert ks == [40, 40, 64, 24]
  assert math.isclose(p["realized_sparsity"], 1 - sum(ks) / (4 * 64))
  path.write_text(json.dumps([[0.5, 0.5]]))
  with pytest.raises(ConfigError, match="has 1 rows; the model has 2 layers"):
    bench.main(["--preset", "tiny", "--capacities", str(path), "--quiet"])
  path.write_text(json.dumps([[0.5, 1.5], [1, 1]]))
  with pytest.raises(ConfigError, match=r"expected a list of \[attention, MLP\]"):
    bench.main(["--preset", "tiny", "--capacities", str(path), "--quiet"])


def test_bad_arguments_are_config_errors():
  with pytest.raises(ConfigError, match="sparsity"):
    bench.main(["--preset", "tiny", "--sparsity", "1.5", "--quiet"])
  with pytest.raises(ConfigError, match="decode-steps"):
    bench.main(["--preset", "tiny", "--decode-steps", "100", "--quiet"])
  with pytest.raises(ConfigError, match="nothing to time"):
    bench.main(["--preset", "tiny", "--decode-steps", "0", "--no-prefill", "--quiet"])


def test_decode_skip_equals_full_forward_last_position():
  """Decoding with units skipped by lax.cond gives a full causal forward's logits (one row,
  so a unit either runs for the token or is not computed at all)."""
  cfg = LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    lff_rank=8,
    router_hidden=8,
  )
  model = init_model(cfg, seed=3)
  spec = R.RoutingSpec(policy="informed", sparsity=0.5, mode="causal")
  rng = np.random.default_rng(0)
  R.calibrate_thresholds(model, [jnp.asarray(rng.integers(0, 61, (4, 24)), jnp.int32)], spec)
  toks = jnp.asarray(rng.integers(0, 61, (1, 12)), jnp.int32)
  cache = R.init_cache(cfg, 1, 12)
  gates = []
  for i in range(12):
    logits, cache, g = R.decode_step(model, cache, toks[:, i], jnp.int32(i), spec)
    gates.append(np.asarray(g))
  gates = np.stack(gates)
  assert 0 < gates.mean() < 1  # some units skipped, some run
  full = np.asarray(model(toks, routing=spec))
  np.testing.assert_allclose(np.asarray(logits), full[:, -1], atol=1e-4, rtol=0)


def test_two_depth_extrapolation():
  """Costs linear in depth (a fixed part + identical layers): the per-layer cost by
  difference and the cost at the full depth are exact, whatever two depths are compiled."""
  from ir_jax.bench_tpu import extrapolate, per_layer

  cost = lambda n: {"flops": 1000.0 + 250.0 * n, "bytes": 64.0 + 8.0 * n, "compile_s": 9.0}
  for a, b in ((1, 2), (2, 4), (1, 4)):
    assert per_layer(cost(a), cost(b), (a, b)) == {"flops": 250.0, "bytes": 8.0}
    assert extrapolate(cost(a), cost(b), (a, b), 32) == {
      "flops": cost(32)["flops"],
      "bytes": cost(32)["bytes"],
    }
