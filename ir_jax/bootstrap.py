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


class DocumentTally:
  """Per-document NLL sums and token counts from packed rows seen in stream order.

  Packing concatenates documents and cuts them at row ends (ir_jax.data.packing),
  so a row whose predecessor ends in a real token (no padding) starts with the rest
  of that predecessor's last document; every other segment starts a new document.
  (A document that ends exactly at a row end is merged with the next one: a coarser
  cluster, which only widens the interval.)
  """

  def __init__(self) -> None:
    self.nll: list[float] = []
    self.tokens: list[float] = []
    self._open = False  # the last row's last segment may continue

  def add(self, nll_BxT: np.ndarray, loss_mask_BxT: np.ndarray, segment_ids_BxT: np.ndarray):
    nll = np.asarray(nll_BxT, np.float64)
    mask = np.asarray(loss_mask_BxT, np.float64)
    seg = np.asarray(segment_ids_BxT)
    for row in range(seg.shape[0]):
      prev = None
      for t in range(seg.shape[1]):
        s = int(seg[row, t])
        if s <= 0:
          prev = None
          continue
        if s != prev:
          if not (prev is None and t == 0 and self._open and self.nll):
            self.nll.append(0.0)
            self.tokens.append(0.0)
          prev = s
        self.nll[-1] += float(nll[row, t] * mask[row, t])
        self.tokens[-1] += float(mask[row, t])
      self._open = bool(seg[row, -1] > 0)
