"""Likelihood-ratio estimates of E_target[f] and of a target perplexity, with intervals.

Documents x_1..x_n are drawn from a calibration (nominal) distribution q; we
want E_p[f] under a target p. With weights w_i = p(x_i) / q(x_i):

  lr               mean(w f)                      unbiased; heavy-tailed when w is
  self_normalized  sum(w f) / sum(w)              ratio form; needs w only up to scale
  truncated        mean(min(w, tau_n) f)          biased, exponentially concentrated
  psis             sum(v f) / sum(v)              v: Pareto-smoothed w (arviz-stats)

Every estimate carries a standard error, the Kish effective sample size of the
weights it used and the fraction of weights it changed (truncated or smoothed);
the weights themselves come from `ir_jax.eval.importance_weights`. Samples lie on
the last axis; leading axes are independent problems (many replications, or one
row per sparsity level), so all of it is vectorized numpy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ir_jax.eval.estimator_inputs import (
  EstimatorError,
  as_scalar,
  broadcast,
  check_positive_mass,
  check_values,
  check_weights,
)
from ir_jax.eval.importance_weights import METHODS, kish_ess, used_weights


@dataclasses.dataclass(frozen=True, eq=False)
class Estimate:
  """One estimate (or an array of them, one per leading index).

  value:          the estimate of E_target[f] (or of the ratio, see `ratio_estimate`).
  se:             its standard error (sampling noise only; truncation bias is not in it).
  ess:            Kish effective sample size (sum v)^2 / sum v^2 of the weights v used.
  truncated_frac: fraction of weights changed: min(w, tau) < w, or replaced by PSIS.
  method:         one of METHODS.
  n:              number of samples.
  tau:            the truncation boundary (truncated only, else None).
  pareto_k:       PSIS tail shape k-hat (psis only; > 0.7: unreliable; nan: the largest
                  weights repeat, e.g. per-domain weights, and were left as they are).
  """

  value: Any
  se: Any
  ess: Any
  truncated_frac: Any
  method: str
  n: int
  tau: Any = None
  pareto_k: Any = None


# ----------------------------------------------------------------- estimators
def _mean_estimate(
  f: Any, w: Any, method: str, tau: float | str = "ionides", c: float = 1.0, beta: float = 0.5
) -> Estimate:
  w = check_weights(w)
  check_positive_mass(w)
  v, frac, t, _ = used_weights(w, method, tau, c, beta, 1.0)
  ess = kish_ess(v)
  f, v = broadcast(check_values(f), v, names=("values", "weights"))
  n = w.shape[-1]
  vf = v * f
  return Estimate(
    value=as_scalar(vf.mean(-1)),
    se=as_scalar(vf.std(-1, ddof=1) / math.sqrt(n)),
    ess=as_scalar(ess),
    truncated_frac=as_scalar(frac),
    method=method,
    n=n,
    tau=t,
  )


def lr_estimate(f: Any, w: Any) -> Estimate:
  """Plain importance sampling: mean(w f); se = sd(w f) / sqrt(n)."""
  return _mean_estimate(f, w, "lr")


def truncated_estimate(
  f: Any, w: Any, tau: float | str = "ionides", *, c: float = 1.0, beta: float = 0.5
) -> Estimate:
  """Truncated IS: mean(min(w, tau_n) f); tau a number or a rule (`truncation_level`);
  se = sd(min(w, tau) f) / sqrt(n) (the truncation bias is not in it)."""
  return _mean_estimate(f, w, "truncated", tau, c, beta)


def ratio_estimate(
  num: Any,
  den: Any,
  w: Any,
  method: str = "truncated",
  *,
  tau: float | str = "ionides",
  c: float = 1.0,
  beta: float = 0.5,
  r_eff: float = 1.0,
) -> Estimate:
  """E_target[num] / E_target[den] as sum(v num) / sum(v den), with v the weights of
  `method` (lr and self_normalized coincide here: the scale of v cancels).

  se by the delta method (linearising the ratio R):
    se = sqrt(n / (n - 1) * sum(v^2 (num - R den)^2)) / sum(v den).
  """
  w = check_weights(w)
  check_positive_mass(w)
  v, frac, t, khat = used_weights(w, method, tau, c, beta, r_eff)
  ess = kish_ess(v)
  num, den, v = broadcast(
    check_values(num, "numerator"),
    check_values(den, "denominator"),
    v,
    names=("numerator", "denominator", "weights"),
  )
  n = w.shape[-1]
  total = (v * den).sum(-1)
  if (total <= 0).any():
    raise EstimatorError(
      "the weighted denominator sum(w * den) is not positive (e.g. no "
      "tokens in the documents the target weights); the ratio is undefined"
    )
  r = (v * num).sum(-1) / total
  resid = v * (num - r[..., None] * den)
  se = np.sqrt(n / (n - 1) * (resid * resid).sum(-1)) / np.abs(total)
  return Estimate(
    value=as_scalar(r),
    se=as_scalar(se),
    ess=as_scalar(ess),
    truncated_frac=as_scalar(frac),
    method=method,
    n=n,
    tau=t,
    pareto_k=khat,
  )


def self_normalized_estimate(f: Any, w: Any) -> Estimate:
  """Self-normalized IS: sum(w f) / sum(w); delta-method se (`ratio_estimate` with den 1)."""
  f = check_values(f)
  return ratio_estimate(f, np.ones_like(f), w, "self_normalized")


def psis_estimate(f: Any, w: Any, *, r_eff: float = 1.0) -> Estimate:
  """Pareto-smoothed IS (arviz-stats `psislw`), self-normalized: sum(v f) / sum(v) with the
  largest weights replaced by quantiles of a fitted generalized Pareto; delta-method se."""
  f = check_values(f)
  return ratio_estimate(f, np.ones_like(f), w, "psis", r_eff=r_eff)


def estimate(f: Any, w: Any, method: str = "truncated", **kwargs: Any) -> Estimate:
  """Dispatches to the estimator `method` (one of METHODS) with its keyword arguments."""
  fns = {
    "lr": lr_estimate,
    "self_normalized": self_normalized_estimate,
    "truncated": truncated_estimate,
    "psis": psis_estimate,
  }
  if method not in fns:
    raise EstimatorError(f"method must be one of {METHODS}, got {method!r}")
  return fns[method](f, w, **kwargs)


# ----------------------------------------------------------------- target perplexity
@dataclasses.dataclass(frozen=True, eq=False)
class TargetPerplexity:
  """Estimated perplexity on target documents from calibration documents' losses.

  loss, loss_se:    per-token loss (nats) and its delta-method standard error (weights
                    taken as given).
  perplexity:       exp(loss).
  low, high:        the `level` interval of the target population's perplexity,
                    exp(loss -+ z loss_se).
  pred_low, pred_high: the interval for the perplexity measured on the n_target target
                    documents at hand: it adds their own sampling noise to loss_se (equal
                    to low/high without n_target).
  ess, truncated_frac, tau, pareto_k, method, n: as in `Estimate`.
  """

  loss: Any
  loss_se: Any
  perplexity: Any
  low: Any
  high: Any
  pred_low: Any
  pred_high: Any
  ess: Any
  truncated_frac: Any
  method: str
  n: int
  tau: Any = None
  pareto_k: Any = None


def target_perplexity(
  loss_sums: Any,
  token_counts: Any,
  w: Any,
  method: str = "truncated",
  *,
  n_target: int | None = None,
  level: float = 0.95,
  tau: float | str = "ionides",
  c: float = 1.0,
  beta: float = 0.5,
  r_eff: float = 1.0,
) -> TargetPerplexity:
  """Target perplexity exp(E_target[nll] / E_target[tokens]) from calibration documents.

  loss_sums [..., n]: summed token NLL of each calibration document (a leading axis per
  setting); token_counts [n]; w [n]: density ratios p_target / p_calib at those documents
  (e.g. `classifier_weights`). loss = sum(v nll) / sum(v tokens) with the weights v of
  `method` (`ratio_estimate`): w itself for lr and self_normalized (which coincide for a
  ratio), min(w, tau_n) for truncated, Pareto-smoothed w for psis.

  The interval is normal on the loss scale. With `n_target`, the prediction interval also
  covers the target documents' own sampling noise: var_v(nll - loss tokens) / n_target over
  the squared weighted mean token count, so it is the one to hold against a perplexity
  measured on those n_target documents.
  """
  if not (0 < level < 1):
    raise EstimatorError(f"level must lie in (0, 1), got {level!r}")
  if n_target is not None and not (
    isinstance(n_target, (int, np.integer)) and not isinstance(n_target, bool) and n_target >= 1
  ):
    raise EstimatorError(f"n_target must be an integer >= 1, got {n_target!r}")
  w = check_weights(w)
  f = check_values(loss_sums, "loss_sums")
  tok = check_values(token_counts, "token_counts")
  if (tok < 0).any():
    raise EstimatorError(f"token_counts must be >= 0, got {tok.min():g}")
  if f.shape[-1:] != w.shape or tok.shape[-1:] != w.shape:
    raise EstimatorError(
      f"loss_sums {f.shape} and token_counts {tok.shape} must have one entry per "
      f"calibration document on the last axis ({w.shape[-1]} weights)"
    )
  est = ratio_estimate(f, tok, w, method, tau=tau, c=c, beta=beta, r_eff=r_eff)
  v, _, _, _ = used_weights(w, method, tau, c, beta, r_eff)
  f_b, tok_b, v_b = np.broadcast_arrays(f, tok, v)
  loss = np.asarray(est.value)
  se = np.asarray(est.se)
  if n_target is None:
    se_pred = se
  else:
    resid = f_b - loss[..., None] * tok_b
    var_r = (v_b * resid**2).sum(-1) / v_b.sum(-1)
    tok_mean = (v_b * tok_b).sum(-1) / v_b.sum(-1)
    se_pred = np.sqrt(se**2 + var_r / n_target / tok_mean**2)
  from scipy.stats import norm

  z = float(norm.ppf(0.5 + level / 2))
  return TargetPerplexity(
    loss=as_scalar(loss),
    loss_se=as_scalar(se),
    perplexity=as_scalar(np.exp(loss)),
    low=as_scalar(np.exp(loss - z * se)),
    high=as_scalar(np.exp(loss + z * se)),
    pred_low=as_scalar(np.exp(loss - z * se_pred)),
    pred_high=as_scalar(np.exp(loss + z * se_pred)),
    ess=est.ess,
    truncated_frac=est.truncated_frac,
    method=method,
    n=est.n,
    tau=est.tau,
    pareto_k=est.pareto_k,
  )
