"""Forecaster fits: per unit, a reduced-rank ridge regression of the unit's output on its
normed input, from the moments sum(x), sum(y), X^T X, X^T Y over ordinary tokens (segment
starts excluded: they always execute, and their massive activations would dominate any
squared error). The linear map is written into the LFF exactly (a large offset puts SiLU
in its linear range)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ir_jax.fit.common import OFFSET, _accumulate, _centered, _dense_units, _ordinary, _set, _stack
from ir_jax.forecast import UNITS
from ir_jax.model import Llama
from ir_jax.progress import counter, doing

Array = jax.Array


@nnx.jit(static_argnames=("outlier",), graph_updates=False)
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


@nnx.jit(graph_updates=False)
def _forecast_error(model: Llama, batch: dict[str, Array]) -> dict[str, Array]:
  w = _ordinary(batch).reshape(-1)

  def per_unit(routing_layer, unit, n, u, x_res):
    f = routing_layer.forecaster(unit)(n)
    err = jnp.sum(jnp.square((u - f).astype(jnp.float32)), -1).reshape(-1)
    tot = jnp.sum(jnp.square(u.astype(jnp.float32)), -1).reshape(-1)
    return dict(err=w @ err, tot=w @ tot)

  return _dense_units(model, batch, per_unit)


def forecaster_moments(
  model, batches, progress=None, outlier: float = float("inf")
) -> dict[str, np.ndarray]:
  """Per-unit moments of (unit input, unit output) over ordinary tokens, `[L, 2, ...]`;
  tokens whose output energy passes `outlier` x the batch mean are left out (`dropped`)."""
  return _accumulate(lambda m, b: _forecaster_moments(m, b, outlier), model, batches, progress)


def forecast_error(model, batches, progress=None) -> dict[str, np.ndarray]:
  """Summed squared forecast error and squared unit output over ordinary tokens `[L, 2]`."""
  return _accumulate(_forecast_error, model, batches, progress)


def explained(m: dict[str, np.ndarray]) -> np.ndarray:
  """1 - sum |f - u|^2 / sum |u|^2 per unit `[L, 2]` from `router_moments` output."""
  return 1.0 - m["err"] / np.maximum(m["tot"], 1e-30)


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
