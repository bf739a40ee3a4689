"""The language-model loss every stage and fit scores with (below train and fit, so both
import it without importing each other)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ir_jax.nll import token_nll

Array = jax.Array


def lm_loss(logits_BxTxV: Array, batch: dict[str, Array]) -> tuple[Array, Array]:
  """(mean next-token NLL over loss_mask, number of scored tokens)."""
  mask = batch["loss_mask"].astype(jnp.float32)
  nll = token_nll(logits_BxTxV, batch["targets"])
  count = jnp.sum(mask)
  return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count
