"""Closed-form fits, sink protection and capacity tables against independent references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_llama_config
from flax import nnx
from routing_test import CFG, make_model, packed_row, tokens

from ir_jax import fit
from ir_jax import routing as R
from ir_jax.config import ConfigError
from ir_jax.forecast import Forecaster


def _batch(b: int, t: int, seed: int) -> dict:
  """Rows of two packed documents each, as the data pipeline makes them."""
  rng = np.random.RandomState(seed)
  toks = rng.randint(0, CFG.vocab_size, (b, t)).astype(np.int32)
  cut = t // 3
  pos = np.concatenate([np.arange(cut), np.arange(t - cut)])[None].repeat(b, 0).astype(np.int32)
  seg = np.concatenate([np.ones(cut), 2 * np.ones(t - cut)])[None].repeat(b, 0).astype(np.int32)
  targets = np.roll(toks, -1, 1)
  mask = np.ones((b, t), np.float32)
  mask[:, cut - 1] = mask[:, -1] = 0
  return dict(inputs=toks, targets=targets, positions=pos, segment_ids=seg, loss_mask=mask)


def test_solve_forecaster_recovers_a_low_rank_linear_map_through_silu():
  rng = np.random.RandomState(0)
  d, r, n = 24, 5, 4000
  x = rng.randn(n, d) * rng.uniform(0.5, 2.0, d) + rng.randn(d)
  true = rng.randn(d, r) @ rng.randn(r, d) / 4
  y = x @ true + rng.randn(d)
  m = dict(count=np.float64(n), sx=x.sum(0), sy=y.sum(0), xtx=x.T @ x, xty=x.T @ y)
  w = fit.solve_forecaster(m, rank=r, ridge=1e-9)
  lff = Forecaster(tiny_llama_config(hidden_size=d, lff_rank=r), nnx.Rngs(0))
  for k, v in w.items():
    getattr(lff, k)[...] = jnp.asarray(v, jnp.float32)
  pred = np.asarray(lff(jnp.asarray(x[:200], jnp.float32)))
  # The LFF is W2 silu(W1 x + b1) + b2: the offset keeps SiLU linear, so the exact
  # rank-r map comes back to float32 accuracy.
  np.testing.assert_allclose(pred, y[:200], atol=2e-3 * np.abs(y).max())


def test_solve_router_matches_numpy_least_squares():
  rng = np.random.RandomState(1)
  d, n = 10, 500
  x = rng.randn(n, d) + 3.0
  y = x @ rng.randn(d) + 0.3 * rng.randn(n) + 1.0
  m = dict(
    count=np.float64(n), sx=x.sum(0), xtx=x.T @ x, xty=x.T @ y, sy=y.sum(), syy=(y * y).sum()
  )
  got = fit.solve_router(m, ridge=1e-12)
  a = np.c_[x, np.ones(n)]
  coef = np.linalg.lstsq(a, y, rcond=None)[0]
  np.testing.assert_allclose(got["w"], coef[:d], rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(got["bias"], coef[d], rtol=1e-6)
  resid = y - a @ coef
  assert got["r2"] == pytest.approx(1 - resid.var() / y.var(), rel=1e-6)


def test_sink_tokens_always_execute_so_their_logits_are_dense():
  # A segment's first token attends only to itself; if every unit executes it, its
  # hidden state (hence logits) is the dense model's at any sparsity and policy.
  m = make_model()
  toks, pos, seg = packed_row()
  dense = np.asarray(m(toks, pos, seg))[0]
  starts = [0, 5, 14]  # packed_row: documents of 5, 9 and 7 tokens
  for policy in ("informed", "greedy", "random", "oracle"):
    for sparsity in (0.5, 0.85):
      out = np.asarray(m(toks, pos, seg, routing=R.RoutingSpec(policy=policy, sparsity=sparsity)))[
        0
      ]
      np.testing.assert_allclose(out[starts], dense[starts], atol=1e-5, rtol=0)
      assert np.abs(out[starts[0] + 1 : starts[1]] - dense[starts[0] + 1 : starts[1]]).max() > 1e-4
  # Causal mode: sinks pass any finite threshold.
  m.routing.threshold[...] = jnp.full(m.routing.threshold[...].shape, 1e6)
  m.routing.calibrated_for[...] = jnp.full(m.routing.calibrated_for[...].shape, 0.5)  # as if
  out = np.asarray(m(toks, pos, seg, routing=R.RoutingSpec(mode="causal", sparsity=0.5)))[0]
  np.testing.assert_allclose(out[starts], dense[starts], atol=1e-5, rtol=0)


def test_ordinary_token_explained_variance_equals_numpy():
  m = make_model()
  batch = _batch(2, 24, 3)
  got = fit.explained(fit.forecast_error(m, [batch]))
  # Reference: the unit inputs and outputs from the modules one layer at a time,
  # sums over ordinary tokens (real, not a segment start) in numpy float64.
  gd, st = nnx.split(m.layers)
  rgd, rst = nnx.split(m.routing)
  x = m.embed(jnp.asarray(batch["inputs"]))
  pos, seg = jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"])
  index = jnp.broadcast_to(jnp.arange(24), (2, 24))
  ordinary = np.ones((2, 24), bool)
  ordinary[:, 0] = ordinary[:, 8] = False
  want = np.zeros((CFG.num_layers, 2))
  for l in range(CFG.num_layers):
    layer = nnx.merge(gd, jax.tree.map(lambda a: a[l], st))
    routing_layer = nnx.merge(rgd, jax.tree.map(lambda a: a[l], rst))
    n = layer.input_layernorm(x)
    a = layer.self_attn(n, pos, index, seg)
    pairs = [(n, a, routing_layer.attn_lff)]
    x = x + a
    n2 = layer.post_attention_layernorm(x)
    mo = layer.mlp(n2)
    pairs.append((n2, mo, routing_layer.mlp_lff))
    x = x + mo
    for u, (nn, uu, lff) in enumerate(pairs):
      f = np.asarray(lff(nn), np.float64)[ordinary]
      uu = np.asarray(uu, np.float64)[ordinary]
      want[l, u] = 1 - ((f - uu) ** 2).sum() / (uu**2).sum()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fitted_forecasters_beat_the_untrained_ones_and_routers_rank_error():
  m = make_model(lff_std=1e-3)
  batches = [_batch(4, 32, s) for s in range(4)]
  before = fit.explained(fit.forecast_error(m, batches[3:]))
  fit.set_forecasters(m, fit.forecaster_moments(m, batches[:3]), ridge=1e-2)
  after = fit.explained(fit.forecast_error(m, batches[3:]))
  assert (after > 0.05).all() and (after > before + 0.1).all(), (before, after)
  r2 = fit.set_routers(m, fit.router_moments(m, batches[:3]), ridge=1e-2)
  assert (r2 > 0).all()


def test_allocate_hits_the_target_mean_and_favours_cheap_units():
  dmg = np.array([[0.01, 1.0], [0.5, 0.02], [2.0, 4.0]])
  for s in (0.1, 0.25, 0.4, 0.7):
    caps = fit.allocate(dmg, s, level=0.5)
    assert (1 - caps).mean() == pytest.approx(s, abs=1e-12)
    assert ((caps >= 0) & (caps <= 1)).all()
  caps = fit.allocate(dmg, 0.25, level=0.5)
  assert caps[0, 0] < caps[2, 1] and caps[1, 1] < caps[0, 1]
  # Equal damage: equal shares (up to the last partial step).
  caps = fit.allocate(np.ones((4, 2)), 0.25, level=0.5)
  np.testing.assert_allclose(caps, 0.75)


def test_rescale_table_keeps_shape_and_mean():
  table = ((1.0, 0.5), (0.75, 0.25), (0.9, 0.6))
  out = np.asarray(R.rescale_table(table, 0.6))
  assert (1 - out).mean() == pytest.approx(0.6)
  assert out[0, 0] == 1.0  # a unit the table keeps dense stays dense
  assert (out <= 1).all() and (out >= 0).all()
  same = np.asarray(R.rescale_table(table, float(1 - np.mean(table))))
  np.testing.assert_allclose(same, np.asarray(table), atol=1e-12)
  np.testing.assert_allclose(np.asarray(R.rescale_table(((1.0, 1.0),), 0.3)), 0.7)


def test_model_table_drives_trained_spec():
  m = make_model()
  assert R.model_table(m) is None
  spec = R.RoutingSpec(sparsity=0.25)
  assert R.trained_spec(m, spec) is spec
  table = np.array([[1.0, 0.5], [0.75, 0.75], [0.5, 1.0]])
  m.routing.capacity[...] = jnp.asarray(table, jnp.float32)
  got = R.trained_spec(m, spec)
  np.testing.assert_allclose(np.asarray(got.capacities), table)
  _, aux = m(tokens(2, 16), routing=got, return_aux=True)
  np.testing.assert_allclose(np.asarray(aux["exec_rate"]), table)


def test_causal_routing_at_uncalibrated_capacities_is_refused():
  m = make_model()
  t = tokens(2, 12)
  spec = R.RoutingSpec(sparsity=0.5, mode="causal")
  with pytest.raises(ConfigError, match="never calibrated"):
    m(t, routing=spec)
  with pytest.raises(ConfigError, match="never calibrated"):
    R.generate(m, t[:, :3], 2, spec)
  R.calibrate_thresholds(m, [t], spec)
  m(t, routing=spec)  # now it runs
  with pytest.raises(ConfigError, match="other capacities"):
    m(t, routing=R.RoutingSpec(sparsity=0.25, mode="causal"))
  m(t, routing=R.RoutingSpec(sparsity=0.25))  # top-k mode needs no thresholds


def test_causal_mode_at_capacity_one_is_dense_whatever_the_thresholds():
  m = make_model()
  t = tokens(2, 20)
  m.routing.threshold[...] = jnp.full(m.routing.threshold[...].shape, 50.0)  # stale thresholds
  dense = np.asarray(m(t))
  for policy in ("informed", "greedy"):
    out = np.asarray(m(t, routing=R.RoutingSpec(policy=policy, sparsity=0.0, mode="causal")))
    np.testing.assert_allclose(out, dense, atol=1e-5, rtol=0)
  # A table with a dense layer: that layer ignores its threshold too (decode agrees).
  table = ((1.0, 1.0), (0.5, 0.5), (1.0, 0.5))
  spec = R.RoutingSpec(capacities=table, mode="causal")
  m.routing.calibrated_for[...] = jnp.asarray(table, jnp.float32)  # stale, but recorded so
  _, aux = m(t, routing=spec, return_aux=True)
  gates = np.asarray(aux["gate_BxT"])
  assert gates[0].all() and gates[2, 0].all()
  toks, step_logits = R.generate(m, t[:, :6], 3, spec)
  full = np.asarray(m(jnp.asarray(toks), routing=spec))
  np.testing.assert_allclose(step_logits, full[:, :-1], atol=1e-4, rtol=0)


def test_flops_budget_saves_what_uniform_saves():
  rng = np.random.RandomState(0)
  scores, rel = rng.randn(4, 2, 64), rng.rand(4, 2, 64)
  cost = (1.0, 3.0)
  caps = fit.allocate_curves(scores, rel, 0.3, unit_cost=cost)
  saved = ((1 - caps) * np.asarray(cost)).sum()
  assert saved == pytest.approx(0.3 * 4 * sum(cost))
  # Equal curves everywhere: the dearer unit (MLP) takes the sparsity.
  same = fit.allocate_curves(np.zeros((4, 2, 64)), np.ones((4, 2, 64)), 0.25, unit_cost=cost)
  assert (1 - same[:, 1]).mean() > (1 - same[:, 0]).mean()


def test_causal_calibration_hits_the_capacity_in_causal_mode():
  m = make_model()
  batches = [tokens(4, 32, s) for s in (11, 12)]
  table = ((0.75, 0.5), (0.5, 0.75), (0.25, 1.0))
  spec = R.RoutingSpec(capacities=table, mode="causal")
  R.calibrate_thresholds(m, batches, spec, iterations=3)
  rates = np.mean(
    [np.asarray(m(b, routing=spec, return_aux=True)[1]["exec_rate"]) for b in batches], axis=0
  )
  # On the calibration tokens themselves, causal routing executes each unit's capacity
  # (to within a token or two of 256 per unit; the last layers converge last).
  np.testing.assert_allclose(rates, np.asarray(table), atol=2 / 128)


def test_unit_damage_probes_approximate_the_probed_unit_only():
  m = make_model()
  batch = _batch(2, 24, 5)
  damage, scores = fit.unit_damage(m, [batch], level=0.5)
  assert damage.shape == (CFG.num_layers, 2) and scores.shape[:2] == (CFG.num_layers, 2)
  # Approximating half of a unit's tokens with a random forecaster changes the loss.
  assert np.abs(damage).min() > 1e-6, damage


def test_linear_router_warm_start_scores_equal_the_hidden_routers():
  """The warm start is a linear fit: a linear router (router_hidden=0, 2d FLOPs per
  token) scores every token as the hidden-layer router carrying that fit does."""
  import dataclasses

  hid = make_model(lff_std=1e-3)
  lin = make_model(dataclasses.replace(CFG, router_hidden=0), lff_std=1e-3)
  # Same seed, same decoder; the closed-form forecasters then fit the same too.
  for a, b in zip(jax.tree.leaves(nnx.state(hid.layers)), jax.tree.leaves(nnx.state(lin.layers))):
    np.testing.assert_array_equal(a, b)
  batches = [_batch(4, 32, s) for s in range(3)]
  fit.set_forecasters(hid, fit.forecaster_moments(hid, batches), ridge=1e-2)
  fit.set_forecasters(lin, fit.forecaster_moments(lin, batches), ridge=1e-2)
  r2_h = fit.set_routers(hid, fit.router_moments(hid, batches), ridge=1e-2)
  r2_l = fit.set_routers(lin, fit.router_moments(lin, batches), ridge=1e-2)
  np.testing.assert_allclose(r2_l, r2_h, rtol=1e-5)
  n = np.random.RandomState(3).randn(50, CFG.hidden_size)
  for u in range(2):
    h, w = hid.routing.router(u), lin.routing.router(u)
    assert w.w2.shape == (CFG.num_layers, CFG.hidden_size)  # linear: one weight per input
    for l in range(CFG.num_layers):
      p = lambda v: np.asarray(v[...][l], np.float64)  # noqa: E731
      hidden = np.maximum(n @ p(h.w1) + p(h.b1), 0.0) @ p(h.w2) + p(h.b2)[0]
      linear = n @ p(w.w2) + p(w.b2)[0]
      np.testing.assert_allclose(linear, hidden, rtol=1e-4, atol=1e-3 * np.abs(hidden).max())
