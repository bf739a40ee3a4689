"""Decoding with a KV cache: one token per row per step, every routing decision causal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.model import BxTxD, Llama
from ir_jax.routing.calibrate import check_calibrated
from ir_jax.routing.forward import LayerInputs, routed_layer
from ir_jax.routing.plan import decode_plan
from ir_jax.routing.spec import MODES, RoutingSpec
from ir_jax.sharding import constrain

Array = jax.Array


def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> dict[str, Array]:
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return dict(k=jnp.zeros(shape, cfg.compute_dtype), v=jnp.zeros(shape, cfg.compute_dtype))


def decode_body(
  model: Llama, cache: dict[str, Array], token_B: Array, pos: Array, spec: RoutingSpec
) -> tuple[Array, dict[str, Array], Array]:
  """One token per row at position `pos`: (logits_BxV, new cache, exec gates [L, 2, B]).

  Keys and values are written for every token. Causal mode: each unit executes
  iff the token's score passes its calibrated threshold, and a unit no row
  executes is not computed. Top-k mode (static row capacity, for several rows):
  each unit executes its top `row_k` rows by score, gathered, and approximates
  the rest; no thresholds needed.

  The layers' weights stay in their stacked arrays and each unit slices its
  own inside the branch that runs it, so a skipped unit reads none of its
  weights (a scan over the stacked weights would copy every layer's weights
  out before the skip decision). Not jitted: `decode_step` is its jitted form;
  call this one inside a larger jitted loop (e.g. a `lax.scan` over steps).
  """
  if spec.policy != "dense" and (spec.gate != "hard" or spec.mode not in MODES):
    raise ConfigError(
      "decoding routes with hard gates: pass spec.inference('causal') "
      "(thresholds) or spec.inference('topk') (static row capacity)"
    )
  cfg = model.config
  b = token_B.shape[0]
  plan = decode_plan(cfg, spec, b)  # checks the table's rows
  levels = plan.levels
  pos_Bx1 = jnp.full((b, 1), pos, jnp.int32)
  inputs = LayerInputs(
    pos_Bx1, pos_Bx1, None, sink_BxT=(pos_Bx1 == 0) if spec.protect_sinks else None
  )
  key = jax.random.key(spec.seed)
  x = model.embed(token_B[:, None])
  graphdef, state = nnx.split(model.layers)
  rgraphdef, rstate = nnx.split(model.routing)

  def one_layer(x, lid, ck, cv, cap, level_pair):
    take = lambda a: a[lid]
    layer = lambda: nnx.merge(graphdef, jax.tree.map(take, state))  # sliced where used
    routing_layer = nnx.merge(rgraphdef, jax.tree.map(take, rstate))
    x, aux, (ck, cv) = routed_layer(
      layer,
      routing_layer,
      constrain(x, BxTxD),
      inputs,
      spec,
      levels,
      level_pair,
      jax.random.fold_in(key, lid),
      cache=(ck, cv, pos),
      caps=cap,
    )
    return constrain(x, BxTxD), (ck, cv, aux["gate_BxT"][:, :, 0])

  # The same rule as the prefill (`routed_forward`): scanned layers switch among each
  # unit type's forms, unrolled ones take their own statically. Each layer returns only
  # this step's keys/values `[B, 1, N, K]`; they are written into the cache once below
  # (in place when the caller donates the cache).
  if cfg.scan_layers:
    per = (jnp.arange(cfg.num_layers), cache["k"], cache["v"], jnp.asarray(plan.caps))
    x, (new_k, new_v, gates) = jax.lax.scan(
      lambda x, per: one_layer(x, *per), x, (*per, jnp.asarray(plan.level_index))
    )
  else:
    outs = []
    index = plan.level_index
    for l in range(cfg.num_layers):
      caps_l = jnp.asarray(plan.caps[l])
      x, o = one_layer(x, l, cache["k"][l], cache["v"][l], caps_l, index[l])
      outs.append(o)
    new_k, new_v, gates = (jnp.stack(a) for a in zip(*outs))
  write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, pos, axis=2)
  return (
    model.logits(x)[:, 0],
    dict(k=write(cache["k"], new_k), v=write(cache["v"], new_v)),
    gates,
  )


# The cache is donated: pass each step the cache the previous step returned.
decode_step = nnx.jit(decode_body, static_argnames=("spec",), donate_argnames=("cache",))


def generate(
  model: Llama, prompt_BxT: Array, max_new_tokens: int, spec: RoutingSpec
) -> tuple[np.ndarray, np.ndarray]:
  """Greedy decoding with a KV cache: (tokens `[B, T + new]`, logits of every step).

  The prompt is fed token by token through the same step, so every token's
  routing decision is causal.
  """
  check_calibrated(model, spec)
  prompt = np.asarray(prompt_BxT)
  b, t = prompt.shape
  total = t + max_new_tokens
  if total > model.config.max_position_embeddings:
    raise ConfigError(
      f"prompt + new tokens = {total} exceeds max_position_embeddings "
      f"{model.config.max_position_embeddings}"
    )
  cache = init_cache(model.config, b, total)
  tokens = np.zeros((b, total), np.int32)
  tokens[:, :t] = prompt
  step_logits = []
  for i in range(total - 1):
    logits, cache, _ = decode_step(model, cache, jnp.asarray(tokens[:, i]), jnp.int32(i), spec)
    step_logits.append(np.asarray(logits))
    if i + 1 >= t:
      tokens[:, i + 1] = np.argmax(step_logits[-1], axis=-1)
  return tokens, np.stack(step_logits, axis=1)
