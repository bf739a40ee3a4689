"""Capacity tables: per unit, a damage curve (by default the relative forecast error its
router leaves behind at each sparsity; or measured loss probes); a greedy allocation then
spreads the target sparsity where damage rises least."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.distributed import host_array
from ir_jax.fit.common import _approximation, _dense_units, _ordinary, _set
from ir_jax.fit.routers import center_routers
from ir_jax.losses import lm_loss
from ir_jax.model import Llama
from ir_jax.progress import counter, doing
from ir_jax.routing import RoutingSpec

Array = jax.Array


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


@nnx.jit(static_argnames=("spec",))
def routed_nll(model: Llama, batch: dict[str, Array], spec: RoutingSpec) -> tuple[Array, Array]:
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
        nll, batch_scores = routed_nll(model, b, _causal_all(greedy))
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
      nll = [float(host_array(routed_nll(model, b, _causal_all(greedy))[0])) for b in batches]
      damage[l, u] = np.mean(nll) - base
      if progress is not None:
        progress(j + 1, shape[0] * shape[1])
  finally:
    thr_var[...] = saved
  return damage, scores


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
