"""EstimatorError and the input checks every likelihood-ratio estimator shares.

The bottom floor of the estimators (`ir_jax.eval.estimators` lists them all): weights,
values and shapes are checked here, once, with messages that say what to fix.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ir_jax.base_error import IrJaxError


class EstimatorError(IrJaxError, ValueError):
  """Weights, values or mixes that no estimate can be computed from."""


def _first_bad(mask: np.ndarray) -> str:
  idx = tuple(int(i) for i in np.argwhere(mask)[0])
  return str(idx[0] if len(idx) == 1 else idx)


def check_weights(w: Any) -> np.ndarray:
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


def check_values(f: Any, name: str = "values") -> np.ndarray:
  """`f` as float64, or EstimatorError naming `name` if a value is NaN or infinite."""
  f = np.asarray(f, dtype=np.float64)
  bad = ~np.isfinite(f)
  if bad.any():
    raise EstimatorError(
      f"{name} must be finite, got {int(bad.sum())} NaN/inf (first at index "
      f"{_first_bad(bad)}); a NaN loss is usually a failed evaluation: re-run or drop it"
    )
  return f


def broadcast(*arrays: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
  """The arrays broadcast against each other (contiguous), or EstimatorError with shapes."""
  try:
    out = np.broadcast_arrays(*arrays)
  except ValueError:
    shapes = ", ".join(f"{n} {a.shape}" for n, a in zip(names, arrays))
    raise EstimatorError(
      f"shapes do not broadcast: {shapes}; samples must lie on the last axis of every array"
    ) from None
  return [np.ascontiguousarray(a) for a in out]


def check_positive_mass(w: np.ndarray) -> None:
  """EstimatorError unless every row has >= 2 samples and a positive weight sum."""
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


def as_scalar(x: np.ndarray) -> Any:
  """A 0-d result as a Python number; arrays (one entry per leading index) as they are."""
  x = np.asarray(x)
  return x.item() if x.ndim == 0 else x
