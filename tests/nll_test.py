"""ir_jax.nll against a float64 numpy log-softmax."""

from __future__ import annotations

import math

import numpy as np

from ir_jax import nll


def test_token_nll_matches_numpy_log_softmax():
  rng = np.random.RandomState(0)
  logits = (rng.randn(2, 5, 11) * 4).astype(np.float32)
  targets = rng.randint(0, 11, (2, 5))
  z = logits.astype(np.float64)
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  got = np.asarray(nll.token_nll(logits, targets))
  assert got.dtype == np.float32 and got.shape == (2, 5)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_perplexity_is_exp_of_the_mean():
  assert nll.perplexity(6.0, 3) == math.exp(2.0)
