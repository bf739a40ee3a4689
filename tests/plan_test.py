"""The routing plan against hand-worked forms, and the one routed layer it drives: scanned
and unrolled layers, prefill and decode, give the same outputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from routing_test import CFG, make_model, packed_row, tokens

from ir_jax import routing as R
from ir_jax.routing.plan import Form

TABLE = ((1.0, 0.5), (0.25, 0.75), (0.5, 0.0))


def test_prefill_plan_by_hand():
  spec = R.RoutingSpec(policy="informed", capacities=TABLE)
  plan = R.prefill_plan(CFG, spec, 16)
  # k = round(c x 16); capacity 0 keeps one sink slot (16 tokens < 64) and runs no router.
  assert plan.forms == (
    (Form(16, False), Form(8, False)),
    (Form(4, False), Form(12, False)),
    (Form(8, False), Form(1, True)),
  )
  assert plan.levels == (
    (Form(4, False), Form(8, False), Form(16, False)),
    (Form(1, True), Form(8, False), Form(12, False)),
  )
  np.testing.assert_array_equal(plan.level_index, [[2, 1], [0, 2], [1, 0]])
  np.testing.assert_array_equal(plan.caps, np.array(TABLE, np.float32))
  assert not plan.runs_all
  np.testing.assert_array_equal(plan.tokens(), [[16, 8], [4, 12], [8, 1]])
  # A uniform spec is the one-level case.
  uni = R.prefill_plan(CFG, R.RoutingSpec(sparsity=0.5), 16)
  assert uni.levels == ((Form(8, False),), (Form(8, False),))
  assert (uni.level_index == 0).all()
  # Every unit runs every token: causal thresholds, Gumbel gates, the oracle.
  for spec in (
    R.RoutingSpec(sparsity=0.5, mode="causal"),
    R.RoutingSpec(sparsity=0.5, gate="gumbel", compute="all"),
    R.RoutingSpec(policy="oracle", capacities=TABLE),
  ):
    assert (R.prefill_plan(CFG, spec, 16).tokens() == 16).all()


def test_decode_plan_by_hand():
  spec = R.RoutingSpec(policy="informed", capacities=TABLE)
  plan = R.decode_plan(CFG, spec, 8)
  # ceil(c x 8) rows; decode never uses the forecast-only form
  assert [[f.k for f in row] for row in plan.forms] == [[8, 4], [2, 6], [4, 0]]
  assert not any(f.forecast_only for row in plan.forms for f in row)
  causal = R.decode_plan(CFG, R.RoutingSpec(sparsity=0.5, mode="causal"), 8)
  assert causal.levels == ((Form(1, False),), (Form(1, False),))


def _decode(model, toks, spec):
  cache = R.init_cache(model.config, toks.shape[0], toks.shape[1])
  out = []
  for i in range(toks.shape[1]):
    logits, cache, _ = R.decode_step(model, cache, toks[:, i], jnp.int32(i), spec)
    out.append(np.asarray(logits))
  return np.stack(out, 1)


def test_table_decode_scanned_equals_unrolled_and_the_full_forward():
  """A per-layer table decodes with scanned layers (switching among each unit's forms) as
  with unrolled ones, and step by step as the full causal forward."""
  m = make_model()
  spec = R.RoutingSpec(policy="informed", capacities=TABLE, mode="causal")
  R.calibrate_thresholds(m, [tokens(4, 32, 7)], spec)
  toks = tokens(2, 10, 8)
  assert m.config.scan_layers
  scanned = _decode(m, toks, spec)
  full = np.asarray(m(toks, routing=spec))
  np.testing.assert_allclose(scanned, full, atol=1e-4, rtol=0)
  m.config = m.config.replace(scan_layers=False)
  unrolled = _decode(m, toks, spec)
  np.testing.assert_allclose(unrolled, scanned, atol=1e-5, rtol=0)
  dense = np.asarray(m(toks))
  assert np.abs(full - dense).max() > 1e-3  # routing changed the output


def test_uniform_spec_scanned_equals_unrolled():
  """The uniform spec is the one-level case of the same layer: scanned and unrolled
  layers run the same code per layer."""
  m = make_model()
  toks, pos, seg = packed_row()
  spec = R.RoutingSpec(policy="informed", sparsity=0.5)
  scanned, aux = m(toks, pos, seg, routing=spec, return_aux=True)
  m.config = m.config.replace(scan_layers=False)
  unrolled, aux_u = m(toks, pos, seg, routing=spec, return_aux=True)
  np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(aux["gate_BxT"]), np.asarray(aux_u["gate_BxT"]))
