"""Closed-form fits from streamed statistics: forecasters, router warm starts, capacity tables.

Forecasters: per unit, a reduced-rank ridge regression of the unit's output
on its normed input, from the moments sum(x), sum(y), X^T X, X^T Y over
ordinary tokens (segment starts excluded: they always execute, and their
massive activations would dominate any squared error). The linear map is
written into the LFF exactly (a large offset puts SiLU in its linear range).

Routers: per unit, a ridge regression of log forecast error on the unit
input, the oracle's choice made learnable; scaled so Gumbel gates are
sensible and centred on the unit's capacity.

Capacity table: per unit, a damage curve (by default the relative forecast
error its router leaves behind at each sparsity; or measured loss probes); a
greedy allocation then spreads the target sparsity where damage rises least.

Every pass is one jitted function per batch whose outputs have a leading
layers axis, so it shards like the model (d = 4096: 64 Gram matrices of
4096^2 floats, about 4.3 GB, split over the devices with the layers).

Across processes (a pod): batches are global arrays whose rows live on
several hosts and the model may be FSDP-sharded over them, so every pass's
outputs (and the token masks that select from them) are gathered whole onto
every process (`ir_jax.distributed.host_array`, a collective all processes
call in the same order); the solves then run on the same numbers on every
host, and what is written back into the model is process 0's result, placed
with the sharding the variable had (`_set`), so replicas cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.distributed import host_array
from ir_jax.forecast import UNITS
from ir_jax.model import Llama
from ir_jax.progress import counter, doing
from ir_jax.routing import RoutingSpec, sink_mask
from ir_jax.train.steps import lm_loss

Array = jax.Array
# SiLU(z + OFFSET) = z + OFFSET to within 1e-4 for z > -6 (z has unit std), and
# ReLU(z + OFFSET) is exactly linear for z > -OFFSET.
OFFSET = 12.0
# Router scores are SCORE_SCALE standard deviations of predicted log error.
SCORE_SCALE = 2.0
_LOG_EPS = 1e-12


# ------------------------------------------------------------------ passes
def _ordinary(batch: dict[str, Array]) -> Array:
  """1.0 at real tokens that are not segment starts `[B, T]`."""
  seg = batch["segment_ids"]
  b, t = seg.shape
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return ((seg > 0) & ~sink_mask(index, seg)).astype(jnp.float32)


def _dense_units(model: Llama, batch: dict[str, Array], per_unit: Callable) -> Any:
  """Runs the dense model; `per_unit(rl, unit, n_BxTxD, u_BxTxD, x_BxTxD)` -> stats, stacked
  [L, 2, ...]; x is the residual stream the unit's output is added to."""
  tokens, positions, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
  b, t = tokens.shape
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def layer_fn(layer, routing_layer, x, _):
    n = layer.input_layernorm(x)
    a = layer.self_attn(n, positions, index, seg)
    sa = per_unit(routing_layer, 0, n, a, x)
    x = x + a
    n2 = layer.post_attention_layernorm(x)
    m = layer.mlp(n2)
    sm = per_unit(routing_layer, 1, n2, m, x)
    return x + m, jax.tree.map(lambda p, q: jnp.stack([p, q]), sa, sm)

  _, stats = model.run_layers(layer_fn, model.embed(tokens))
  return stats


@nnx.jit(static_argnames=("outlier",))
def _forecaster_moments(model: Llama, batch: dict[str, Array], outlier: float) -> dict[str, Array]:
  ordinary = _ordinary(batch).reshape(-1)

  def per_unit(routing_layer, unit, n, u, x_res):
    x = n.reshape(-1, n.shape[-1]).astype(jnp.float32)
    y = u.reshape(-1, u.shape[-1]).astype(jnp.float32)
    # Tokens whose unit output is `outlier` times the batch's mean energy (secondary
    # sinks, massive activations) would dominate the squares; they are left out.
    energy = jnp.sum(y * y, -1)
    mean = jnp.sum(energy * ordinary) / jnp.maximum(jnp.sum(ordinary), 1.0)
    w = ordinary * (energy <= outlier * mean)
    xw = x * w[:, None]
    return dict(
      count=jnp.sum(w),
      sx=w @ x,
      sy=w @ y,
      xtx=xw.T @ x,
      xty=xw.T @ y,
      dropped=jnp.sum(ordinary) - jnp.sum(w),
    )

  return _dense_units(model, batch, per_unit)


def _approximation(routing_layer, unit: int, n: Array, greedy: bool) -> Array:
  """What approximating the unit puts in its place: the forecast, or nothing (greedy)."""
  return jnp.zeros_like(n) if greedy else routing_layer.forecaster(unit)(n)


@nnx.jit(static_argnames=("greedy",))
def _router_moments(model: Llama, batch: dict[str, Array], greedy: bool) -> dict[str, Array]:
  w = _ordinary(batch).reshape(-1)

  def per_unit(routing_layer, unit, n, u, x_res):
    f = _approximation(routing_layer, unit, n, greedy)
    x = n.reshape(-1, n.shape[-1]).astype(jnp.float32)
    err = jnp.sum(jnp.square((u - f).astype(jnp.float32)), -1).reshape(-1)
    tot = jnp.sum(jnp.square(u.astype(jnp.float32)), -1).reshape(-1)
    y = jnp.log(err + _LOG_EPS)
    xw = x * w[:, None]
    return dict(
      count=jnp.sum(w),
      sx=w @ x,
      xtx=xw.T @ x,
      xty=xw.T @ y,
      sy=w @ y,
      syy=w @ (y * y),
      err=w @ err,
      tot=w @ tot,
    )

  return _dense_units(model, batch, per_unit)


@nnx.jit
def _forecast_error(model: Llama, batch: dict[str, Array]) -> dict[str, Array]:
  w = _ordinary(batch).reshape(-1)

  def per_unit(routing_layer, unit, n, u, x_res):
    f = routing_layer.forecaster(unit)(n)
    err = jnp.sum(jnp.square((u - f).astype(jnp.float32)), -1).reshape(-1)
    tot = jnp.sum(jnp.square(u.astype(jnp.float32)), -1).reshape(-1)
    return dict(err=w @ err, tot=w @ tot)

  return _dense_units(model, batch, per_unit)


@nnx.jit(static_argnames=("greedy",))
def _error_curves(model: Llama, batch: dict[str, Array], greedy: bool) -> dict[str, Array]:
  def per_unit(routing_layer, unit, n, u, x_res):
    f = _approximation(routing_layer, unit, n, greedy)
    err = jnp.sum(jnp.square((u - f).astype(jnp.float32)), -1)
    scale = jnp.sum(jnp.square(x_res.astype(jnp.float32)), -1)
    return dict(
      score=routing_layer.router(unit)(n).reshape(-1),
      rel_err=(err / jnp.maximum(scale, 1e-30)).reshape(-1),
    )

  return _dense_units(model, batch, per_unit)


def error_curves(
  model: Llama, batches: list[dict[str, Any]], greedy: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """(router scores, relative approximation errors |Unit(n) - LFF(n)|^2 / |x|^2, LFF = 0 when
  `greedy`), `[L, 2, n]` over the n ordinary tokens of `batches` in the dense model."""
  scores, errs = [], []
  bar = counter("  error curves", len(batches), unit="batches")
  for i, b in enumerate(batches):
    b = {k: jnp.asarray(v) for k, v in b.items()}
    with doing("compiling the error-curve pass" if i == 0 else "measuring error curves"):
      out = _error_curves(model, b, greedy)
      keep = host_array(_ordinary(b)).reshape(-1) > 0  # global rows, as the outputs
      scores.append(host_array(out["score"])[..., keep])
      errs.append(host_array(out["rel_err"])[..., keep])
    bar(i + 1)
  return np.concatenate(scores, -1), np.concatenate(errs, -1)


def allocate_curves(
  scores: np.ndarray,
  rel_err: np.ndarray,
  sparsity: float,
  step: float = 1 / 16,
  max_sparsity: float = 0.875,
  unit_cost: tuple[float, float] | None = None,
) -> np.ndarray:
  """Per-unit capacities `[L, 2]` from damage curves, at mean sparsity `sparsity`.

  A unit's damage at sparsity s is the summed relative forecast error of the
  s-fraction of tokens its router approximates (lowest scores): the residual
  perturbation approximating leaves behind. Sparsity goes `step` at a time to
  the unit whose curve rises least; the last increment is partial.

  With `unit_cost` (FLOPs one token saves per approximated (attention, MLP)
  unit, `routing.unit_flops`) the budget is compute instead: the table saves
  what a uniform `sparsity` saves, and an increment is ranked by damage per
  FLOP saved (its mean pair sparsity then differs from `sparsity`).
  """
  num_l, num_u, n = rel_err.shape
  order = np.argsort(scores, axis=-1, kind="stable")
  cum = np.concatenate(
    [np.zeros((num_l, num_u, 1)), np.cumsum(np.take_along_axis(rel_err, order, -1), -1) / n], -1
  )

  def curve(s: np.ndarray) -> np.ndarray:  # damage at sparsity s per unit, interpolated
    pos = np.clip(s, 0.0, 1.0) * n
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n)
    frac = pos - lo
    a = np.take_along_axis(cum, lo[..., None], -1)[..., 0]
    b = np.take_along_axis(cum, hi[..., None], -1)[..., 0]
    return a + frac * (b - a)

  w = (
    np.ones((num_l, num_u))
    if unit_cost is None
    else np.broadcast_to(np.asarray(unit_cost, np.float64) / max(unit_cost), (num_l, num_u))
  )
  return _greedy_table(curve, w, sparsity, step, max_sparsity)


def _greedy_table(
  curve: Callable[[np.ndarray], np.ndarray],
  w: np.ndarray,
  sparsity: float,
  step: float,
  max_sparsity: float,
) -> np.ndarray:
  """Capacities `[L, 2]`: add sparsity `step` at a time to the unit whose damage
  `curve(s)` rises least per unit of weight `w`, until the w-weighted mean sparsity is
  `sparsity`; no unit passes `max_sparsity`; the last increment is partial."""
  s = np.zeros(w.shape)
  budget = sparsity * w.sum()  # in units of pairs (or of the dearer unit's FLOPs)
  cap_s = max(max_sparsity, sparsity)
  while budget > 1e-12:
    inc = np.minimum(step, cap_s - s)
    cost = (curve(s + inc) - curve(s)) / np.maximum(inc * w, 1e-12)
    cost[inc <= 1e-12] = np.inf
    j = np.unravel_index(np.argmin(cost), s.shape)
    if not np.isfinite(cost[j]):
      break
    add = min(inc[j], budget / w[j])
    s[j] += add
    budget -= add * w[j]
  return 1.0 - s


def _accumulate(
  fn: Callable,
  model: Llama,
  batches: Iterable[dict[str, Any]],
  progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
  total = None
  for i, batch in enumerate(batches):
    with doing("compiling the statistics pass" if i == 0 else "gathering statistics"):
      out = fn(model, {k: jnp.asarray(v) for k, v in batch.items()})
      total = out if total is None else jax.tree.map(jnp.add, total, out)
      if i == 0:  # the first batch's wait (compile and run) belongs to this label
        jax.block_until_ready(total)
    if progress is not None:
      progress(i + 1)
  if total is None:
    raise ValueError("a closed-form fit needs at least one batch")
  return {k: np.asarray(host_array(v), np.float64) for k, v in total.items()}


def forecaster_moments(
  model, batches, progress=None, outlier: float = float("inf")
) -> dict[str, np.ndarray]:
  """Per-unit moments of (unit input, unit output) over ordinary tokens, `[L, 2, ...]`;
  tokens whose output energy passes `outlier` x the batch mean are left out (`dropped`)."""
  return _accumulate(lambda m, b: _forecaster_moments(m, b, outlier), model, batches, progress)


def router_moments(model, batches, progress=None, greedy: bool = False) -> dict[str, np.ndarray]:
  """Per-unit moments of (unit input, log approximation error), plus summed squared error
  and squared output over ordinary tokens (for explained variance), `[L, 2, ...]`. The
  approximation is the forecast, or zero when `greedy` (then the target is log |Unit(n)|^2)."""
  fn = lambda m, b: _router_moments(m, b, greedy)
  return _accumulate(fn, model, batches, progress)


def forecast_error(model, batches, progress=None) -> dict[str, np.ndarray]:
  """Summed squared forecast error and squared unit output over ordinary tokens `[L, 2]`."""
  return _accumulate(_forecast_error, model, batches, progress)


def explained(m: dict[str, np.ndarray]) -> np.ndarray:
  """1 - sum |f - u|^2 / sum |u|^2 per unit `[L, 2]` from `router_moments` output."""
  return 1.0 - m["err"] / np.maximum(m["tot"], 1e-30)


# ------------------------------------------------------------------ solves
def _centered(m: dict[str, np.ndarray], ridge: float) -> tuple[np.ndarray, ...]:
  n = max(float(m["count"]), 1.0)
  mx = m["sx"] / n
  cxx = m["xtx"] / n - np.outer(mx, mx)
  cxx = 0.5 * (cxx + cxx.T)
  d = cxx.shape[0]
  lam = ridge * max(np.trace(cxx) / d, 1e-12)
  return n, mx, cxx, cxx + lam * np.eye(d)


def solve_forecaster(m: dict[str, np.ndarray], rank: int, ridge: float) -> dict[str, np.ndarray]:
  """LFF weights (w1 [d, r], b1 [r], w2 [r, d], b2 [d]) of the rank-`rank` ridge fit of one unit.

  B = (Cxx + lambda I)^-1 Cxy; keep the top-r directions of the fitted outputs
  (eigenvectors V of B^T Cxx B), so f(x) = my + (x - mx) B V V^T. Written as
  W2 silu(W1 x + b1) + b2 with W1 = B V / sigma, b1 = OFFSET - mx W1 and
  W2 = sigma V^T, b2 = my - OFFSET sigma V^T, sigma the std of each direction.
  """
  n, mx, cxx, reg = _centered(m, ridge)
  my = m["sy"] / n
  cxy = m["xty"] / n - np.outer(mx, my)
  b = np.linalg.solve(reg, cxy)
  d = b.shape[0]
  r_fit = min(rank, d)
  fitted = b.T @ cxx @ b
  evals, evecs = np.linalg.eigh(0.5 * (fitted + fitted.T))
  v = evecs[:, ::-1][:, :r_fit]  # [d, r]
  a = b @ v
  sigma = np.sqrt(np.maximum(np.einsum("dr,de,er->r", a, cxx, a), 1e-12))
  w1 = np.zeros((d, rank))
  b1 = np.zeros(rank)
  w2 = np.zeros((rank, d))
  w1[:, :r_fit] = a / sigma
  b1[:r_fit] = OFFSET - mx @ w1[:, :r_fit]
  w2[:r_fit] = sigma[:, None] * v.T
  b2 = my - OFFSET * (sigma @ v.T)
  return dict(w1=w1, b1=b1, w2=w2, b2=b2)


def solve_router(m: dict[str, np.ndarray], ridge: float) -> dict[str, float | np.ndarray]:
  """Ridge fit of log forecast error on the unit input: w [d], bias, and the fit's
  prediction std and R^2 on the fitted tokens."""
  n, mx, cxx, reg = _centered(m, ridge)
  my = m["sy"] / n
  cxy = m["xty"] / n - mx * my
  w = np.linalg.solve(reg, cxy)
  var_y = max(m["syy"] / n - my * my, 1e-12)
  var_pred = max(float(w @ cxx @ w), 1e-12)
  return dict(
    w=w,
    bias=my - mx @ w,
    mean=my,
    mx=mx,
    std=math.sqrt(var_pred),
    r2=1.0 - max(var_y - 2 * float(w @ cxy) + var_pred, 0.0) / var_y,
  )


# ------------------------------------------------------------ into the model
def _stack(per: list[list[dict[str, np.ndarray]]], name: str, unit: int) -> np.ndarray:
  return np.stack([layer[unit][name] for layer in per])


def _set(var: nnx.Variable, value: np.ndarray) -> None:
  """Writes `value` into `var` with its dtype, shape and sharding. Across processes the
  value is process 0's (host-side solves may differ in the last bit from host to host,
  and every replica of a parameter must hold the same number)."""
  old = var[...]
  new = np.asarray(jnp.asarray(value, old.dtype).reshape(old.shape))
  if not isinstance(old, jax.Array):
    var[...] = jnp.asarray(new)
    return
  if not old.is_fully_addressable:
    from jax.experimental import multihost_utils

    new = np.asarray(multihost_utils.broadcast_one_to_all(new))
  var[...] = jax.device_put(new, old.sharding)


def set_forecasters(model: Llama, moments: dict[str, np.ndarray], ridge: float) -> None:
  """Writes the reduced-rank ridge fit of every unit into the model's forecasters."""
  num_layers = moments["count"].shape[0]
  n_units = num_layers * len(UNITS)
  bar = counter("  forecaster ridge solves", n_units, unit="units")
  per: list[list[dict[str, np.ndarray]]] = [[] for _ in range(num_layers)]
  with doing("solving the forecasters' ridge regressions"):
    for j in range(n_units):
      l, u = divmod(j, len(UNITS))
      m = {k: v[l, u] for k, v in moments.items()}
      per[l].append(solve_forecaster(m, model.config.lff_rank, ridge))
      bar(j + 1)
  for u in range(len(UNITS)):
    lff = model.routing.forecaster(u)
    for name in ("w1", "b1", "w2", "b2"):
      _set(getattr(lff, name), _stack(per, name, u))


def set_routers(model: Llama, moments: dict[str, np.ndarray], ridge: float) -> np.ndarray:
  """Routers score SCORE_SCALE x (predicted log error - its mean) / its std; returns R^2 `[L, 2]`.

  A hidden-layer router carries the linear fit in hidden unit 0 (ReLU with a
  large offset is exactly linear there); its other hidden units keep their
  initial weights with zero output weight, free for the LM-loss stage.
  """
  num_layers = moments["count"].shape[0]
  r2 = np.zeros((num_layers, len(UNITS)))
  bar = counter("  router ridge solves", num_layers * len(UNITS), unit="units")
  for u in range(len(UNITS)):
    router = model.routing.router(u)
    hidden = router.hidden
    w2 = np.array(host_array(router.w2[...]), np.float64)
    b2 = np.zeros((num_layers, 1))
    if hidden:
      w1 = np.array(host_array(router.w1[...]), np.float64)
      b1 = np.array(host_array(router.b1[...]), np.float64)
    for l in range(num_layers):
      fit = solve_router({k: v[l, u] for k, v in moments.items()}, ridge)
      bar(u * num_layers + l + 1)
      r2[l, u] = fit["r2"]
      alpha = SCORE_SCALE / fit["std"]
      if hidden:
        # hidden0 = relu((x - mx) w / std + OFFSET); score = alpha std (hidden0 - OFFSET)
        w1[l, :, 0] = fit["w"] / fit["std"]
        b1[l, 0] = OFFSET - fit["mx"] @ fit["w"] / fit["std"]
        w2[l] = 0.0
        w2[l, 0] = alpha * fit["std"]
        b2[l, 0] = -alpha * fit["std"] * OFFSET
      else:
        w2[l] = alpha * fit["w"]
        b2[l, 0] = alpha * (fit["bias"] - fit["mean"])
    if hidden:
      _set(router.w1, w1)
      _set(router.b1, b1)
    _set(router.w2, w2)
    _set(router.b2, b2)
  return r2


# ------------------------------------------------------------ capacity table
@nnx.jit(static_argnames=("spec",))
def _routed_nll(model: Llama, batch: dict[str, Array], spec: RoutingSpec) -> tuple[Array, Array]:
  logits, aux = model(
    batch["inputs"], batch["positions"], batch["segment_ids"], routing=spec, return_aux=True
  )
  return lm_loss(logits, batch)[0], aux["scores_BxT"]


def _causal_all(greedy: bool) -> RoutingSpec:
  # Threshold routing where the model's thresholds decide: the spec's capacity must be
  # inside (0, 1), since capacity 1 (0) forces every unit to execute (approximate).
  return RoutingSpec(policy="greedy" if greedy else "informed", mode="causal", sparsity=0.5)


def unit_scores(
  model: Llama, batches: list[dict[str, Any]], greedy: bool = False
) -> tuple[float, np.ndarray]:
  """(mean NLL of the dense model, router scores `[L, 2, n]` of the n ordinary tokens)."""
  thr_var = model.routing.threshold
  saved = thr_var[...]
  try:
    _set(thr_var, np.full(saved.shape, -np.inf, np.float32))  # every token executes
    base, scores = [], []
    for i, b in enumerate(batches):
      b = {k: jnp.asarray(v) for k, v in b.items()}
      with doing("compiling the routed loss pass" if i == 0 else "scoring tokens"):
        nll, batch_scores = _routed_nll(model, b, _causal_all(greedy))
      base.append(float(host_array(nll)))
      scores.append(host_array(batch_scores)[:, :, host_array(_ordinary(b)) > 0])
  finally:
    thr_var[...] = saved
  return float(np.mean(base)), np.concatenate(scores, axis=-1)


def unit_damage(
  model: Llama,
  batches: list[dict[str, Any]],
  level: float,
  progress: Callable[[int, int], None] | None = None,
  greedy: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """(loss increase `[L, 2]` when only that unit approximates `level` of the ordinary
  tokens, its router choosing; the scores `[L, 2, n]`). Threshold routing, so one compile
  serves every unit."""
  base, scores = unit_scores(model, batches, greedy)
  batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
  thr_var = model.routing.threshold
  saved = thr_var[...]
  shape = saved.shape
  damage = np.zeros(shape)
  try:
    for j in range(shape[0] * shape[1]):
      l, u = divmod(j, shape[1])
      thr = np.full(shape, -np.inf, np.float32)
      thr[l, u] = np.quantile(scores[l, u], level)
      _set(thr_var, thr)
      nll = [float(host_array(_routed_nll(model, b, _causal_all(greedy))[0])) for b in batches]
      damage[l, u] = np.mean(nll) - base
      if progress is not None:
        progress(j + 1, shape[0] * shape[1])
  finally:
    thr_var[...] = saved
  return damage, scores


def center_routers(model: Llama, capacities: np.ndarray, scores: np.ndarray) -> None:
  """Shifts each router's output bias so score 0 sits at its unit's (1 - capacity) quantile
  of `scores`: Gumbel gates then execute about the capacity from the first step."""
  for u in range(len(UNITS)):
    router = model.routing.router(u)
    b2 = np.asarray(router.b2[...], np.float64).copy()
    for l in range(b2.shape[0]):
      c = float(capacities[l, u])
      if 0.0 < c < 1.0:
        b2[l] -= np.quantile(scores[l, u], 1.0 - c)
    _set(router.b2, b2)


def set_table(model: Llama, capacities: np.ndarray, scores: np.ndarray) -> None:
  """Stores the capacity table `[L, 2]` in the model and centres the routers on it."""
  _set(model.routing.capacity, np.asarray(capacities, np.float32))
  center_routers(model, np.asarray(capacities), scores)


def allocate(
  damage: np.ndarray,
  sparsity: float,
  level: float,
  step: float = 1 / 16,
  max_sparsity: float = 0.875,
) -> np.ndarray:
  """Per-unit capacities `[L, 2]` whose mean sparsity is `sparsity`.

  Models a unit's loss increase at sparsity s as damage (s / level)^2 (convex:
  the router gives up its cheapest tokens first) and adds sparsity `step` at a
  time where the marginal increase is smallest; no unit goes past
  `max_sparsity`. The last increment is partial, so the mean is exact.
  """
  d = np.maximum(np.asarray(damage, np.float64), 0.0)
  d = np.maximum(d, 1e-3 * max(d.max(), 1e-9))  # noise-level damage: cheap, not free
  return _greedy_table(
    lambda s: d * (s / level) ** 2, np.ones_like(d), sparsity, step, max_sparsity
  )
