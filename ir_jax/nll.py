"""Next-token negative log-likelihood and perplexity: one definition for training,
evaluation, `ir_jax.perplexity` and the lm-eval adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
  """-log softmax(logits)[target] per position `[B, T]`, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_BxTxV.astype(jnp.float32), targets_BxT.astype(jnp.int32)
  )


def perplexity(nll_sum: float, tokens: float) -> float:
  """exp(mean NLL) of `tokens` scored tokens whose NLLs sum to `nll_sum`.

  numpy's exp, as the estimators' perplexities use (`ir_jax.eval.lr_estimates`): math.exp
  differs from it in the last bit for about 5% of arguments, so an estimate with weights
  of exactly 1 would not reproduce the measured perplexity bit for bit. Overflow gives inf."""
  with np.errstate(over="ignore"):
    return float(np.exp(np.float64(nll_sum) / tokens))
