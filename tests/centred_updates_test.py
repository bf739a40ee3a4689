"""Forecaster SGD after a closed-form fit: centred updates (ir_jax.train.steps), against
numpy and against the state layout plain AdamW checkpoints have."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ir_jax.fit.common import OFFSET
from ir_jax.train import steps
from ir_jax.train.config import ForecasterStage, RouterStage


def _lff(rng, r: int, d: int) -> dict[str, np.ndarray]:
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {"w1": f32(2, d, r), "b1": f32(2, r), "w2": f32(2, r, d), "b2": f32(2, d)}


def test_a_centred_update_moves_the_output_only_through_the_centred_activations():
  rng = np.random.default_rng(0)
  r, d = 5, 7
  h = OFFSET + rng.normal(size=(2, 11, r))  # a fitted forecaster's hidden units: offset + z
  router = {"w2": rng.normal(size=(2, d)), "b2": rng.normal(size=(2, 1))}
  upd = {"routing": {"attn_lff": _lff(rng, r, d), "attn_router": jax.tree.map(np.float32, router)}}
  got = steps._centred_forecaster_updates(jax.tree.map(jnp.asarray, upd), OFFSET)
  dw2, db2 = upd["routing"]["attn_lff"]["w2"], np.asarray(got["routing"]["attn_lff"]["b2"])
  # the output change of h W2 + b2 under the update, by a plain loop: (h - OFFSET) dW2 + db2
  for layer in range(2):
    change = h[layer] @ dw2[layer] + db2[layer]
    want = (h[layer] - OFFSET) @ dw2[layer] + upd["routing"]["attn_lff"]["b2"][layer]
    np.testing.assert_allclose(change, want, rtol=1e-5, atol=1e-4)
  # everything else, routers included, passes through unchanged
  for name in ("w1", "b1", "w2"):
    np.testing.assert_array_equal(
      got["routing"]["attn_lff"][name], upd["routing"]["attn_lff"][name]
    )
  for name in ("w2", "b2"):
    np.testing.assert_array_equal(
      got["routing"]["attn_router"][name], upd["routing"]["attn_router"][name]
    )


def test_only_fitted_forecaster_stages_are_centred_and_the_state_is_adamws():
  params = {"routing": {"mlp_lff": jax.tree.map(jnp.asarray, _lff(np.random.default_rng(1), 3, 4))}}
  grads = jax.tree.map(jnp.ones_like, params)
  fit, scratch = ForecasterStage(init="fit"), ForecasterStage(init="none")
  plain = optax.chain(
    optax.clip_by_global_norm(fit.grad_clip),
    optax.adamw(steps.schedule(fit), weight_decay=fit.weight_decay),
  )
  want_state = plain.init(params)
  want, _ = plain.update(grads, want_state, params)
  for cfg, centred in ((fit, True), (scratch, False), (RouterStage(), False)):
    tx = steps.optimizer(cfg)
    state = tx.init(params)
    # same state layout as plain AdamW: old checkpoints restore into either
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    if isinstance(cfg, RouterStage):
      continue
    got, _ = tx.update(grads, state, params)
    shift = OFFSET * np.sum(np.asarray(want["routing"]["mlp_lff"]["w2"]), axis=-2)
    expect_b2 = np.asarray(want["routing"]["mlp_lff"]["b2"]) - (shift if centred else 0.0)
    np.testing.assert_allclose(got["routing"]["mlp_lff"]["b2"], expect_b2, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got["routing"]["mlp_lff"]["w2"], want["routing"]["mlp_lff"]["w2"])
