"""Capacity tables: per unit, a damage curve (by default the relative forecast error its
router leaves behind at each sparsity; or measured loss probes), which the allocation in
`ir_jax.routing.capacity` turns into a table by spreading the target sparsity where damage
rises least; `set_table` stores it in the model (`CapacityTable.to_array`)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.distributed import host_array
from ir_jax.fit.common import _approximation, _dense_units, _ordinary, _set, pass_context
from ir_jax.fit.routers import center_routers
from ir_jax.losses import lm_loss
from ir_jax.model import Llama
from ir_jax.progress import counter, doing
from ir_jax.routing import RoutingSpec
from ir_jax.routing.capacity import CapacityTable

Array = jax.Array


@nnx.jit(static_argnames=("greedy",), graph_updates=False)
def _error_curves(model: Llama, batch: dict[str, Array], greedy: bool) -> dict[str, Array]:
  def per_unit(routing_layer, unit, n, u, x_res):
    f = _approximation(routing_layer, unit, n, greedy)
    err = jnp.sum(jnp.square((u - f).astype(jnp.float32)), -1)
    scale = jnp.sum(jnp.square(x_res.astype(jnp.float32)), -1)
    return dict(
      score=routing_layer.router(unit)(n).reshape(-1),
      rel_err=(err / jnp.maximum(scale, 1e-30)).reshape(-1),
    )

  return _dense_units(model, batch, per_unit, per_token=True)


def error_curves(
  model: Llama, batches: list[dict[str, Any]], greedy: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """(router scores, relative approximation errors |Unit(n) - LFF(n)|^2 / |x|^2, LFF = 0 when
  `greedy`), `[L, 2, n]` over the n ordinary tokens of `batches` in the dense model. The
  pass is traced as the moments passes are (`fit.common.pass_context`: on the model's
  mesh, its per-token outputs split over the batch axes)."""
  scores, errs = [], []
  bar = counter("  error curves", len(batches), unit="batches")
  for i, b in enumerate(batches):
    b = {k: jnp.asarray(v) for k, v in b.items()}
    with doing("compiling the error-curve pass" if i == 0 else "measuring error curves"):
      with pass_context(model):
        out = _error_curves(model, b, greedy)
      keep = host_array(_ordinary(b)).reshape(-1) > 0  # global rows, as the outputs
      scores.append(host_array(out["score"])[..., keep])
      errs.append(host_array(out["rel_err"])[..., keep])
    bar(i + 1)
  return np.concatenate(scores, -1), np.concatenate(errs, -1)


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
  _set(model.routing.capacity, CapacityTable.from_array(capacities).to_array(len(capacities)))
  center_routers(model, np.asarray(capacities), scores)
