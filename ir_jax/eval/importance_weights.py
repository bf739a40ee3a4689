"""The weights each estimator applies to w = p_target / p_calib, and their diagnostics.

  lr, self_normalized   w as given
  truncated             min(w, tau_n), tau_n from a rule (`truncation_level`) or a number
  psis                  w with its largest values Pareto-smoothed (arviz-stats `psislw`)

`used_weights` returns those weights with the share of weights changed, tau_n and the
Pareto tail shape k-hat; `kish_ess` is the effective sample size of any of them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ir_jax.eval.estimator_inputs import EstimatorError, as_scalar, check_weights

METHODS = ("lr", "self_normalized", "truncated", "psis")
TAU_RULES = ("ionides", "power")
_PSIS_MIN_SAMPLES = 25  # PSIS fits a Pareto tail to >= 5 draws (n / 5 below 225 draws)


def kish_ess(v: np.ndarray) -> np.ndarray:
  """Kish effective sample size (sum v)^2 / sum v^2 over the last axis."""
  return v.sum(-1) ** 2 / (v * v).sum(-1)


# ----------------------------------------------------------------- truncation
def truncation_level(w: Any, rule: str = "ionides", *, c: float = 1.0, beta: float = 0.5) -> Any:
  """tau_n for truncated IS, per leading index: "ionides" sqrt(n) * mean(w), or
  "power" c * n**beta * mean(w) (beta = 0.5, c = 1 is Ionides' choice)."""
  w = check_weights(w)
  n = w.shape[-1]
  if rule == "ionides":
    c, beta = 1.0, 0.5
  elif rule == "power":
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
      raise EstimatorError(f"truncation constant c must be a finite number > 0, got {c!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
      raise EstimatorError(f"truncation exponent beta must be a finite number >= 0, got {beta!r}")
  else:
    raise EstimatorError(
      f"truncation rule must be one of {TAU_RULES} or a number > 0, got {rule!r}"
    )
  return as_scalar(c * n**beta * w.mean(-1))


def _tau(w: np.ndarray, tau: float | str, c: float, beta: float) -> np.ndarray:
  if isinstance(tau, str):
    return np.asarray(truncation_level(w, tau, c=c, beta=beta), np.float64)
  if not (
    isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0
  ):
    raise EstimatorError(f"tau must be a finite number > 0 or one of {TAU_RULES}, got {tau!r}")
  return np.full(w.shape[:-1], float(tau))


# ----------------------------------------------------------------- PSIS
def _psis_row(w: np.ndarray, r_eff: float, array_stats: Any) -> tuple[np.ndarray, float]:
  """Pareto-smoothed weights of one row (same scale as `w` on the body) and k-hat."""
  pos = w > 0
  m = int(pos.sum())
  if m < _PSIS_MIN_SAMPLES:
    raise EstimatorError(
      f"psis needs at least {_PSIS_MIN_SAMPLES} positive weights to fit a "
      f"Pareto tail, got {m}; use method='truncated'"
    )
  lr = np.log(w[pos])
  tail = int(math.floor(3 * math.sqrt(m / r_eff))) if m * r_eff > 225 else m // 5
  top = np.exp(np.sort(lr)[-tail - 1 :] - lr.max())  # the tail and the value below it
  if np.unique(top).size < top.size:
    # Repeated values (per-domain weights): a continuous Pareto tail does not fit; the
    # weights take few values and are bounded, so they are used as they are.
    return w, float("nan")
  # psislw smooths the log ratios -ary (its input is a LOO log-likelihood), so pass -log w.
  # It returns log weights normalised to sum to 1; rescale so the body keeps w's scale.
  lw, khat = array_stats.psislw(-lr, r_eff=r_eff)
  if not np.all(np.isfinite(lw)):
    raise EstimatorError(
      f"psis could not fit a Pareto tail to these weights (k-hat {khat}); "
      "use method='truncated' or 'self_normalized'"
    )
  v_pos = np.exp(lw - lw[np.argmin(lr)] + lr.min())
  v = np.zeros_like(w)
  v[pos] = v_pos
  return v, float(khat)


def _psis(w: np.ndarray, r_eff: float) -> tuple[np.ndarray, np.ndarray]:
  try:
    from arviz_stats.base import array_stats  # lazy: optional dependency
  except ImportError as e:
    raise ImportError(
      "method='psis' needs the optional package arviz-stats "
      "(pip install arviz-stats); the other methods work without it"
    ) from e
  if not (isinstance(r_eff, (int, float)) and math.isfinite(r_eff) and r_eff > 0):
    raise EstimatorError(
      f"r_eff must be a finite number > 0 (1 for independent samples), got {r_eff!r}"
    )
  flat = w.reshape(-1, w.shape[-1])
  rows = [_psis_row(row, r_eff, array_stats) for row in flat]
  v = np.stack([r[0] for r in rows]).reshape(w.shape)
  khat = np.array([r[1] for r in rows]).reshape(w.shape[:-1])
  return v, khat


def used_weights(
  w: np.ndarray, method: str, tau: float | str, c: float, beta: float, r_eff: float
) -> tuple[np.ndarray, np.ndarray, Any, Any]:
  """Weights a method applies, the changed fraction, tau and k-hat."""
  if method in ("lr", "self_normalized"):
    return w, np.zeros(w.shape[:-1]), None, None
  if method == "truncated":
    t = _tau(w, tau, c, beta)
    return np.minimum(w, t[..., None]), (w > t[..., None]).mean(-1), as_scalar(t), None
  if method == "psis":
    v, khat = _psis(w, r_eff)
    body = np.isclose(v, w, rtol=1e-9, atol=0)
    return v, (~body).mean(-1), None, as_scalar(khat)
  raise EstimatorError(f"method must be one of {METHODS}, got {method!r}")
