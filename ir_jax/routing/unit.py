"""One routed unit: score tokens, pick the executed ones, run the unit on them, merge.

`route_unit` computes a unit's contribution to the residual for every policy
(informed, greedy, random, oracle, dense), in top-k mode (gathered `[B, k, D]`,
static shapes) or causal mode (per-token thresholds); `_route_rows` is its
static row capacity for a decode step of several rows.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ir_jax.forecast import Forecaster, Router
from ir_jax.model import BxTxD
from ir_jax.routing.spec import RoutingSpec
from ir_jax.sharding import constrain

Array = jax.Array


# ------------------------------------------------------------------ helpers
def gather(a_BxT_: Array, idx_BxS: Array) -> Array:
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


def _forecast_and_scores(
  n_BxTxD: Array,
  unit_fn: UnitFn,
  lff: Forecaster,
  router: Router,
  spec: RoutingSpec,
  key: Array,
  forecast_only: bool = False,
) -> tuple[Array, Array | None, Array]:
  """(forecast, the unit's output for every token if the policy needed it, scores `[B, T]`):
  the forecast is 0 for greedy; scores are the router's, uniform noise (random) or the
  forecast error (oracle, which runs the unit on every token). A forecast-only unit (and
  the static policy) has no scores to compute: zeros, so only segment starts stand out."""
  b, t, _ = n_BxTxD.shape
  forecast = jnp.zeros_like(n_BxTxD) if spec.policy == "greedy" else lff(n_BxTxD)
  if forecast_only or spec.policy == "static":
    return forecast, None, jnp.zeros((b, t), jnp.float32)
  if spec.policy == "oracle":
    u_all = unit_fn(None, n_BxTxD)
    return forecast, u_all, jnp.sum(jnp.square((u_all - forecast).astype(jnp.float32)), -1)
  if spec.policy == "random":
    return forecast, None, jax.random.uniform(key, (b, t), jnp.float32)
  return forecast, None, router(n_BxTxD)


def route_unit(
  n_BxTxD: Array,
  x_BxTxD: Array,
  unit_fn: UnitFn,
  lff: Forecaster,
  router: Router,
  spec: RoutingSpec,
  k: int,
  threshold: Array,
  key: Array,
  temperature: Array | None = None,
  sink_BxT: Array | None = None,
  rows: bool = False,
  forecast_only: bool = False,
) -> tuple[Array, dict[str, Array]]:
  """The unit's contribution to the residual for every token, and statistics.

  `unit_fn(idx_BxS, n_BxSxD)` runs the unit for the tokens at `idx` (None:
  all tokens). Returns (delta_BxTxD, aux) with aux = {exec_rate: mean gate
  (differentiable for ste/gumbel), importance: mean over tokens of
  (1 - g) * (1 - cos(x, x + Unit(n))) (0 when only gathered tokens ran),
  scores_BxT: the routing scores, gate_BxT: which tokens executed}. Tokens in `sink_BxT` always execute (they
  take top-k slots first; gates and thresholds are forced open for them).
  `rows=True` (a decode step of several rows, top-k mode): `k` counts rows, and
  `unit_fn` takes row indices `[k]` (see `_route_rows`).
  `forecast_only` (static; the unit's capacity is 0): no router runs, every token gets the
  forecast except segment starts, which execute (top-k: `k` sink slots, see
  `spec.sink_slots`; causal: a threshold of +inf passes sinks alone).
  """
  b, t, _ = n_BxTxD.shape
  f32 = jnp.float32
  if rows and spec.policy != "dense":
    return _route_rows(n_BxTxD, unit_fn, lff, router, spec, k, key, sink_BxT, forecast_only)
  if spec.policy == "dense" or (spec.mode == "topk" and k == t and spec.gate == "hard"):
    return unit_fn(None, n_BxTxD), dict(
      exec_rate=jnp.ones((), f32),
      importance=jnp.zeros((), f32),
      scores_BxT=jnp.zeros((b, t), f32),
      gate_BxT=jnp.ones((b, t), bool),
    )
  forecast, u_all, scores = _forecast_and_scores(
    n_BxTxD, unit_fn, lff, router, spec, key, forecast_only
  )
  soft = jax.nn.sigmoid(scores)
  if sink_BxT is not None:
    scores = jnp.where(sink_BxT, scores + SINK_BONUS, scores)

  if spec.mode == "causal":
    gate = scores > threshold
    if sink_BxT is not None:  # also under a threshold of +inf (a forecast-only unit)
      gate = gate | sink_BxT
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
      u_sel = constrain(unit_fn(idx, constrain(gather(n_BxTxD, idx), BxTxD)), BxTxD)
      if spec.gate == "ste":  # value u_sel, d/d(score) = <., u - f>
        s_sel = gather(soft, idx)[..., None]
        f_sel = constrain(gather(forecast, idx), BxTxD)
        u_sel = u_sel + (s_sel - jax.lax.stop_gradient(s_sel)) * (u_sel - f_sel)
      out = forecast.at[jnp.arange(b)[:, None], idx].set(u_sel.astype(forecast.dtype))
      out = constrain(out, BxTxD)
    importance = jnp.zeros((), f32)
  elif spec.mode == "causal" and spec.compute == "gathered" and t == 1 and u_all is None:
    # A decode step: run the unit only when some row's token passes its
    # threshold (lax.cond executes one branch), so a skipped unit costs its
    # forecast and router alone. With one row this is exact per-token skipping.
    out = jax.lax.cond(
      jnp.any(gate),
      lambda: jnp.where(gate[..., None], unit_fn(None, n_BxTxD), forecast),
      lambda: forecast,
    )
    importance = jnp.zeros((), f32)
  else:
    if u_all is None:
      u_all = unit_fn(None, n_BxTxD)
    if spec.gate == "hard":
      out = jnp.where(gate[..., None], u_all, forecast)
    else:
      out = forecast + g[..., None].astype(forecast.dtype) * (u_all - forecast)
    importance = jnp.mean((1.0 - g) * _importance(x_BxTxD, jax.lax.stop_gradient(u_all)))
  return out, dict(exec_rate=jnp.mean(g), importance=importance, scores_BxT=scores, gate_BxT=gate)


def _route_rows(
  n_Bx1xD: Array,
  unit_fn: UnitFn,
  lff: Forecaster,
  router: Router,
  spec: RoutingSpec,
  k: int,
  key: Array,
  sink_Bx1: Array | None,
  forecast_only: bool = False,
) -> tuple[Array, dict[str, Array]]:
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
  forecast, u_all, scores = _forecast_and_scores(
    n_Bx1xD, unit_fn, lff, router, spec, key, forecast_only
  )
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
  return out, dict(
    exec_rate=jnp.mean(gate.astype(f32)),
    importance=jnp.zeros((), f32),
    scores_BxT=scores,
    gate_BxT=gate,
  )
