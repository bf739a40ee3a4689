"""Per-document density ratios w(x) = p_target(x) / p_calib(x) without domain labels.

`text_features` hashes a document's word n-grams into a fixed-width vector;
`classifier_weights` fits a cross-fitted, calibrated logistic regression between the
calibration documents and unlabeled target documents and reads its odds as w(x).
See docs/estimators.md for the method.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Sequence

import numpy as np

from ir_jax.eval.estimator_inputs import EstimatorError

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
  for j in range(k):  # with few distinct rows, a fold can take all of one sample (or all)
    train = fold != j
    if not train.any() or y[train].min() == y[train].max():
      raise EstimatorError(
        f"cross-fitting needs documents of both samples outside every fold, but fold {j} "
        f"leaves {'none' if not train.any() else 'only one sample'} to fit on: the "
        f"{len(xa)} calibration and {len(xb)} target documents have {int(group.max()) + 1} "
        "distinct feature row(s), and identical rows share a fold; give more distinct "
        f"documents on each side (or fewer folds than {folds})"
      )
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
