"""The routed forward: every decoder layer with both units routed.

`routed_layer` runs one layer (attention then MLP, each through `route_unit`),
for a whole sequence or, with a KV cache, for one decode step (`routing.decode`),
each unit in the form its routing plan gives it (`routing.plan`); `routed_forward`
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
from ir_jax.routing.plan import Form, prefill_plan
from ir_jax.routing.spec import RoutingSpec
from ir_jax.routing.unit import gather, route_unit, sink_mask

Array = jax.Array


# ------------------------------------------------------------- the layer
@dataclasses.dataclass
class LayerInputs:
  """Per-token inputs every routed layer of one forward (or decode step) shares."""

  positions_BxT: Array
  index_BxT: Array
  segment_ids_BxT: Array | None
  temperature: Array | None = None  # overrides spec.temperature (a traced, annealed value)
  sink_BxT: Array | None = None  # tokens that always execute (segment starts)


Ctx = LayerInputs  # the earlier name


def routed_layer(
  layer: DecoderLayer | Callable[[], DecoderLayer],
  routing_layer: RoutingLayer,
  x_BxTxD: Array,
  inputs: LayerInputs,
  spec: RoutingSpec,
  levels: tuple[tuple[Form, ...], ...],
  level_index: Any,
  key: Array,
  cache: tuple[Array, Array, Array] | None = None,
  caps: Array | None = None,
):
  """One decoder layer with both units routed; returns (x, aux[, this step's (k, v)]).

  `levels` (static, `Plan.levels`): the distinct forms of each unit type over all layers;
  `level_index` `[2]`: this layer's position in each. A traced index (scanned layers)
  switches among the forms (`lax.switch`, one branch taken, so a per-layer capacity
  table still scans the layers); a concrete one (unrolled layers) picks its form
  statically; a unit type with one form needs neither.
  `layer` may be a function returning the layer: each unit then asks for its
  weights inside the code that runs it, so in a decode step a skipped unit
  (a `lax.cond` branch not taken) never reads them (see `decode_body`).
  `caps` `[2]`: this layer's capacities; in causal mode a unit at capacity 1 always
  executes and one at 0 never does, whatever its calibrated threshold.
  With a cache in top-k mode, forms count rows (static row capacity, `unit._route_rows`).
  A forecast-only form (capacity 0) runs no router and executes only segment starts in
  its k sink slots (`spec.forecast_only`).
  """
  get = (lambda: layer) if isinstance(layer, DecoderLayer) else layer
  by_rows = cache is not None and spec.mode == "topk"
  n = get().input_layernorm(x_BxTxD)
  if cache is None:  # keys and values are computed where a unit runs (see attn_fn)
    k_new = v_new = None
  else:  # decode: write this step's keys/values, attend over the cache
    k_new, v_new = get().self_attn.keys_values(n, inputs.positions_BxT)
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
    q_pos, q_index, q_seg = inputs.positions_BxT, inputs.index_BxT, inputs.segment_ids_BxT
    if cache is None and not own_kv:
      keys, values = attn.keys_values(n, q_pos)
      kv_index, kv_seg = q_index, q_seg
    elif cache is not None:
      keys, values, kv_index, kv_seg = k_all, v_all, k_index, k_seg
    if idx is not None and by_rows:  # idx `[k]`: rows of the batch, with their caches
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
    def run(form: Form):
      own = form.forecast_only and u == 0 and cache is None and spec.mode == "topk"
      delta, aux = route_unit(
        n,
        x,
        (lambda idx, ns: unit_fn(idx, ns, own_kv=True)) if own and form.k else unit_fn,
        lff,
        router,
        spec,
        form.k,
        thr[u],
        jax.random.fold_in(key, u),
        inputs.temperature,
        inputs.sink_BxT,
        rows=by_rows,
        forecast_only=form.forecast_only,
      )
      return delta.astype(x.dtype), aux

    forms, index = levels[u], level_index[u]
    if len(forms) == 1:
      return run(forms[0])
    if isinstance(index, (int, np.integer)):
      return run(forms[int(index)])
    return jax.lax.switch(index, [lambda f=f: run(f) for f in forms])

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

  aux: exec_rate [L, 2], importance [L, 2], scores_BxT and gate_BxT [L, 2, B, T]. The
  layers run one routed layer over the plan (`prefill_plan`): scanned (the config's
  `scan_layers`), each unit switching among the distinct forms its type has in the
  plan, so the compiled body holds one copy of a unit per distinct k rather than one
  per layer (one for a uniform spec); or unrolled, each layer with its own static form.
  """
  cfg = model.config
  check_calibrated(model, spec)
  b, t = tokens_BxT.shape
  index_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  inputs = LayerInputs(
    index_BxT if positions_BxT is None else positions_BxT,
    index_BxT,
    segment_ids_BxT,
    temperature,
    sink_mask(index_BxT, segment_ids_BxT) if spec.protect_sinks else None,
  )
  key = jax.random.key(spec.seed) if rng is None else rng
  plan = prefill_plan(cfg, spec, t)
  levels = plan.levels

  def layer_fn(layer, routing_layer, x, per):
    lid, level_pair, cap_pair = per  # numpy (static) in unrolled layers, traced when scanned
    return routed_layer(
      layer,
      routing_layer,
      x,
      inputs,
      spec,
      levels,
      level_pair,
      jax.random.fold_in(key, lid),
      caps=jnp.asarray(cap_pair),
    )

  layer_ids = np.arange(cfg.num_layers, dtype=np.int32)
  x = model.embed(tokens_BxT)
  x, aux = model.run_layers(layer_fn, x, (layer_ids, plan.level_index, plan.caps))
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
