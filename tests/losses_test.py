"""The forecaster stage's SmoothL1 against a hand-written numpy loop."""

from __future__ import annotations

import numpy as np

from ir_jax.train.steps import smooth_l1


def test_smooth_l1_matches_numpy_loop():
  rng = np.random.default_rng(0)
  pred = rng.normal(scale=2.0, size=(2, 5, 3)).astype(np.float32)
  target = rng.normal(scale=2.0, size=(2, 5, 3)).astype(np.float32)
  valid = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.float32)
  total, count = 0.0, 0
  for b in range(2):
    for t in range(5):
      if not valid[b, t]:
        continue
      per = []
      for f in range(3):
        d = abs(float(pred[b, t, f]) - float(target[b, t, f]))
        per.append(0.5 * d * d if d < 1.0 else d - 0.5)  # beta 1
      total += sum(per) / 3
      count += 1
  got = float(smooth_l1(pred, target, valid))
  np.testing.assert_allclose(got, total / count, rtol=1e-6)
  assert abs(pred - target).max() > 1.0 and abs(pred - target).min() < 1.0  # both branches
