"""Execute-or-approximate routing: the one place that gathers, runs a unit and merges.

Per unit (attention, MLP) and token the new residual is

    x' = x + g * Unit(n) + (1 - g) * LFF(n),      g in {0, 1}

`route_unit` computes the unit delta for every policy:
  informed  router scores pick the executed tokens; the rest get the forecast
  greedy    the same with forecast 0 (execute or skip; SkipGPT / MoD baseline)
  random    random tokens at the same capacity, with forecast
  oracle    executes the tokens whose forecast error is largest (analysis bound)
  dense     every token executes

Top-k mode ("topk") picks k = capacity * T tokens per row with `lax.top_k`,
gathers them (keeping their original positions and segment ids), runs the
unit on `[B, k, D]` only and scatters the outputs over the forecasts; every
shape is static. Causal mode ("causal") executes a token iff its score
passes a per-unit threshold calibrated on held-out data, so a token's
decision never depends on later tokens; it is what decoding uses.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.config import ConfigError, LlamaConfig, is_int
from ir_jax.forecast import UNITS, Forecaster, Router, RoutingLayer, lff_flops, router_flops
from ir_jax.model import BxTxD, DecoderLayer, Llama, attention_mask
from ir_jax.sharding import constrain

Array = jax.Array
POLICIES = ("informed", "greedy", "random", "oracle", "dense")
MODES = ("topk", "causal")
GATES = ("hard", "ste", "gumbel")
COMPUTES = ("gathered", "all")


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """How to route: hashable, so it is a static argument of jitted functions.

  policy:     one of POLICIES.
  sparsity:   fraction of (token, unit) pairs approximated; capacity = 1 - sparsity.
  mode:       "topk" (training, prefill, scoring) or "causal" (thresholds; decoding).
  gate:       "hard" (inference), "ste" (straight-through top-k: hard mask forward,
              sigmoid(score) gradient backward) or "gumbel" (binary Gumbel-softmax
              with `temperature`, straight-through; needs compute="all").
  compute:    "gathered" (only executed tokens run the unit) or "all" (every unit
              runs and is mixed by the gate: exact informed gradient for every token).
  capacities: optional per-layer ((attn, mlp), ...) capacity table; overrides sparsity.
  k_multiple: round k up to a multiple of this (never above T); 1 keeps k exact.
  seed:       for the random policy and Gumbel noise when no rng is passed.
  protect_sinks: the first token of every segment always executes (inside the
              capacity); False only to measure what that protection is worth.
  """

  policy: str = "informed"
  sparsity: float = 0.0
  mode: str = "topk"
  gate: str = "hard"
  compute: str = "gathered"
  temperature: float = 1.0
  capacities: tuple[tuple[float, float], ...] | None = None
  k_multiple: int = 1
  seed: int = 0
  protect_sinks: bool = True

  def __post_init__(self) -> None:
    def one_of(name: str, options: tuple[str, ...]) -> None:
      if getattr(self, name) not in options:
        raise ConfigError(f"routing.{name} must be one of {options}, got {getattr(self, name)!r}")

    one_of("policy", POLICIES)
    one_of("mode", MODES)
    one_of("gate", GATES)
    one_of("compute", COMPUTES)
    if not _is_fraction(self.sparsity):
      raise ConfigError(f"routing.sparsity must be a number in [0, 1], got {self.sparsity!r}")
    if self.capacities is not None:
      rows = self.capacities
      if (not isinstance(rows, (list, tuple)) or not rows
          or any(not isinstance(r, (list, tuple)) or len(r) != len(UNITS)
                 or not all(_is_fraction(c) for c in r) for r in rows)):
        raise ConfigError("routing.capacities must be a non-empty per-layer list of "
                          f"(attn, mlp) capacities in [0, 1], got {self.capacities!r}")
      object.__setattr__(self, "capacities", tuple(tuple(float(c) for c in r) for r in rows))
    if not is_temperature(self.temperature):
      raise ConfigError(f"routing.temperature must be a number in [{_MIN_TEMPERATURE:.3g}, "
                        f"{_MAX_TEMPERATURE:.3g}] (float32, > 0), got {self.temperature!r}")
    if not (is_int(self.k_multiple) and self.k_multiple >= 1):
      raise ConfigError(f"routing.k_multiple must be an integer >= 1, got {self.k_multiple!r}")
    if not (is_int(self.seed) and 0 <= self.seed < 2**32):
      raise ConfigError(f"routing.seed must be an integer in [0, 2**32), got {self.seed!r}")
    if self.gate == "gumbel" and self.compute != "all":
      raise ConfigError("routing.gate='gumbel' samples a variable number of tokens; "
                        "it needs routing.compute='all'")
    if not isinstance(self.protect_sinks, bool):
      raise ConfigError(f"routing.protect_sinks must be True or False, got {self.protect_sinks!r}")
    if self.mode == "causal" and self.gate != "hard":
      raise ConfigError("routing.mode='causal' is for inference; use gate='hard'")

  def capacity(self, layer: int, unit: int) -> float:
    if self.policy == "dense":
      return 1.0
    if self.capacities is not None:
      return self.capacities[layer][unit]
    return 1.0 - self.sparsity

  def k(self, seq_len: int, layer: int, unit: int) -> int:
    """Static number of executed tokens per row in top-k mode."""
    k = int(round(self.capacity(layer, unit) * seq_len))
    k = -(-k // self.k_multiple) * self.k_multiple
    return min(k, seq_len)

  def check_layers(self, num_layers: int) -> None:
    if self.capacities is not None and len(self.capacities) != num_layers:
      raise ConfigError(f"routing.capacities has {len(self.capacities)} rows; the model has "
                        f"{num_layers} layers")

  def inference(self, mode: str = "topk") -> RoutingSpec:
    """This spec as inference routes: hard gates, only selected tokens computed.

    Top-k mode for training-time evaluation, prefill and the LoRA stage; causal
    mode for decoding (calibrated thresholds). Policy, capacities and seed stay.
    """
    return dataclasses.replace(self, mode=mode, gate="hard", compute="gathered")

  def forward(self, model: Llama, tokens_BxT: Array, positions_BxT: Array | None = None,
              segment_ids_BxT: Array | None = None, **kwargs: Any):
    """`routed_forward` with this spec; what `model(tokens, routing=spec)` calls."""
    return routed_forward(model, tokens_BxT, positions_BxT, segment_ids_BxT, self, **kwargs)


def _is_fraction(v: Any) -> bool:
  # numbers.Real: numpy scalars from a sweep are fine; bools and strings are not.
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1


# Gumbel logits are divided by the temperature in float32: it must stay a
# positive, finite float32 (1e-50 would round to 0 and divide by zero).
_MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)
_MAX_TEMPERATURE = float(np.finfo(np.float32).max)


def is_temperature(v: Any) -> bool:
  """A Gumbel temperature float32 holds as a positive finite number."""
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and _MIN_TEMPERATURE <= v <= _MAX_TEMPERATURE)


# ------------------------------------------------------------------ helpers
def _gather(a_BxT_: Array, idx_BxS: Array) -> Array:
  """Rows `idx` of `a` along axis 1 (any trailing dims)."""
  idx = idx_BxS.reshape(idx_BxS.shape + (1,) * (a_BxT_.ndim - 2))
  return jnp.take_along_axis(a_BxT_, idx, axis=1)


def topk_indices(scores_BxT: Array, k: int) -> Array:
  """The k highest-scoring positions per row, in sequence order `[B, k]`."""
  _, idx_BxK = jax.lax.top_k(scores_BxT, k)
  return jnp.sort(idx_BxK, axis=-1)


def topk_mask(scores_BxT: Array, k: int) -> Array:
  b, t = scores_BxT.shape
  if k == 0:
    return jnp.zeros((b, t), bool)
  idx = topk_indices(scores_BxT, k)
  return jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], idx].set(True)


def sink_mask(index_BxT: Array, segment_ids_BxT: Array | None) -> Array:
  """True at the first token of every segment (and of every row): the attention sinks.

  Their unit outputs are far from ordinary tokens' (massive activations), so
  forecasts miss them badly; every policy executes them, inside the capacity.
  """
  first = index_BxT == 0
  if segment_ids_BxT is None:
    return first
  prev = jnp.concatenate([jnp.zeros_like(segment_ids_BxT[:, :1]), segment_ids_BxT[:, :-1]], 1)
  return (first | (segment_ids_BxT != prev)) & (segment_ids_BxT > 0)


# Added to a sink's score so top-k always picks it (finite: ties stay ordered).
SINK_BONUS = 1e9


def _straight_through(hard_BxT: Array, soft_BxT: Array) -> Array:
  """Forward value `hard`, gradient of `soft`."""
  return hard_BxT.astype(jnp.float32) + soft_BxT - jax.lax.stop_gradient(soft_BxT)


def _importance(x_BxTxD: Array, u_BxTxD: Array) -> Array:
  """1 - cos(x, x + Unit(n)) per token: how much the unit turns the residual."""
  x = x_BxTxD.astype(jnp.float32)
  y = x + u_BxTxD.astype(jnp.float32)
  cos = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-6)
  return 1.0 - cos


# -------------------------------------------------------------- the router
UnitFn = Callable[[Array | None, Array], Array]


def _forecast_and_scores(n_BxTxD: Array, unit_fn: UnitFn, lff: Forecaster, router: Router,
                         spec: RoutingSpec, key: Array) -> tuple[Array, Array | None, Array]:
  """(forecast, the unit's output for every token if the policy needed it, scores `[B, T]`):
  the forecast is 0 for greedy; scores are the router's, uniform noise (random) or the
  forecast error (oracle, which runs the unit on every token)."""
  b, t, _ = n_BxTxD.shape
  forecast = jnp.zeros_like(n_BxTxD) if spec.policy == "greedy" else lff(n_BxTxD)
  if spec.policy == "oracle":
    u_all = unit_fn(None, n_BxTxD)
    return forecast, u_all, jnp.sum(jnp.square((u_all - forecast).astype(jnp.float32)), -1)
  if spec.policy == "random":
    return forecast, None, jax.random.uniform(key, (b, t), jnp.float32)
  return forecast, None, router(n_BxTxD)


def route_unit(n_BxTxD: Array, x_BxTxD: Array, unit_fn: UnitFn, lff: Forecaster,
               router: Router, spec: RoutingSpec, k: int, threshold: Array,
               key: Array, temperature: Array | None = None,
               sink_BxT: Array | None = None, rows: bool = False) -> tuple[Array, dict[str, Array]]:
  """The unit's contribution to the residual for every token, and statistics.

  `unit_fn(idx_BxS, n_BxSxD)` runs the unit for the tokens at `idx` (None:
  all tokens). Returns (delta_BxTxD, aux) with aux = {exec_rate: mean gate
  (differentiable for ste/gumbel), importance: mean over tokens of
  (1 - g) * (1 - cos(x, x + Unit(n))) (0 when only gathered tokens ran),
  scores_BxT: the routing scores, gate_BxT: which tokens executed}. Tokens in `sink_BxT` always execute (they
  take top-k slots first; gates and thresholds are forced open for them).
  `rows=True` (a decode step of several rows, top-k mode): `k` counts rows, and
  `unit_fn` takes row indices `[k]` (see `_route_rows`).
  """
  b, t, _ = n_BxTxD.shape
  f32 = jnp.float32
  if rows and spec.policy != "dense":
    return _route_rows(n_BxTxD, unit_fn, lff, router, spec, k, key, sink_BxT)
  if spec.policy == "dense" or (spec.mode == "topk" and k == t and spec.gate == "hard"):
    return unit_fn(None, n_BxTxD), dict(exec_rate=jnp.ones((), f32),
                                        importance=jnp.zeros((), f32),
                                        scores_BxT=jnp.zeros((b, t), f32),
                                        gate_BxT=jnp.ones((b, t), bool))
  forecast, u_all, scores = _forecast_and_scores(n_BxTxD, unit_fn, lff, router, spec, key)
  soft = jax.nn.sigmoid(scores)
  if sink_BxT is not None:
    scores = jnp.where(sink_BxT, scores + SINK_BONUS, scores)

  if spec.mode == "causal":
    gate = scores > threshold
  elif spec.gate == "gumbel":
    u = jax.random.uniform(jax.random.fold_in(key, 1), (b, t), f32, 1e-6, 1 - 1e-6)
    temp = spec.temperature if temperature is None else temperature  # traced when annealed
    soft = jax.nn.sigmoid((scores + jnp.log(u) - jnp.log1p(-u)) / temp)
    gate = soft > 0.5
    if sink_BxT is not None:
      soft = jnp.where(sink_BxT, 1.0, soft)
  else:
    gate = topk_mask(scores, k)
  g = _straight_through(gate, soft) if spec.gate != "hard" else gate.astype(f32)

  if spec.mode == "topk" and spec.gate != "gumbel" and spec.compute == "gathered" and u_all is None:
    # Only the k selected tokens run the unit: gather, run, scatter.
    out = forecast
    if k:
      idx = topk_indices(scores, k)
      u_sel = constrain(unit_fn(idx, constrain(_gather(n_BxTxD, idx), BxTxD)), BxTxD)
      if spec.gate == "ste":  # value u_sel, d/d(score) = <., u - f>
        s_sel = _gather(soft, idx)[..., None]
        f_sel = constrain(_gather(forecast, idx), BxTxD)
        u_sel = u_sel + (s_sel - jax.lax.stop_gradient(s_sel)) * (u_sel - f_sel)
      out = forecast.at[jnp.arange(b)[:, None], idx].set(u_sel.astype(forecast.dtype))
      out = constrain(out, BxTxD)
    importance = jnp.zeros((), f32)
  elif spec.mode == "causal" and spec.compute == "gathered" and t == 1 and u_all is None:
    # A decode step: run the unit only when some row's token passes its
    # threshold (lax.cond executes one branch), so a skipped unit costs its
    # forecast and router alone. With one row this is exact per-token skipping.
    out = jax.lax.cond(jnp.any(gate),
                       lambda: jnp.where(gate[..., None], unit_fn(None, n_BxTxD), forecast),
                       lambda: forecast)
    importance = jnp.zeros((), f32)
  else:
    if u_all is None:
      u_all = unit_fn(None, n_BxTxD)
    if spec.gate == "hard":
      out = jnp.where(gate[..., None], u_all, forecast)
    else:
      out = forecast + g[..., None].astype(forecast.dtype) * (u_all - forecast)
    importance = jnp.mean((1.0 - g) * _importance(x_BxTxD, jax.lax.stop_gradient(u_all)))
  return out, dict(exec_rate=jnp.mean(g), importance=importance, scores_BxT=scores,
                   gate_BxT=gate)


def _route_rows(n_Bx1xD: Array, unit_fn: UnitFn, lff: Forecaster, router: Router,
                spec: RoutingSpec, k: int, key: Array,
                sink_Bx1: Array | None) -> tuple[Array, dict[str, Array]]:
  """Static row capacity for a decode step of B rows (one token each): the unit
  runs for the `k` highest-scoring rows only (gathered, `[k, 1, D]`) and the
  other rows get the forecast. Shapes are static, no thresholds are needed, and
  a row's decision depends on the other rows' scores at this step, never on
  later tokens. `unit_fn(idx_K, n_Kx1xD)` runs the unit for rows `idx` (None:
  every row). Sink tokens (position 0) always run: a step with any sink runs
  the unit for every row and keeps the top-k-or-sink rows' outputs.
  """
  b = n_Bx1xD.shape[0]
  f32 = jnp.float32
  forecast, u_all, scores = _forecast_and_scores(n_Bx1xD, unit_fn, lff, router, spec, key)
  if sink_Bx1 is not None:
    scores = jnp.where(sink_Bx1, scores + SINK_BONUS, scores)
  idx_K = topk_indices(scores[:, 0][None], k)[0] if k else None  # one top-k per step
  gate = jnp.zeros((b, 1), bool)
  if k:
    gate = gate.at[idx_K].set(True)
  if sink_Bx1 is not None:
    gate = gate | sink_Bx1

  def everyone() -> Array:
    u = unit_fn(None, n_Bx1xD) if u_all is None else u_all
    return jnp.where(gate[..., None], u, forecast)

  def gathered() -> Array:
    if k == 0:
      return forecast
    u_sel = unit_fn(idx_K, n_Bx1xD[idx_K])
    return forecast.at[idx_K].set(u_sel.astype(forecast.dtype))

  if u_all is not None or spec.compute == "all" or k == b:
    out = everyone()
  elif sink_Bx1 is None:
    out = gathered()
  else:
    out = jax.lax.cond(jnp.any(sink_Bx1), everyone, gathered)
  return out, dict(exec_rate=jnp.mean(gate.astype(f32)), importance=jnp.zeros((), f32),
                   scores_BxT=scores, gate_BxT=gate)


def row_k(spec: RoutingSpec, rows: int, layer: int, unit: int) -> int:
  """Rows a unit executes in a decode step of `rows` rows under top-k routing:
  ceil(capacity x rows), never below the capacity."""
  return min(rows, int(np.ceil(spec.capacity(layer, unit) * rows - 1e-9)))


# ------------------------------------------------------------- the layer
@dataclasses.dataclass
class _Ctx:
  positions_BxT: Array
  index_BxT: Array
  segment_ids_BxT: Array | None
  temperature: Array | None = None  # overrides spec.temperature (a traced, annealed value)
  sink_BxT: Array | None = None  # tokens that always execute (segment starts)


def routed_layer(layer: DecoderLayer | Callable[[], DecoderLayer], rl: RoutingLayer,
                 x_BxTxD: Array, ctx: _Ctx, spec: RoutingSpec, ks: tuple[int, int], key: Array,
                 cache: tuple[Array, Array, Array] | None = None, caps: Array | None = None):
  """One decoder layer with both units routed; returns (x, aux[, this step's (k, v)]).

  `layer` may be a function returning the layer: each unit then asks for its
  weights inside the code that runs it, so in a decode step a skipped unit
  (a `lax.cond` branch not taken) never reads them (see `decode_body`).
  `caps` `[2]`: the spec's capacities of this layer; in causal mode a unit at
  capacity 1 always executes and one at 0 never does, whatever its calibrated threshold.
  With a cache in top-k mode, `ks` count rows (static row capacity, `_route_rows`).
  """
  get = (lambda: layer) if isinstance(layer, DecoderLayer) else layer
  rows = cache is not None and spec.mode == "topk"
  n = get().input_layernorm(x_BxTxD)
  k_new, v_new = get().self_attn.keys_values(n, ctx.positions_BxT)
  if cache is None:
    k_all, v_all, k_index, k_seg = k_new, v_new, ctx.index_BxT, ctx.segment_ids_BxT
  else:  # decode: write this step's keys/values, attend over the cache
    ck, cv, pos = cache
    k_all = jax.lax.dynamic_update_slice_in_dim(ck, k_new.astype(ck.dtype), pos, axis=1)
    v_all = jax.lax.dynamic_update_slice_in_dim(cv, v_new.astype(cv.dtype), pos, axis=1)
    k_index = jnp.broadcast_to(jnp.arange(ck.shape[1]), ck.shape[:2])
    k_seg = None

  def attn_fn(idx: Array | None, n_BxSxD: Array) -> Array:
    attn = get().self_attn
    q_pos, q_index, q_seg = ctx.positions_BxT, ctx.index_BxT, ctx.segment_ids_BxT
    keys, values, kv_index, kv_seg = k_all, v_all, k_index, k_seg
    if idx is not None and rows:  # idx `[k]`: rows of the batch, with their caches
      q_pos, q_index = q_pos[idx], q_index[idx]
      keys, values, kv_index = keys[idx], values[idx], kv_index[idx]
    elif idx is not None:  # idx `[B, S]`: tokens of every row
      q_pos, q_index = _gather(q_pos, idx), _gather(q_index, idx)
      q_seg = None if q_seg is None else _gather(q_seg, idx)
    q = attn.queries(n_BxSxD, q_pos)
    return attn.attend(q, keys, values, attention_mask(q_index, kv_index, q_seg, kv_seg))

  thr = rl.threshold[...]
  if caps is not None:
    thr = jnp.where(caps >= 1.0, -jnp.inf, jnp.where(caps <= 0.0, jnp.inf, thr))
  delta, aux_a = route_unit(n, x_BxTxD, attn_fn, rl.attn_lff, rl.attn_router, spec, ks[0],
                            thr[0], jax.random.fold_in(key, 0), ctx.temperature, ctx.sink_BxT,
                            rows=rows)
  x_BxTxD = x_BxTxD + delta.astype(x_BxTxD.dtype)
  n = get().post_attention_layernorm(x_BxTxD)
  delta, aux_m = route_unit(n, x_BxTxD, lambda _, ns: get().mlp(ns), rl.mlp_lff,
                            rl.mlp_router, spec, ks[1], thr[1], jax.random.fold_in(key, 1),
                            ctx.temperature, ctx.sink_BxT, rows=rows)
  x_BxTxD = x_BxTxD + delta.astype(x_BxTxD.dtype)
  aux = jax.tree.map(lambda a, m: jnp.stack([a, m]), aux_a, aux_m)
  if cache is None:
    return x_BxTxD, aux
  return x_BxTxD, aux, (k_new.astype(k_all.dtype), v_new.astype(v_all.dtype))


def layer_caps(spec: RoutingSpec, cfg: LlamaConfig) -> np.ndarray:
  """The spec's capacity of every unit, `[L, 2]` (fractions of tokens executed)."""
  return np.array([[spec.capacity(l, u) for u in range(len(UNITS))]
                   for l in range(cfg.num_layers)], np.float32)


def layer_ks(spec: RoutingSpec, cfg: LlamaConfig, t: int) -> np.ndarray:
  """Static top-k counts of every unit for rows of `t` tokens, `[L, 2]` (which units run
  how much: what the routed forward, `flops` and the benchmarks all use)."""
  spec.check_layers(cfg.num_layers)
  return np.array([[spec.k(t, l, u) for u in range(len(UNITS))]
                   for l in range(cfg.num_layers)], np.int32)


def routed_forward(model: Llama, tokens_BxT: Array, positions_BxT: Array | None,
                   segment_ids_BxT: Array | None, spec: RoutingSpec, *,
                   rng: Array | None = None, return_aux: bool = False,
                   temperature: Array | None = None):
  """Logits `[B, T, V]` with every unit routed per `spec` (and aux if asked).

  `temperature` (a scalar, may be traced) replaces `spec.temperature` for
  Gumbel gates, so an annealed temperature does not recompile every step.

  aux: exec_rate [L, 2], importance [L, 2], scores_BxT and gate_BxT [L, 2, B, T]. A uniform
  capacity scans the layers; a per-layer capacity table unrolls them (each
  layer then has its own static k).
  """
  cfg = model.config
  check_calibrated(model, spec)
  b, t = tokens_BxT.shape
  index_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  ctx = _Ctx(index_BxT if positions_BxT is None else positions_BxT, index_BxT,
             segment_ids_BxT, temperature,
             sink_mask(index_BxT, segment_ids_BxT) if spec.protect_sinks else None)
  key = jax.random.key(spec.seed) if rng is None else rng
  ks = layer_ks(spec, cfg, t)
  x = model.embed(tokens_BxT)
  layer_ids = np.arange(cfg.num_layers, dtype=np.int32)
  if (ks == ks[0]).all():
    static_ks = (int(ks[0, 0]), int(ks[0, 1]))

    caps = jnp.asarray(layer_caps(spec, cfg))

    def layer_fn(layer, rl, x, lid):
      return routed_layer(layer, rl, x, ctx, spec, static_ks, jax.random.fold_in(key, lid),
                          caps=caps[lid])

    x, aux = model.run_layers(layer_fn, x, jnp.asarray(layer_ids))
  else:
    def layer_fn(layer, rl, x, per):
      lid, k_pair, cap_pair = per  # numpy leaves in the unrolled loop: static
      return routed_layer(layer, rl, x, ctx, spec, (int(k_pair[0]), int(k_pair[1])),
                          jax.random.fold_in(key, int(lid)), caps=jnp.asarray(cap_pair))

    x, aux = model.run_layers(layer_fn, x, (layer_ids, ks, layer_caps(spec, cfg)), scan=False)
  logits = model.logits(x)
  return (logits, aux) if return_aux else logits


def realized_sparsity(aux: dict[str, Array]) -> Array:
  """Fraction of (token, unit) pairs approximated in one forward."""
  return 1.0 - jnp.mean(aux["exec_rate"])


# ------------------------------------------------------------ capacity tables
def model_table(model: Llama) -> tuple[tuple[float, float], ...] | None:
  """The model's trained per-unit capacity table, or None when it has none."""
  caps = np.asarray(jax.device_get(model.routing.capacity[...]), np.float64)
  if caps.ndim != 2 or (caps < 0).any():
    return None
  return tuple(tuple(float(c) for c in row) for row in caps)


def rescale_table(table: Iterable[Iterable[float]], sparsity: float) -> tuple[tuple[float, ...], ...]:
  """The table with its mean sparsity moved to `sparsity`, keeping its shape.

  Every unit's sparsity is multiplied by one factor (units the table keeps
  dense stay dense); units that would pass 1 are clipped and the rest are
  scaled again until the mean is exact. A table with no sparsity at all
  becomes uniform.
  """
  caps = np.asarray(list(map(list, table)), np.float64)
  s = 1.0 - caps
  if not _is_fraction(sparsity):
    raise ConfigError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
  if s.mean() <= 1e-12:
    out = np.full_like(s, sparsity)
  else:
    out = s.copy()
    for _ in range(len(s.ravel()) + 1):
      free = out < 1.0 - 1e-12
      fixed = out[~free].sum()
      want = sparsity * s.size - fixed
      base = s[free].sum()
      if base <= 1e-12:
        break
      out = np.where(free, s * want / base, 1.0)
      if (out <= 1.0 + 1e-12).all():
        break
      out = np.minimum(out, 1.0)
    out = np.clip(out, 0.0, 1.0)
  return tuple(tuple(float(1.0 - v) for v in row) for row in out)


def trained_spec(model: Llama, spec: RoutingSpec, sparsity: float | None = None) -> RoutingSpec:
  """`spec` with the model's capacity table (rescaled to `sparsity`, default the spec's own)
  when the model has one and the spec names no table; otherwise `spec` unchanged."""
  table = model_table(model)
  if table is None or spec.capacities is not None or spec.policy == "dense":
    return spec
  target = spec.sparsity if sparsity is None else sparsity
  return dataclasses.replace(spec, capacities=rescale_table(table, target))


# ------------------------------------------------------------ calibration
def calibrate_thresholds(model: Llama, batches: Iterable[Array], spec: RoutingSpec,
                         iterations: int = 2) -> np.ndarray:
  """Sets causal-mode thresholds so each unit executes its capacity on `batches`.

  Scores are first collected under top-k routing at the same capacities (so
  later layers see routed inputs), and each unit's threshold is the
  (1 - capacity) quantile of its scores. Then, `iterations` times, scores are
  collected again under causal routing with the current thresholds (the mode
  decoding uses; a unit's inputs depend on earlier units' decisions) and the
  quantiles are taken again. Returns thresholds `[L, 2]` and stores them in the model.
  """
  batches = [jnp.asarray(b, jnp.int32) for b in batches]
  if not batches:
    raise ValueError("calibrate_thresholds needs at least one batch of held-out tokens")
  cfg = model.config
  spec.check_layers(cfg.num_layers)
  caps = layer_caps(spec, cfg)

  def quantiles(scoring: RoutingSpec) -> np.ndarray:
    fwd = nnx.jit(lambda m, t: m(t, routing=scoring, return_aux=True)[1]["scores_BxT"])
    chunks = [np.asarray(fwd(model, b)) for b in batches]
    scores = np.concatenate([c.reshape(c.shape[0], c.shape[1], -1) for c in chunks], axis=-1)
    thr = np.zeros((cfg.num_layers, len(UNITS)), np.float32)
    for l in range(cfg.num_layers):
      for u in range(len(UNITS)):
        c = caps[l, u]
        if c >= 1.0:
          thr[l, u] = -np.inf
        elif c <= 0.0:
          thr[l, u] = np.inf
        else:
          thr[l, u] = _threshold_between(scores[l, u], c)
    return thr

  thr = quantiles(spec.inference("topk"))
  causal = spec.inference("causal")
  for _ in range(iterations):
    model.routing.threshold[...] = jnp.asarray(thr)
    thr = quantiles(causal)
  model.routing.threshold[...] = jnp.asarray(thr)
  model.routing.calibrated_for[...] = jnp.asarray(caps)
  return thr


def _threshold_between(scores: np.ndarray, capacity: float) -> np.float32:
  """A float32 threshold that `capacity` of `scores` exceed and none equals.

  It lies halfway between the score at the (1 - capacity) quantile (taken as the
  nearest lower score) and the next larger distinct score, so ties decide nothing on
  the calibration data: `score > threshold` here and an exported `[score, threshold]`
  argmax (which executes on a tie) agree on every calibration token.
  """
  s = np.unique(scores.astype(np.float32).ravel())  # sorted, distinct
  q = np.quantile(scores.astype(np.float64), 1.0 - capacity)
  i = max(int(np.searchsorted(s, q, side="right")) - 1, 0)  # largest score <= q
  lo = s[i]
  if i + 1 >= len(s):
    return np.nextafter(lo, np.float32(np.inf))
  mid = np.float32((np.float64(lo) + np.float64(s[i + 1])) / 2)
  return mid if lo < mid < s[i + 1] else lo


def check_calibrated(model: Llama, spec: RoutingSpec) -> None:
  """Refuses causal routing at capacities the model's thresholds were not calibrated for.

  Units at capacity 1 or 0 ignore thresholds and are not checked; top-k mode and
  the dense policy need no thresholds. Does nothing under a trace (the values are
  not known): call it before jitting, as `generate` and the evaluators do.
  """
  if spec.mode != "causal" or spec.policy == "dense":
    return
  stored = model.routing.calibrated_for[...]
  if isinstance(stored, jax.core.Tracer):
    return
  cfg = model.config
  want = layer_caps(spec, cfg)
  stored = np.asarray(stored, np.float32)
  used = (want > 0) & (want < 1)
  if np.allclose(stored[used], want[used], rtol=0, atol=1e-6):
    return
  if (stored < 0).all():
    got = "were never calibrated"
  else:
    got = (f"were calibrated for other capacities (mean {float(stored.mean()):.4g}, "
           f"this spec: {float(want.mean()):.4g})")
  raise ConfigError(
      f"causal routing at sparsity {1 - float(want.mean()):.4g}: the model's thresholds {got}; "
      "calibrate them for this spec first (routing.calibrate_thresholds(model, held-out "
      "batches, spec); ir_jax.eval does it with --calibration) or route in top-k mode")


# ----------------------------------------------------------------- decode
def init_cache(cfg: LlamaConfig, batch: int, max_len: int) -> dict[str, Array]:
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return dict(k=jnp.zeros(shape, cfg.compute_dtype), v=jnp.zeros(shape, cfg.compute_dtype))


def decode_body(model: Llama, cache: dict[str, Array], token_B: Array, pos: Array,
                spec: RoutingSpec) -> tuple[Array, dict[str, Array], Array]:
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
    raise ConfigError("decoding routes with hard gates: pass spec.inference('causal') "
                      "(thresholds) or spec.inference('topk') (static row capacity)")
  cfg = model.config
  spec.check_layers(cfg.num_layers)
  b = token_B.shape[0]
  pos_Bx1 = jnp.full((b, 1), pos, jnp.int32)
  ctx = _Ctx(pos_Bx1, pos_Bx1, None, sink_BxT=(pos_Bx1 == 0) if spec.protect_sinks else None)
  key = jax.random.key(spec.seed)
  x = model.embed(token_B[:, None])
  graphdef, state = nnx.split(model.layers)
  rgraphdef, rstate = nnx.split(model.routing)
  caps = layer_caps(spec, cfg)
  if spec.mode == "topk":
    ks = np.array([[row_k(spec, b, l, u) for u in range(len(UNITS))]
                   for l in range(cfg.num_layers)], np.int32)
  else:
    ks = np.ones((cfg.num_layers, len(UNITS)), np.int32)

  def one_layer(lid, x, ck, cv, cap, k_pair):
    take = lambda a: a[lid]
    layer = lambda: nnx.merge(graphdef, jax.tree.map(take, state))  # sliced where used
    rl = nnx.merge(rgraphdef, jax.tree.map(take, rstate))
    x, aux, (ck, cv) = routed_layer(layer, rl, constrain(x, BxTxD), ctx, spec, k_pair,
                                    jax.random.fold_in(key, lid), cache=(ck, cv, pos),
                                    caps=cap)
    return constrain(x, BxTxD), (ck, cv, aux["gate_BxT"][:, :, 0])

  # Each layer returns only this step's keys/values `[B, 1, N, K]`; they are written
  # into the cache once below (in place when the caller donates the cache).
  if (ks == ks[0]).all() and cfg.scan_layers:
    k_pair = (int(ks[0, 0]), int(ks[0, 1]))
    x, (new_k, new_v, gates) = jax.lax.scan(
        lambda x, per: one_layer(*per[:1], x, *per[1:], k_pair), x,
        (jnp.arange(cfg.num_layers), cache["k"], cache["v"], jnp.asarray(caps)))
  else:  # per-layer row counts: unrolled, each layer with its own static k
    outs = []
    for l in range(cfg.num_layers):
      x, o = one_layer(l, x, cache["k"][l], cache["v"][l], jnp.asarray(caps[l]),
                       (int(ks[l, 0]), int(ks[l, 1])))
      outs.append(o)
    new_k, new_v, gates = (jnp.stack(a) for a in zip(*outs))
  write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new, pos, axis=2)
  return (model.logits(x)[:, 0], dict(k=write(cache["k"], new_k), v=write(cache["v"], new_v)),
          gates)


# The cache is donated: pass each step the cache the previous step returned.
decode_step = nnx.jit(decode_body, static_argnames=("spec",), donate_argnames=("cache",))


def generate(model: Llama, prompt_BxT: Array, max_new_tokens: int,
             spec: RoutingSpec) -> tuple[np.ndarray, np.ndarray]:
  """Greedy decoding with a KV cache: (tokens `[B, T + new]`, logits of every step).

  The prompt is fed token by token through the same step, so every token's
  routing decision is causal.
  """
  check_calibrated(model, spec)
  prompt = np.asarray(prompt_BxT)
  b, t = prompt.shape
  total = t + max_new_tokens
  if total > model.config.max_position_embeddings:
    raise ConfigError(f"prompt + new tokens = {total} exceeds max_position_embeddings "
                      f"{model.config.max_position_embeddings}")
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


# ----------------------------------------------------------------- FLOPs
def unit_flops(cfg: LlamaConfig, seq_len: int) -> tuple[float, float]:
  """Matmul FLOPs one token saves when its (attention, MLP) unit is approximated: q and o
  projections plus scores and values over `seq_len` keys; the whole SwiGLU MLP."""
  d, h, k, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  return float(2 * d * h * k * 2 + 2 * seq_len * h * k * 2), float(3 * 2 * d * f)


def flops(cfg: LlamaConfig, spec: RoutingSpec, seq_len: int, batch: int = 1) -> dict[str, float]:
  """Matmul FLOPs (2 per multiply-add) of one forward over `batch x seq_len` tokens.

  dense: the plain model. executed: what this implementation computes for
  `spec` (units run, forecasters, routers); for causal mode and
  compute="all" every unit runs, so executed exceeds dense there. ideal:
  what a perfect skip would compute at the spec's capacities. Attention
  scores count the full `[T, T]` product, as computed.
  """
  d, h, n, k, f, v, t = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.vocab_size, seq_len)
  q_o = 2 * d * h * k * 2  # q and o projections
  kv = 2 * d * n * k * 2
  core = 2 * t * h * k * 2  # scores and weighted values over all T keys
  mlp = 3 * 2 * d * f
  head = 2 * d * v
  dense_layer = q_o + kv + core + mlp
  dense = batch * t * (cfg.num_layers * dense_layer + head)
  runs_all = spec.mode == "causal" or spec.compute == "all" or spec.gate == "gumbel"
  executed = ideal = batch * t * head
  for l in range(cfg.num_layers):
    ka, km = (spec.k(t, l, 0), spec.k(t, l, 1)) if spec.mode == "topk" else (
        spec.capacity(l, 0) * t, spec.capacity(l, 1) * t)
    routed = spec.policy != "dense" and not (spec.mode == "topk" and ka == t and km == t)
    extra = 0
    if routed:
      if spec.policy != "greedy":
        extra += 2 * lff_flops(cfg)
      if spec.policy in ("informed", "greedy"):
        extra += 2 * router_flops(cfg)
    ideal += batch * (t * (kv + extra) + ka * (q_o + core) + km * mlp)
    if runs_all or spec.policy == "oracle":
      executed += batch * t * (dense_layer + extra)
    else:
      executed += batch * (t * (kv + extra) + ka * (q_o + core) + km * mlp)
  return dict(dense=float(dense), executed=float(executed), ideal=float(ideal),
              executed_fraction=executed / dense, ideal_fraction=ideal / dense)
