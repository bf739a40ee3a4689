"""Next-token negative log-likelihood and perplexity: one definition for training,
evaluation, `ir_jax.perplexity` and the lm-eval adapter."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position `[B, T]`, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_BxTxV.astype(jnp.float32), targets_BxT.astype(jnp.int32)
  )


def perplexity(nll_sum: float, tokens: float) -> float:
  """exp(mean NLL) of `tokens` scored tokens whose NLLs sum to `nll_sum`."""
  return math.exp(nll_sum / tokens)
