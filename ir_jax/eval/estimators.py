"""Likelihood-ratio estimates of quality on another data mix from one evaluation pass.

Documents x_1..x_n are drawn from a calibration (nominal) distribution q; we
want E_p[f] under a target p. With weights w_i = p(x_i) / q(x_i):

  lr               mean(w f)                      unbiased; heavy-tailed when w is
  self_normalized  sum(w f) / sum(w)              ratio form; needs w only up to scale
  truncated        mean(min(w, tau_n) f)          biased, exponentially concentrated
  psis             sum(v f) / sum(v)              v: Pareto-smoothed w (arviz-stats)

Every estimate carries a standard error, the Kish effective sample size of the
weights it used and the fraction of weights it changed (truncated or smoothed).
Samples lie on the last axis; leading axes are independent problems (many
replications, or one row per sparsity level), so all of it is vectorized numpy.

`domain_weights` turns per-document domain labels and a target mix into
w_i = p_target(domain_i) / p_calib(domain_i) with p_calib the empirical domain
frequency; `mix_perplexity` estimates the target-mix perplexity from per-document
loss sums and token counts. See docs/estimators.md for the formulas.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import zlib
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from ir_jax.base_error import IrJaxError

METHODS = ("lr", "self_normalized", "truncated", "psis")
TAU_RULES = ("ionides", "power")
# Target weights within this relative distance of 1 are set to exactly 1, so that a
# target mix equal to the empirical calibration mix reproduces the measured value.
_UNIT_WEIGHT_RTOL = 1e-12
_PSIS_MIN_SAMPLES = 25  # PSIS fits a Pareto tail to >= 5 draws (n / 5 below 225 draws)


class EstimatorError(IrJaxError, ValueError):
  """Weights, values or mixes that no estimate can be computed from."""


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


@dataclasses.dataclass(frozen=True, eq=False)
class MixPerplexity:
  """Estimated perplexity on a target data mix from calibration-mix records.

  perplexity:     exp(loss); perplexity_se = perplexity * loss_se (delta method).
  loss:           estimated per-token loss on the target mix (nats).
  loss_se:        delta-method standard error of `loss` (see `ratio_estimate`).
  measured:       the calibration-mix perplexity, exp(sum loss / sum tokens).
  weights:        w_i = p_target(domain_i) / p_calib(domain_i), one per record.
  ess, truncated_frac, method, n, tau, pareto_k: as in `Estimate`.
  """

  perplexity: Any
  perplexity_se: Any
  loss: Any
  loss_se: Any
  measured: Any
  weights: np.ndarray
  ess: Any
  truncated_frac: Any
  method: str
  n: int
  tau: Any = None
  pareto_k: Any = None


# ----------------------------------------------------------------- validation
def _first_bad(mask: np.ndarray) -> str:
  idx = tuple(int(i) for i in np.argwhere(mask)[0])
  return str(idx[0] if len(idx) == 1 else idx)


def _check_weights(w: Any) -> np.ndarray:
  """`w` as float64, or EstimatorError if a weight is NaN, infinite or negative."""
  w = np.asarray(w, dtype=np.float64)
  if w.ndim == 0:
    raise EstimatorError(
      "weights must be an array with one weight per sample (last axis), got a scalar"
    )
  bad = ~np.isfinite(w)
  if bad.any():
    raise EstimatorError(
      f"weights must be finite likelihood ratios p_target/p_calib >= 0, got {int(bad.sum())} "
      f"NaN/inf (first at index {_first_bad(bad)}); a ratio is infinite where the "
      "calibration data cannot produce what the target needs: fix or drop those samples"
    )
  neg = w < 0
  if neg.any():
    raise EstimatorError(
      f"weights must be likelihood ratios >= 0, got {int(neg.sum())} negative (first at "
      f"index {_first_bad(neg)}, value {w[neg].min():g}); pass p_target/p_calib, not a "
      "difference or a log ratio"
    )
  return w


def _check_values(f: Any, name: str = "values") -> np.ndarray:
  f = np.asarray(f, dtype=np.float64)
  bad = ~np.isfinite(f)
  if bad.any():
    raise EstimatorError(
      f"{name} must be finite, got {int(bad.sum())} NaN/inf (first at index "
      f"{_first_bad(bad)}); a NaN loss is usually a failed evaluation: re-run or drop it"
    )
  return f


def _broadcast(*arrays: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
  try:
    out = np.broadcast_arrays(*arrays)
  except ValueError:
    shapes = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays))
    raise EstimatorError(
      f"shapes do not broadcast: {shapes}; samples must lie on the last axis of every array"
    ) from None
  return [np.ascontiguousarray(a) for a in out]


def _check_positive_mass(w: np.ndarray) -> None:
  if w.shape[-1] < 2:
    raise EstimatorError(
      f"need at least 2 samples on the last axis for an estimate and its "
      f"standard error, got weights of shape {w.shape}"
    )
  zero = w.sum(-1) <= 0
  if zero.any():
    where = f" (row {_first_bad(zero)})" if w.ndim > 1 else ""
    raise EstimatorError(
      f"all weights are zero{where} (effective sample size 0): no calibration sample has "
      "positive probability under the target, so the data says nothing about it; evaluate "
      "on data that covers the target or check how the weights were computed"
    )


def _scalar(x: np.ndarray) -> Any:
  x = np.asarray(x)
  return x.item() if x.ndim == 0 else x


def _kish_ess(v: np.ndarray) -> np.ndarray:
  return v.sum(-1) ** 2 / (v * v).sum(-1)


# ----------------------------------------------------------------- truncation
def truncation_level(w: Any, rule: str = "ionides", *, c: float = 1.0, beta: float = 0.5) -> Any:
  """tau_n for truncated IS, per leading index: "ionides" sqrt(n) * mean(w), or
  "power" c * n**beta * mean(w) (beta = 0.5, c = 1 is Ionides' choice)."""
  w = _check_weights(w)
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
  return _scalar(c * n**beta * w.mean(-1))


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


def _used_weights(
  w: np.ndarray, method: str, tau: float | str, c: float, beta: float, r_eff: float
) -> tuple[np.ndarray, np.ndarray, Any, Any]:
  """Weights a method applies, the changed fraction, tau and k-hat."""
  if method in ("lr", "self_normalized"):
    return w, np.zeros(w.shape[:-1]), None, None
  if method == "truncated":
    t = _tau(w, tau, c, beta)
    return np.minimum(w, t[..., None]), (w > t[..., None]).mean(-1), _scalar(t), None
  if method == "psis":
    v, khat = _psis(w, r_eff)
    body = np.isclose(v, w, rtol=1e-9, atol=0)
    return v, (~body).mean(-1), None, _scalar(khat)
  raise EstimatorError(f"method must be one of {METHODS}, got {method!r}")


# ----------------------------------------------------------------- estimators
def _mean_estimate(
  f: Any, w: Any, method: str, tau: float | str = "ionides", c: float = 1.0, beta: float = 0.5
) -> Estimate:
  w = _check_weights(w)
  _check_positive_mass(w)
  v, frac, t, _ = _used_weights(w, method, tau, c, beta, 1.0)
  ess = _kish_ess(v)
  f, v = _broadcast(_check_values(f), v, names=("values", "weights"))
  n = w.shape[-1]
  vf = v * f
  return Estimate(
    value=_scalar(vf.mean(-1)),
    se=_scalar(vf.std(-1, ddof=1) / math.sqrt(n)),
    ess=_scalar(ess),
    truncated_frac=_scalar(frac),
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
  w = _check_weights(w)
  _check_positive_mass(w)
  v, frac, t, khat = _used_weights(w, method, tau, c, beta, r_eff)
  ess = _kish_ess(v)
  num, den, v = _broadcast(
    _check_values(num, "numerator"),
    _check_values(den, "denominator"),
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
    value=_scalar(r),
    se=_scalar(se),
    ess=_scalar(ess),
    truncated_frac=_scalar(frac),
    method=method,
    n=n,
    tau=t,
    pareto_k=khat,
  )


def self_normalized_estimate(f: Any, w: Any) -> Estimate:
  """Self-normalized IS: sum(w f) / sum(w); delta-method se (`ratio_estimate` with den 1)."""
  f = _check_values(f)
  return ratio_estimate(f, np.ones_like(f), w, "self_normalized")


def psis_estimate(f: Any, w: Any, *, r_eff: float = 1.0) -> Estimate:
  """Pareto-smoothed IS (arviz-stats `psislw`), self-normalized: sum(v f) / sum(v) with the
  largest weights replaced by quantiles of a fitted generalized Pareto; delta-method se."""
  f = _check_values(f)
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


# ----------------------------------------------------------------- data mixes
def empirical_mix(domains: Sequence[Hashable]) -> dict[Hashable, float]:
  """Domain -> fraction of records with that label (the calibration mix as sampled)."""
  counts = collections.Counter(_labels(domains))
  n = sum(counts.values())
  return {d: k / n for d, k in counts.items()}


def _labels(domains: Sequence[Hashable]) -> list[Hashable]:
  if isinstance(domains, (str, bytes)) or np.ndim(domains) != 1 or len(domains) == 0:
    raise EstimatorError(
      f"domains must be a non-empty 1-D sequence with one label per record, got {domains!r:.80}"
    )
  return list(domains)


def _check_mix(mix: Mapping[Hashable, float], name: str) -> dict[Hashable, float]:
  if not isinstance(mix, Mapping) or not mix:
    raise EstimatorError(f"{name} must be a non-empty mapping domain -> weight, got {mix!r:.80}")
  for d, p in mix.items():
    if not (
      isinstance(p, (int, float, np.floating, np.integer))
      and not isinstance(p, bool)
      and math.isfinite(p)
      and p >= 0
    ):
      raise EstimatorError(f"{name}[{d!r}] must be a finite weight >= 0, got {p!r}")
  total = float(sum(mix.values()))
  if total <= 0:
    raise EstimatorError(f"{name} weights sum to 0; give at least one domain a positive weight")
  return {d: float(p) / total for d, p in mix.items()}


def domain_weights(
  domains: Sequence[Hashable],
  target_mix: Mapping[Hashable, float],
  calib_mix: Mapping[Hashable, float] | None = None,
) -> np.ndarray:
  """w_i = p_target(domain_i) / p_calib(domain_i), one per record.

  p_calib is the empirical domain frequency of the records; `target_mix` weights are
  normalised to sum to 1 (domains it leaves out get weight 0). `calib_mix`, when given,
  is the mix the records were meant to come from and is only checked against them: every
  record's domain must have a positive weight in it. A target mix equal to the empirical
  mix (up to float rounding) gives weights exactly 1.
  """
  labels = _labels(domains)
  target = _check_mix(target_mix, "target_mix")
  p_calib = empirical_mix(labels)
  if calib_mix is not None:
    declared = _check_mix(calib_mix, "calib_mix")
    stray = sorted((str(d) for d in p_calib if declared.get(d, 0.0) <= 0))
    if stray:
      raise EstimatorError(
        f"records have domains {stray} that calib_mix gives no weight; the "
        "records do not come from this calibration mix: check both"
      )
  missing = sorted(str(d) for d, p in target.items() if p > 0 and d not in p_calib)
  if missing:
    raise EstimatorError(
      f"target_mix gives weight to domains {missing} that have no calibration records, so "
      "p_target/p_calib is undefined there; evaluate some documents of those domains or "
      "drop them from the target mix"
    )
  ratio = {d: target.get(d, 0.0) / p for d, p in p_calib.items()}
  if all(abs(r - 1.0) <= _UNIT_WEIGHT_RTOL for r in ratio.values()):
    ratio = dict.fromkeys(ratio, 1.0)
  return np.array([ratio[d] for d in labels], np.float64)


def mix_perplexity(
  domains: Sequence[Hashable],
  loss_sums: Any,
  token_counts: Any,
  target_mix: Mapping[Hashable, float],
  calib_mix: Mapping[Hashable, float] | None = None,
  *,
  method: str = "truncated",
  tau: float | str = "ionides",
  c: float = 1.0,
  beta: float = 0.5,
  r_eff: float = 1.0,
) -> MixPerplexity:
  """Target-mix perplexity from per-document calibration records.

  domains [n]; loss_sums [..., n] summed token NLL per document (nats; leading axes,
  e.g. one row per sparsity level, give one estimate each); token_counts [n] or
  [..., n]. The per-token loss is the ratio sum(v loss_sums) / sum(v token_counts)
  (`ratio_estimate`, same weights in numerator and denominator), its se by the delta
  method; perplexity = exp(loss) and perplexity_se = perplexity * loss_se.
  """
  w = domain_weights(domains, target_mix, calib_mix)
  loss_sums = _check_values(loss_sums, "loss_sums")
  token_counts = _check_values(token_counts, "token_counts")
  if (token_counts < 0).any():
    raise EstimatorError(
      f"token_counts must be >= 0 (tokens scored per document), got {token_counts.min():g}"
    )
  if loss_sums.shape[-1:] != w.shape or token_counts.shape[-1:] != w.shape:
    raise EstimatorError(
      f"loss_sums {loss_sums.shape} and token_counts {token_counts.shape} "
      f"must have one entry per record on the last axis ({w.shape[0]} "
      "records)"
    )
  est = ratio_estimate(loss_sums, token_counts, w, method, tau=tau, c=c, beta=beta, r_eff=r_eff)
  loss_b, tok_b = np.broadcast_arrays(loss_sums, token_counts)
  measured = np.exp(loss_b.sum(-1) / tok_b.sum(-1))
  ppl = np.exp(est.value)
  return MixPerplexity(
    perplexity=_scalar(ppl),
    perplexity_se=_scalar(ppl * est.se),
    loss=est.value,
    loss_se=est.se,
    measured=_scalar(measured),
    weights=w,
    ess=est.ess,
    truncated_frac=est.truncated_frac,
    method=method,
    n=est.n,
    tau=est.tau,
    pareto_k=est.pareto_k,
  )


# ----------------------------------------------------------------- density ratios from text
_WORD = re.compile(r"\w+|[^\w\s]")


def text_features(texts: Sequence[str], dim: int = 4096, ngrams: Sequence[int] = (1, 2)) -> Any:
  """Hashed word n-gram features [n, dim]: lower-cased words and punctuation marks, their
  n-grams hashed (crc32, a signed bucket each) into `dim` columns, log(1 + |count|) with the
  sign kept, each row scaled to unit length. Deterministic across runs and machines."""
  if isinstance(texts, (str, bytes)) or len(texts) == 0:
    raise EstimatorError(f"texts must be a non-empty sequence of strings, got {texts!r:.60}")
  if not (isinstance(dim, int) and dim >= 2):
    raise EstimatorError(f"dim must be an integer >= 2, got {dim!r}")
  x = np.zeros((len(texts), dim), np.float64)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise EstimatorError(f"texts[{i}] must be a string, got {type(text).__name__}")
    words = _WORD.findall(text.lower())
    for n in ngrams:
      for j in range(len(words) - n + 1):
        h = zlib.crc32(" ".join(words[j : j + n]).encode("utf-8"))
        x[i, h % dim] += 1.0 if (h >> 31) & 1 else -1.0
  x = np.sign(x) * np.log1p(np.abs(x))
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class DensityRatio:
  """Cross-fitted classifier estimate of w(x) = p_target(x) / p_calib(x).

  weights:       w at each calibration document (out of fold: no document's own label
                 entered the model that weighs it); E_calib[w] = 1 up to estimation noise.
  target_weights: w at each target document (out of fold too); large where the calibration
                 set covers the target well, small where it barely does.
  penalty:       the L2 penalty chosen by out-of-fold log loss.
  calibration:   (a, b): log w = a * logit + b, fitted on the out-of-fold logits (Platt).
  auc:           out-of-fold AUC of telling target from calibration (0.5: no shift).
  folds:         the number of cross-fitting folds.
  """

  weights: np.ndarray
  target_weights: np.ndarray
  penalty: float
  calibration: tuple[float, float]
  auc: float
  folds: int


_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)
_LOGW_CLIP = 30.0  # |log w| beyond e^30 is a degenerate fit, not a ratio


def _softplus(z: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, z)


def _fit_logistic(x: np.ndarray, y: np.ndarray, sw: np.ndarray, lam: float) -> np.ndarray:
  """Weighted L2-penalised logistic regression (intercept last, not penalised) by damped
  Newton steps (the objective is strictly convex; d is at most the number of rows here)."""
  x1 = np.concatenate([x, np.ones((len(x), 1))], 1)
  d = x1.shape[1]
  pen = np.full(d, lam)
  pen[-1] = 0.0
  s = 2.0 * y - 1.0

  def objective(theta: np.ndarray) -> float:
    return float(sw @ _softplus(-s * (x1 @ theta))) + 0.5 * float(pen @ theta**2)

  theta = np.zeros(d)
  obj = objective(theta)
  for _ in range(100):
    p = 1.0 / (1.0 + np.exp(-np.clip(x1 @ theta, -700, 700)))
    grad = x1.T @ (sw * (p - y)) + pen * theta
    hess = (x1.T * (sw * p * (1 - p))) @ x1 + np.diag(pen) + 1e-12 * np.eye(d)
    step = np.linalg.solve(hess, grad)
    t = 1.0
    while t > 1e-8:
      new = objective(theta - t * step)
      if new <= obj + 1e-4 * t * float(grad @ -step):
        break
      t /= 2
    theta, done = theta - t * step, obj - new < 1e-12 * max(1.0, abs(obj))
    obj = new
    if done:
      break
  return theta


def _balanced(y: np.ndarray) -> np.ndarray:
  """Sample weights giving each class half the total (so odds = density ratio)."""
  n1 = y.sum()
  return np.where(y == 1, 0.5 / n1, 0.5 / (len(y) - n1))


def _auc(z: np.ndarray, y: np.ndarray) -> float:
  from scipy.stats import rankdata

  r = rankdata(z)
  n1 = int(y.sum())
  n0 = len(y) - n1
  return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def classifier_weights(
  calib_features: Any,
  target_features: Any,
  *,
  folds: int = 5,
  penalties: Sequence[float] = _PENALTIES,
  seed: int = 0,
) -> DensityRatio:
  """w(x) = p_target(x) / p_calib(x) at every calibration document from a probabilistic
  classifier between the two samples.

  An L2-penalised logistic regression on the features, classes weighted equally (so its odds
  are the density ratio), is cross-fitted over `folds` folds: each document is scored by a
  model fitted without its fold (identical rows share a fold). The penalty is the one of
  `penalties` with the smallest out-of-fold log loss, and the out-of-fold logits are then
  calibrated by a two-parameter logistic fit (Platt), log w = a * logit + b with a >= 0: a
  classifier that cannot tell the samples apart gives a = 0 and w = 1 everywhere.
  """
  xa = np.asarray(calib_features, np.float64)
  xb = np.asarray(target_features, np.float64)
  if xa.ndim == 1:
    xa = xa[:, None]
  if xb.ndim == 1:
    xb = xb[:, None]
  if xa.ndim != 2 or xb.ndim != 2 or xa.shape[1] != xb.shape[1]:
    raise EstimatorError(
      f"features must be [n, d] arrays with the same d, got calibration {xa.shape} and "
      f"target {xb.shape}"
    )
  if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
    raise EstimatorError("features must be finite; got NaN or inf")
  k = min(folds, len(xa), len(xb))
  if not (isinstance(folds, int) and folds >= 2) or k < 2:
    raise EstimatorError(
      f"cross-fitting needs folds >= 2 and at least 2 documents on each side, got "
      f"folds={folds!r}, {len(xa)} calibration and {len(xb)} target documents"
    )
  x = np.concatenate([xa, xb])
  y = np.concatenate([np.zeros(len(xa)), np.ones(len(xb))])
  # Folds: stratified by class; identical rows (the same document on both sides) together.
  rng = np.random.default_rng(seed)
  _, group = np.unique(x, axis=0, return_inverse=True)
  group = group.reshape(-1)
  fold = np.empty(len(x), np.int64)
  order = rng.permutation(group.max() + 1)
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  for cls in (0, 1):
    idx = np.flatnonzero(y == cls)
    idx = idx[np.argsort(rank[group[idx]], kind="stable")]
    fold[idx] = np.arange(len(idx)) % k
  for g in np.unique(group):  # a shared row takes the fold of its first occurrence
    members = np.flatnonzero(group == g)
    fold[members] = fold[members[0]]
  if x.shape[1] > x.shape[0]:
    # An L2-penalised fit lies in the span of its rows: rotating onto that span
    # (eigenvectors of the Gram matrix, no labels used) keeps every fit identical and
    # makes it n- instead of d-dimensional.
    evals, evecs = np.linalg.eigh(x @ x.T)
    keep = evals > 1e-10 * evals.max()  # the rest is rounding noise, not a direction
    x = evecs[:, keep] * np.sqrt(evals[keep])
  sw_all = _balanced(y)
  best = None
  for lam in penalties:
    z = np.empty(len(x))
    for j in range(k):
      test = fold == j
      train = ~test
      if y[train].min() == y[train].max():
        raise EstimatorError("a cross-fitting fold left one class empty; use fewer folds")
      theta = _fit_logistic(x[train], y[train], _balanced(y[train]), float(lam))
      z[test] = x[test] @ theta[:-1] + theta[-1]
    loss = float(sw_all @ _softplus(-(2 * y - 1) * z))
    if best is None or loss < best[0] - 1e-12:
      best = (loss, float(lam), z)
  _, lam, z = best
  # Platt calibration of the out-of-fold logits, a >= 0.
  from scipy.optimize import minimize

  s = 2 * y - 1

  def platt(ab: np.ndarray) -> float:
    return float(sw_all @ _softplus(-s * (ab[0] * z + ab[1])))

  if np.ptp(z) < 1e-6:  # no signal (w would vary by < 1e-6): log w = 0 exactly
    z = np.zeros_like(z)
    a, b = 0.0, 0.0
  else:
    res = minimize(platt, np.array([1.0, 0.0]), method="L-BFGS-B", bounds=[(0, None), (None, None)])
    a, b = (float(v) for v in res.x)
  logw = np.clip(a * z + b, -_LOGW_CLIP, _LOGW_CLIP)
  w = np.exp(logw)
  return DensityRatio(
    weights=w[: len(xa)],
    target_weights=w[len(xa) :],
    penalty=lam,
    calibration=(a, b),
    auc=_auc(z, y),
    folds=k,
  )


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
  w = _check_weights(w)
  f = _check_values(loss_sums, "loss_sums")
  tok = _check_values(token_counts, "token_counts")
  if (tok < 0).any():
    raise EstimatorError(f"token_counts must be >= 0, got {tok.min():g}")
  if f.shape[-1:] != w.shape or tok.shape[-1:] != w.shape:
    raise EstimatorError(
      f"loss_sums {f.shape} and token_counts {tok.shape} must have one entry per "
      f"calibration document on the last axis ({w.shape[-1]} weights)"
    )
  est = ratio_estimate(f, tok, w, method, tau=tau, c=c, beta=beta, r_eff=r_eff)
  v, _, _, _ = _used_weights(w, method, tau, c, beta, r_eff)
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
    loss=_scalar(loss),
    loss_se=_scalar(se),
    perplexity=_scalar(np.exp(loss)),
    low=_scalar(np.exp(loss - z * se)),
    high=_scalar(np.exp(loss + z * se)),
    pred_low=_scalar(np.exp(loss - z * se_pred)),
    pred_high=_scalar(np.exp(loss + z * se_pred)),
    ess=est.ess,
    truncated_frac=est.truncated_frac,
    method=method,
    n=est.n,
    tau=est.tau,
    pareto_k=est.pareto_k,
  )
