"""Intervals on perplexity ratios: a paired bootstrap over documents.

Two settings scored on the same documents give per-document NLL sums `a`, `b`
and token counts `n`; their perplexity ratio is exp(sum a / sum n - sum b / sum n).
Documents, not tokens, are resampled (with replacement, the same draw for both
settings): tokens of one document are far from independent, and a held-out set
where a few long documents hold most tokens is exactly where a token-level
interval would flatter.
"""

from __future__ import annotations

import numpy as np

DRAWS = 2000


def ratio_interval(
  nll_a: np.ndarray,
  nll_b: np.ndarray,
  tokens: np.ndarray,
  level: float = 0.95,
  draws: int = DRAWS,
  seed: int = 0,
) -> tuple[float, float, float]:
  """(ratio, low, high): perplexity of `a` over perplexity of `b` on the same documents and
  its percentile bootstrap interval at `level` over `draws` resamples of the documents."""
  a = np.asarray(nll_a, np.float64)
  b = np.asarray(nll_b, np.float64)
  n = np.asarray(tokens, np.float64)
  if not (a.shape == b.shape == n.shape) or a.ndim != 1 or not len(a):
    raise ValueError(
      f"per-document arrays of one shape expected, got {a.shape}, {b.shape}, {n.shape}"
    )
  ratio = float(np.exp((a.sum() - b.sum()) / n.sum()))
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(a), size=(draws, len(a)))
  logs = (a[idx].sum(1) - b[idx].sum(1)) / np.maximum(n[idx].sum(1), 1e-12)
  lo, hi = np.quantile(np.exp(logs), [(1 - level) / 2, (1 + level) / 2])
  return ratio, float(lo), float(hi)
