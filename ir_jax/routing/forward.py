"""The routed forward: every decoder layer with both units routed.

`routed_layer` runs one layer (attention then MLP, each through `route_unit`),
for a whole sequence or, with a KV cache, for one decode step; `routed_forward`
runs the model with it, and is what `model(tokens, routing=spec)` reaches
through `RoutingSpec.forward` (set here).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ir_jax.forecast import RoutingLayer
from ir_jax.model import DecoderLayer, Llama
from ir_jax.routing.calibrate import check_calibrated
from ir_jax.routing.spec import RoutingSpec, layer_caps, layer_ks
from ir_jax.routing.unit import gather, route_unit, sink_mask

Array = jax.Array


# ------------------------------------------------------------- the layer
@dataclasses.dataclass
class Ctx:
  """Per-token inputs every routed layer of one forward (or decode step) shares."""

  positions_BxT: Array
  index_BxT: Array
  segment_ids_BxT: Array | None
  temperature: Array | None = None  # overrides spec.temperature (a traced, annealed value)
  sink_BxT: Array | None = None  # tokens that always execute (segment starts)


def routed_layer(
  layer: DecoderLayer | Callable[[], DecoderLayer],
  routing_layer: RoutingLayer,
  x_BxTxD: Array,
  ctx: Ctx,
  spec: RoutingSpec,
  ks: tuple[int, int],
  key: Array,
  cache: tuple[Array, Array, Array] | None = None,
  caps: Array | None = None,
  k_levels: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
  level_index: Array | None = None,
):
  """One decoder layer with both units routed; returns (x, aux[, this step's (k, v)]).

  `layer` may be a function returning the layer: each unit then asks for its
  weights inside the code that runs it, so in a decode step a skipped unit
  (a `lax.cond` branch not taken) never reads them (see `decode_body`).
  `caps` `[2]`: the spec's capacities of this layer; in causal mode a unit at
  capacity 1 always executes and one at 0 never does, whatever its calibrated threshold.
  With a cache in top-k mode, `ks` count rows (static row capacity, `unit._route_rows`).
  An entry of `ks` (or of `k_levels`) may be a pair (k, forecast_only): a unit at capacity 0
  runs no router and executes only segment starts in its k sink slots (`spec.forecast_only`).
  `k_levels` (static: the distinct k of each unit type over all layers) with `level_index` `[2]`
  (traced: this layer's position in each) replace `ks`: each unit then runs under a
  `lax.switch` over its levels, one branch per distinct k, so a per-layer capacity table
  still scans the layers (see `routed_forward`).
  """
  get = (lambda: layer) if isinstance(layer, DecoderLayer) else layer
  rows = cache is not None and spec.mode == "topk"
  n = get().input_layernorm(x_BxTxD)
  if cache is None:  # keys and values are computed where a unit runs (see attn_fn)
    k_new = v_new = None
  else:  # decode: write this step's keys/values, attend over the cache
    k_new, v_new = get().self_attn.keys_values(n, ctx.positions_BxT)
    ck, cv, pos = cache
    k_all = jax.lax.dynamic_update_slice_in_dim(ck, k_new.astype(ck.dtype), pos, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cv, v_new.astype(cv.dtype), pos, axis=1)
    k_index = jnp.broadcast_to(jnp.arange(ck.shape[1]), ck.shape[:2])
    k_seg = None

  def attn_fn(idx: Array | None, n_BxSxD: Array, own_kv: bool = False) -> Array:
    """Attention for the tokens at `idx` (None: all). `own_kv` (a forecast-only unit's
    slots: segment starts, then the row's earliest tokens) attends within the gathered
    tokens alone: each one's earlier tokens of its segment are gathered too, so this is
    exact, and no other token needs keys or values."""
    attn = get().self_attn
    q_pos, q_index, q_seg = ctx.positions_BxT, ctx.index_BxT, ctx.segment_ids_BxT
    if cache is None and not own_kv:
      keys, values = attn.keys_values(n, q_pos)
      kv_index, kv_seg = q_index, q_seg
    elif cache is not None:
      keys, values, kv_index, kv_seg = k_all, v_all, k_index, k_seg
    if idx is not None and rows:  # idx `[k]`: rows of the batch, with their caches
      q_pos, q_index = q_pos[idx], q_index[idx]
      keys, values, kv_index = keys[idx], values[idx], kv_index[idx]
    elif idx is not None:  # idx `[B, S]`: tokens of every row
      q_pos, q_index = gather(q_pos, idx), gather(q_index, idx)
      q_seg = None if q_seg is None else gather(q_seg, idx)
    if own_kv:
      keys, values = attn.keys_values(n_BxSxD, q_pos)
      kv_index, kv_seg = q_index, q_seg
    q = attn.queries(n_BxSxD, q_pos)
    return attn.attend(q, keys, values, q_index, kv_index, q_seg, kv_seg)

  thr = routing_layer.threshold[...]
  if caps is not None:
    thr = jnp.where(caps >= 1.0, -jnp.inf, jnp.where(caps <= 0.0, jnp.inf, thr))

  def unit(u: int, n: Array, x: Array, unit_fn: Callable, lff: Any, router: Any):
    def run(level: int | tuple[int, bool]):
      k, forecast_only = (level, False) if isinstance(level, (int, np.integer)) else level
      own = forecast_only and u == 0 and cache is None and spec.mode == "topk"
      delta, aux = route_unit(
        n,
        x,
        (lambda idx, ns: unit_fn(idx, ns, own_kv=True)) if own and k else unit_fn,
        lff,
        router,
        spec,
        k,
        thr[u],
        jax.random.fold_in(key, u),
        ctx.temperature,
        ctx.sink_BxT,
        rows=rows,
        forecast_only=forecast_only,
      )
      return delta.astype(x.dtype), aux

    if k_levels is None:
      return run(ks[u])
    if len(k_levels[u]) == 1:
      return run(k_levels[u][0])
    return jax.lax.switch(level_index[u], [lambda k=k: run(k) for k in k_levels[u]])

  delta, aux_a = unit(0, n, x_BxTxD, attn_fn, routing_layer.attn_lff, routing_layer.attn_router)
  x_BxTxD = x_BxTxD + delta
  n = get().post_attention_layernorm(x_BxTxD)
  delta, aux_m = unit(
    1, n, x_BxTxD, lambda _, ns: get().mlp(ns), routing_layer.mlp_lff, routing_layer.mlp_router
  )
  x_BxTxD = x_BxTxD + delta
  aux = jax.tree.map(lambda a, m: jnp.stack([a, m]), aux_a, aux_m)
  if cache is None:
    return x_BxTxD, aux
  return x_BxTxD, aux, (k_new.astype(k_all.dtype), v_new.astype(v_all.dtype))


def routed_forward(
  model: Llama,
  tokens_BxT: Array,
  positions_BxT: Array | None,
  segment_ids_BxT: Array | None,
  spec: RoutingSpec,
  *,
  rng: Array | None = None,
  return_aux: bool = False,
  temperature: Array | None = None,
):
  """Logits `[B, T, V]` with every unit routed per `spec` (and aux if asked).

  `temperature` (a scalar, may be traced) replaces `spec.temperature` for
  Gumbel gates, so an annealed temperature does not recompile every step.

  aux: exec_rate [L, 2], importance [L, 2], scores_BxT and gate_BxT [L, 2, B, T]. A uniform
  capacity scans the layers with one static k per unit type. A per-layer
  capacity table scans them too: each unit switches (`lax.switch`, one branch
  taken) among the distinct k its type has in the table, so the compiled body
  holds one copy of a unit per distinct k rather than one per layer. With the
  config's `scan_layers=False` the layers are unrolled, each with its own static k.
  """
  cfg = model.config
  check_calibrated(model, spec)
  b, t = tokens_BxT.shape
  index_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  ctx = Ctx(
    index_BxT if positions_BxT is None else positions_BxT,
    index_BxT,
    segment_ids_BxT,
    temperature,
    sink_mask(index_BxT, segment_ids_BxT) if spec.protect_sinks else None,
  )
  key = jax.random.key(spec.seed) if rng is None else rng
  ks = layer_ks(spec, cfg, t)
  # A unit's static form: (k, forecast-only); a capacity-0 unit and a small capacity may
  # share k but not code (the former runs no router).
  forms = [
    [(int(ks[l, u]), spec.forecast_only(l, u)) for u in range(ks.shape[1])]
    for l in range(cfg.num_layers)
  ]
  x = model.embed(tokens_BxT)
  layer_ids = np.arange(cfg.num_layers, dtype=np.int32)
  if all(row == forms[0] for row in forms):
    static_ks = tuple(forms[0])

    caps = jnp.asarray(layer_caps(spec, cfg))

    def layer_fn(layer, routing_layer, x, lid):
      return routed_layer(
        layer, routing_layer, x, ctx, spec, static_ks, jax.random.fold_in(key, lid), caps=caps[lid]
      )

    x, aux = model.run_layers(layer_fn, x, jnp.asarray(layer_ids))
  elif model.config.scan_layers:
    levels = tuple(tuple(sorted({row[u] for row in forms})) for u in range(ks.shape[1]))
    index = np.array([[levels[u].index(f) for u, f in enumerate(row)] for row in forms])

    def layer_fn(layer, routing_layer, x, per):
      lid, level_pair, cap_pair = per
      return routed_layer(
        layer,
        routing_layer,
        x,
        ctx,
        spec,
        (0, 0),  # unused: k_levels and level_index choose
        jax.random.fold_in(key, lid),
        caps=cap_pair,
        k_levels=levels,
        level_index=level_pair,
      )

    per_layer = (jnp.asarray(layer_ids), jnp.asarray(index), jnp.asarray(layer_caps(spec, cfg)))
    x, aux = model.run_layers(layer_fn, x, per_layer)
  else:

    def layer_fn(layer, routing_layer, x, per):
      lid, k_pair, cap_pair = per  # numpy leaves in the unrolled loop: static
      l = int(lid)
      return routed_layer(
        layer,
        routing_layer,
        x,
        ctx,
        spec,
        tuple((int(k_pair[u]), spec.forecast_only(l, u)) for u in range(len(k_pair))),
        jax.random.fold_in(key, int(lid)),
        caps=jnp.asarray(cap_pair),
      )

    x, aux = model.run_layers(layer_fn, x, (layer_ids, ks, layer_caps(spec, cfg)), scan=False)
  logits = model.logits(x)
  return (logits, aux) if return_aux else logits


def realized_sparsity(aux: dict[str, Array]) -> Array:
  """Fraction of (token, unit) pairs approximated in one forward."""
  return 1.0 - jnp.mean(aux["exec_rate"])


def _spec_forward(
  spec: RoutingSpec,
  model: Llama,
  tokens_BxT: Array,
  positions_BxT: Array | None = None,
  segment_ids_BxT: Array | None = None,
  **kwargs: Any,
):
  """`routed_forward` with this spec; what `model(tokens, routing=spec)` calls."""
  return routed_forward(model, tokens_BxT, positions_BxT, segment_ids_BxT, spec, **kwargs)


# The spec carries the routed entry point, so `ir_jax.model` never imports routing;
# it is attached here because `spec.py` sits below this module (see RoutingSpec.forward).
RoutingSpec.forward = _spec_forward
