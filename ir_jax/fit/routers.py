"""Router warm starts: per unit, a ridge regression of log forecast error on the unit input
(the oracle's choice made learnable), scaled so Gumbel gates are sensible, then centred on
the unit's capacity."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.distributed import host_array
from ir_jax.fit.common import (
  _LOG_EPS,
  OFFSET,
  SCORE_SCALE,
  _accumulate,
  _approximation,
  _centered,
  _dense_units,
  _ordinary,
  _set,
)
from ir_jax.forecast import UNITS
from ir_jax.model import Llama
from ir_jax.progress import counter

Array = jax.Array


@nnx.jit(static_argnames=("greedy",), graph_updates=False)
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


def router_moments(model, batches, progress=None, greedy: bool = False) -> dict[str, np.ndarray]:
  """Per-unit moments of (unit input, log approximation error), plus summed squared error
  and squared output over ordinary tokens (for explained variance), `[L, 2, ...]`. The
  approximation is the forecast, or zero when `greedy` (then the target is log |Unit(n)|^2)."""
  fn = lambda m, b: _router_moments(m, b, greedy)
  return _accumulate(fn, model, batches, progress)


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
