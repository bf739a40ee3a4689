"""The distill stage (ir_jax.train.steps.distill_loss, stages.STAGES['distill']): its loss
against a numpy KL of the two models' logits, what it trains, the routing it trains
under, and its centred updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ir_jax import routing as R
from ir_jax.config_file import load_config
from ir_jax.fit.common import OFFSET
from ir_jax.forecast import ForecasterParam
from ir_jax.train import steps
from ir_jax.train.config import DistillStage, settings_from_config
from ir_jax.train.stages import STAGES, stage_settings
from tests.routing_test import CFG, make_model, packed_row, tokens


def _batch(b: int = 2, t: int = 24, seed: int = 0) -> dict[str, jax.Array]:
  toks = tokens(b, t + 1, seed=seed)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = np.ones((b, t), bool)
  mask[0, :5] = False  # tokens that are not scored leave the loss
  return {
    "inputs": toks[:, :-1],
    "targets": toks[:, 1:],
    "positions": pos,
    "segment_ids": jnp.ones((b, t), jnp.int32),
    "loss_mask": jnp.asarray(mask),
  }


def _spec() -> R.RoutingSpec:
  return R.RoutingSpec(policy="informed", sparsity=0.5).inference()


def test_the_loss_is_the_kl_from_dense_to_routed_over_scored_tokens():
  m, batch, spec = make_model(CFG), _batch(), _spec()
  loss, metrics = steps.distill_loss(m, batch, spec)
  dense = np.asarray(m(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
  routed = np.asarray(
    R.routed_forward(m, batch["inputs"], batch["positions"], batch["segment_ids"], spec),
    np.float64,
  )
  want, n = 0.0, 0
  for b in range(dense.shape[0]):
    for t in range(dense.shape[1]):
      if not batch["loss_mask"][b, t]:
        continue
      p = np.exp(dense[b, t] - dense[b, t].max())
      p /= p.sum()
      q = np.exp(routed[b, t] - routed[b, t].max())
      q /= q.sum()
      want += float(np.sum(p * (np.log(p) - np.log(q))))
      n += 1
  assert want / n > 1e-3  # the routed model differs: the check has something to compare
  np.testing.assert_allclose(float(loss), want / n, rtol=1e-4)
  assert float(metrics["loss"]) == float(loss)


def _fitted_form(m):
  """Forecasters in the closed-form fit's form (ir_jax.fit.forecasters): every hidden unit
  at OFFSET + z (silu about the identity there), the constant cancelled in b2; the
  outputs are those of the linear map z W2 + b2 they replace."""
  for unit in (m.routing.attn_lff, m.routing.mlp_lff):
    unit.b1[...] = jnp.full_like(unit.b1[...], OFFSET)
    unit.b2[...] = unit.b2[...] - OFFSET * jnp.sum(unit.w2[...], axis=-2)
  return m


def test_steps_move_only_the_forecasters_and_lower_the_kl():
  m, batch, spec = _fitted_form(make_model(CFG)), _batch(), _spec()
  graphdef, trainable, frozen = nnx.split(m, ForecasterParam, ...)
  cfg = DistillStage(steps=8, learning_rate=1e-3, schedule="constant", warmup=0.0)
  tx = steps.optimizer(cfg)
  loss_fn = steps.distill_loss_fn(cfg, spec, seed=0)
  step = jax.jit(steps.make_train_step(graphdef, loss_fn, tx))
  opt_state = tx.init(trainable)
  first = float(loss_fn(m, batch, jnp.int32(0))[0])
  tr = trainable
  for i in range(8):
    tr, opt_state, metrics = step(tr, opt_state, frozen, batch, jnp.int32(i))
  after = nnx.merge(graphdef, tr, frozen)
  last = float(loss_fn(after, batch, jnp.int32(8))[0])
  assert last < 0.9 * first, (first, last)
  # every forecaster leaf moved; the dense model (which reads none of them) did not
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), trainable, tr))
  assert moved and all(moved)
  np.testing.assert_array_equal(
    np.asarray(after(batch["inputs"], batch["positions"], batch["segment_ids"])),
    np.asarray(m(batch["inputs"], batch["positions"], batch["segment_ids"])),
  )


def test_distill_routes_with_the_trained_table_as_evaluation_does():
  cfg = load_config("configs/tiny.py")
  s = settings_from_config(cfg)
  m = make_model(s.model)
  table = np.array([[0.5, 1.0], [0.25, 0.75]])
  m.routing.capacity[...] = jnp.asarray(table, jnp.float32)
  spec = STAGES["distill"].spec(stage_settings(s, "distill", m))
  seq = s.stage_data("distill").seq_len
  want = R.trained_spec(m, s.routing.inference(), seq_len=seq)
  assert spec == want
  np.testing.assert_allclose(np.asarray(spec.capacities), np.asarray(want.capacities))
  toks, pos, seg = packed_row()
  toks = jnp.asarray(np.asarray(toks) % s.model.vocab_size)
  _, aux = R.routed_forward(m, toks, pos, seg, spec, return_aux=True)
  _, aux_eval = R.routed_forward(m, toks, pos, seg, want, return_aux=True)
  np.testing.assert_array_equal(np.asarray(aux["gate_BxT"]), np.asarray(aux_eval["gate_BxT"]))


def test_distill_updates_are_centred_like_a_fitted_forecasters():
  rng = np.random.default_rng(3)
  params = {
    "routing": {
      "attn_lff": {
        "w1": jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32),
        "b1": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
        "b2": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
      }
    }
  }
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  cfg = DistillStage()
  plain = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(steps.schedule(cfg), weight_decay=cfg.weight_decay),
  )
  want, _ = plain.update(grads, plain.init(params), params)
  tx = steps.optimizer(cfg)
  got, _ = tx.update(grads, tx.init(params), params)
  uncentred = steps.optimizer(DistillStage(centred=False))
  got_plain, _ = uncentred.update(grads, uncentred.init(params), params)
  np.testing.assert_array_equal(
    got_plain["routing"]["attn_lff"]["b2"], want["routing"]["attn_lff"]["b2"]
  )
  shift = OFFSET * np.sum(np.asarray(want["routing"]["attn_lff"]["w2"]), axis=-2)
  np.testing.assert_allclose(
    got["routing"]["attn_lff"]["b2"],
    np.asarray(want["routing"]["attn_lff"]["b2"]) - shift,
    rtol=1e-6,
    atol=1e-6,
  )
