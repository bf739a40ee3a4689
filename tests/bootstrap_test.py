"""The paired document bootstrap of perplexity ratios (ir_jax.eval.bootstrap)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ir_jax.eval.bootstrap import ratio_interval


def test_point_estimate_by_hand():
  # a: 6 nats over 4 tokens, b: 2 nats: exp((6 - 2) / 4) = e.
  ratio, lo, hi = ratio_interval([2.0, 4.0], [1.0, 1.0], [2, 2])
  assert ratio == pytest.approx(math.e)
  assert lo <= ratio <= hi


def test_equal_per_token_gap_gives_no_width():
  n = np.array([10.0, 300.0, 45.0, 7.0])
  b = np.array([30.0, 800.0, 99.0, 20.0])
  ratio, lo, hi = ratio_interval(b + 0.2 * n, b, n)
  assert ratio == pytest.approx(math.exp(0.2)) and lo == pytest.approx(hi)


def test_interval_equals_a_plain_loop():
  rng = np.random.default_rng(5)
  n = rng.integers(20, 2000, 12).astype(float)
  b = n * rng.uniform(3, 4, 12)
  a = b + n * rng.normal(0.2, 0.3, 12)
  ratio, lo, hi = ratio_interval(a, b, n, draws=500, seed=3)
  draw = np.random.default_rng(3).integers(0, 12, size=(500, 12))
  vals = []
  for row in draw:
    sa = sum(a[i] for i in row)
    sb = sum(b[i] for i in row)
    sn = sum(n[i] for i in row)
    vals.append(math.exp((sa - sb) / sn))
  vals.sort()
  want_lo, want_hi = np.quantile(vals, [0.025, 0.975])
  assert (lo, hi) == pytest.approx((want_lo, want_hi), rel=1e-12)
  # A few long documents dominate: the interval is wide, not token-counting narrow.
  assert hi / lo > 1.05


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match="one shape"):
    ratio_interval([1.0], [1.0, 2.0], [1, 1])


def test_document_tally_follows_documents_across_rows():
  from ir_jax.eval.bootstrap import DocumentTally

  # Row 0: doc A (3 tokens), doc B cut at the row end; row 1: B's rest, then padding;
  # row 2 (after padding): doc C, doc D cut; row 3: D's rest fills the row exactly.
  seg = np.array([[1, 1, 1, 2, 2], [1, 1, 0, 0, 0], [1, 1, 2, 2, 2], [1, 1, 1, 1, 1]])
  nll = np.arange(20, dtype=float).reshape(4, 5)
  mask = (seg > 0).astype(float)
  tally = DocumentTally()
  tally.add(nll[:2], mask[:2], seg[:2])  # two calls: the state carries across batches
  tally.add(nll[2:], mask[2:], seg[2:])
  assert tally.tokens == [3, 4, 2, 8]
  assert tally.nll == [0 + 1 + 2, 3 + 4 + 5 + 6, 10 + 11, 12 + 13 + 14 + 15 + 16 + 17 + 18 + 19]
