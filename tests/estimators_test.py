"""Likelihood-ratio estimators: a heavy-tailed shift with a known answer, hand-worked
examples, exactness when nothing shifts, and clear errors on bad input."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from ir_jax.eval import estimators as E

# ------------------------------------------------ heavy-tailed shift, known answer
# Nominal Exp(1), target Exp(LAM): w(x) = LAM * exp((1 - LAM) x) has a Pareto tail with
# index 1 / (1 - LAM) = 5/3, so E[w] = 1 but Var(w) is infinite. f(x) = min(x, 3) / 3 is
# bounded and E_target[f] = E[min(X, 3)] / 3 = (1 - exp(-3 LAM)) / (3 LAM).
LAM = 0.4
TRUTH = (1 - math.exp(-3 * LAM)) / (3 * LAM)
LARGE = 0.25 * TRUTH  # a "large error": off by more than 25 %
REPS = {100: 4000, 1000: 2000, 10_000: 2000}  # replications per sample size


def _shifted(seed: int, n: int, reps: int, block: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """reps x n draws of (f(x), w(x)) with x ~ Exp(1)."""
  x = np.random.default_rng([seed, n, block]).exponential(size=(reps, n))
  return np.minimum(x, 3.0) / 3.0, LAM * np.exp((1 - LAM) * x)


@functools.lru_cache(maxsize=None)
def _errors(seed: int) -> dict[int, dict[str, np.ndarray]]:
  """Absolute errors of plain and truncated (Ionides tau) LR, per n, over replications."""
  out = {}
  for n, reps in REPS.items():
    plain, trunc = [], []
    for block in range(reps // 500):  # blocks keep memory small at n = 10_000
      f, w = _shifted(seed, n, 500, block)
      plain.append(E.lr_estimate(f, w).value)
      trunc.append(E.truncated_estimate(f, w).value)
    out[n] = {
      "lr": np.abs(np.concatenate(plain) - TRUTH),
      "truncated": np.abs(np.concatenate(trunc) - TRUTH),
    }
  return out


def _rmse(err: np.ndarray) -> float:
  return float(np.sqrt(np.mean(err**2)))


# Margins checked on seeds 0-199 of this exact setup: the RMSE ratio truncated / plain was at
# most 0.61, 0.67, 0.66 at n = 100, 1000, 10_000, the large-error ratio at most 0.89, 0.27, 0.06.
@pytest.mark.parametrize("seed", [0, 1])
def test_truncated_beats_plain_on_heavy_tailed_shift(seed):
  for n, err in _errors(seed).items():
    assert _rmse(err["truncated"]) < 0.8 * _rmse(err["lr"]), n
    p_plain, p_trunc = np.mean(err["lr"] > LARGE), np.mean(err["truncated"] > LARGE)
    assert p_trunc < (0.95 if n == 100 else 0.5) * p_plain, (n, p_plain, p_trunc)


# On the same seeds the median error shrank to at most 0.47x per 10x n for both estimators and
# the large-error rate to at most 0.33x; at n = 10_000 the median error stayed below 0.023 and
# the truncated RMSE below 0.03.
@pytest.mark.parametrize("seed", [0, 1])
def test_both_estimators_converge_as_n_grows(seed):
  errs = _errors(seed)
  ns = sorted(errs)
  for name in ("lr", "truncated"):
    for small, big in zip(ns, ns[1:]):
      assert np.median(errs[big][name]) < 0.6 * np.median(errs[small][name]), (name, big)
      assert np.mean(errs[big][name] > LARGE) <= 0.5 * np.mean(errs[small][name] > LARGE)
    assert np.median(errs[ns[-1]][name]) < 0.035, name
  assert _rmse(errs[ns[-1]]["truncated"]) < 0.04


def test_psis_on_heavy_tailed_shift():
  pytest.importorskip("arviz_stats")
  f, w = _shifted(7, 1000, 100)
  ps, plain = E.psis_estimate(f, w), E.lr_estimate(f, w)
  # Seeds 0-59: mean k-hat in [0.55, 0.62], RMSE ratio psis / plain at most 0.48.
  # k-hat estimates the tail shape 1 - LAM = 0.6; a wrong sign convention fits the wrong tail.
  assert abs(np.mean(ps.pareto_k) - (1 - LAM)) < 0.1
  assert _rmse(ps.value - TRUTH) < 0.8 * _rmse(plain.value - TRUTH)
  # Only the fitted tail (3 sqrt(n) = 94 of 1000 draws) is replaced.
  assert np.all((ps.truncated_frac > 0.05) & (ps.truncated_frac <= 94 / 1000))


# ------------------------------------------------ hand-worked 5-sample example
# f = [2, 0, 1, 3, 1], w = [0.5, 1, 1, 0.5, 7] (sum 10, mean 2, sum w^2 = 51.5).
F5 = [2.0, 0.0, 1.0, 3.0, 1.0]
W5 = [0.5, 1.0, 1.0, 0.5, 7.0]


def test_lr_by_hand():
  # w f = [1, 0, 1, 1.5, 7]: mean 2.1; deviations -1.1 -2.1 -1.1 -0.6 4.9, squares sum
  # 31.2, sample variance 7.8, se = sqrt(7.8 / 5); ESS = 10^2 / 51.5.
  e = E.lr_estimate(F5, W5)
  assert e.value == pytest.approx(2.1)
  assert e.se == pytest.approx(math.sqrt(1.56))
  assert e.ess == pytest.approx(100 / 51.5)
  assert (e.truncated_frac, e.n, e.method, e.tau) == (0.0, 5, "lr", None)


def test_self_normalized_by_hand():
  # 10.5 / 10 = 1.05; residuals w (f - 1.05) = .475 -1.05 -.05 .975 -.35, squares sum
  # 2.40375; se = sqrt(5/4 * 2.40375) / 10.
  e = E.self_normalized_estimate(F5, W5)
  assert e.value == pytest.approx(1.05)
  assert e.se == pytest.approx(math.sqrt(1.25 * 2.40375) / 10)
  assert e.ess == pytest.approx(100 / 51.5)


@pytest.mark.parametrize(
  "kw", [dict(tau=3.0), dict(tau="power", c=1.5, beta=0.0), dict(tau="power", c=0.3, beta=1.0)]
)
def test_truncated_by_hand(kw):
  # tau = 3 (= 1.5 * 5^0 * 2 = 0.3 * 5^1 * 2): v = [.5, 1, 1, .5, 3], v f = [1, 0, 1, 1.5, 3]
  # mean 1.3; deviations -.3 -1.3 -.3 .2 1.7, squares sum 4.8, variance 1.2, se sqrt(1.2/5);
  # ESS 6^2 / 11.5; one of five weights truncated.
  e = E.truncated_estimate(F5, W5, **kw)
  assert e.tau == pytest.approx(3.0)
  assert e.value == pytest.approx(1.3)
  assert e.se == pytest.approx(math.sqrt(0.24))
  assert e.ess == pytest.approx(36 / 11.5)
  assert e.truncated_frac == 0.2


def test_truncated_ionides_by_hand():
  # tau = sqrt(5) * 2; only w = 7 exceeds it: mean = (1 + 0 + 1 + 1.5 + 2 sqrt 5) / 5.
  e = E.truncated_estimate(F5, W5)
  assert e.tau == pytest.approx(2 * math.sqrt(5))
  assert E.truncation_level(W5) == pytest.approx(2 * math.sqrt(5))
  assert e.value == pytest.approx((3.5 + 2 * math.sqrt(5)) / 5)
  assert e.truncated_frac == 0.2
  assert E.estimate(F5, W5, "truncated").value == e.value


def test_mix_perplexity_by_hand():
  # Domain a: (loss 2, 1 token), (4, 2); b: (3, 3), (1, 1), (2, 2). Empirical mix a 2/5,
  # b 3/5; target a .8, b .2 -> w_a = 2, w_b = 1/3. Weighted loss 2*6 + 6/3 = 14, tokens
  # 2*3 + 6/3 = 8, loss 1.75. Residuals w (L - 1.75 T) = .5, 1, -.75, -.25, -.5, squares sum
  # 2.125, se = sqrt(5/4 * 2.125) / 8. Ionides tau = sqrt(5) * mean(w) = sqrt(5) > 2: no
  # truncation. ESS = 5^2 / (4 + 4 + 3/9) = 3.
  doms = ["a", "a", "b", "b", "b"]
  r = E.mix_perplexity(doms, [2, 4, 3, 1, 2], [1, 2, 3, 1, 2], {"a": 0.8, "b": 0.2})
  np.testing.assert_allclose(r.weights, [2, 2, 1 / 3, 1 / 3, 1 / 3])
  assert r.loss == pytest.approx(1.75)
  assert r.perplexity == pytest.approx(math.exp(1.75))
  assert r.loss_se == pytest.approx(math.sqrt(1.25 * 2.125) / 8)
  assert r.perplexity_se == pytest.approx(math.exp(1.75) * r.loss_se)
  assert r.measured == pytest.approx(math.exp(12 / 9))
  assert r.ess == pytest.approx(3.0)
  assert (r.truncated_frac, r.tau) == (0.0, pytest.approx(math.sqrt(5)))
  # Unnormalised target weights mean the same mix; a domain left out gets weight 0.
  np.testing.assert_allclose(E.domain_weights(doms, {"a": 4, "b": 1}), r.weights)
  np.testing.assert_allclose(E.domain_weights(doms, {"a": 1}), [2.5, 2.5, 0, 0, 0])


# ------------------------------------------------ no shift: exactly the measured value
def _records(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  doms = list(rng.choice(["web", "code", "math", "books"], n, p=[0.5, 0.2, 0.2, 0.1]))
  tokens = rng.integers(1, 2048, n).astype(float)
  losses = tokens * rng.uniform(1.0, 4.0, (3, n))  # one row per sparsity level
  return doms, losses, tokens


@pytest.mark.parametrize("method", E.METHODS)
def test_target_equal_to_calibration_mix_is_exact(method):
  if method == "psis":
    pytest.importorskip("arviz_stats")
  doms, losses, tokens = _records(301)
  mix = E.empirical_mix(doms)
  r = E.mix_perplexity(doms, losses, tokens, mix, method=method)
  assert np.all(r.weights == 1.0)
  assert np.array_equal(r.perplexity, np.exp(losses.sum(-1) / tokens.sum()))
  assert np.array_equal(r.perplexity, r.measured)
  assert np.all(r.truncated_frac == 0) and r.ess == pytest.approx(301)
  one = E.mix_perplexity(
    doms,
    losses[1],
    tokens,
    mix,
    calib_mix={"web": 5, "code": 2, "math": 2, "books": 1},
    method=method,
  )
  assert one.perplexity == math.exp(losses[1].sum() / tokens.sum())


def test_psis_with_repeated_domain_weights_is_self_normalized():
  pytest.importorskip("arviz_stats")
  doms, losses, tokens = _records(400, seed=3)
  target = {"web": 0.1, "code": 0.2, "math": 0.2, "books": 0.5}
  ps = E.mix_perplexity(doms, losses, tokens, target, method="psis")
  sn = E.mix_perplexity(doms, losses, tokens, target, method="self_normalized")
  assert np.isnan(ps.pareto_k)  # the largest weights repeat: no continuous tail to fit
  np.testing.assert_array_equal(ps.perplexity, sn.perplexity)


# ------------------------------------------------ bad input
@pytest.mark.parametrize(
  "w, match",
  [
    ([1.0, np.nan, 1.0], "finite"),
    ([1.0, np.inf, 1.0], "finite"),
    ([1.0, -0.5, 1.0], ">= 0"),
    ([0.0, 0.0, 0.0], "effective sample size 0"),
    ([1.0], "at least 2 samples"),
  ],
)
@pytest.mark.parametrize("method", ["lr", "self_normalized", "truncated"])
def test_bad_weights(w, match, method):
  with pytest.raises(E.EstimatorError, match=match) as info:
    E.estimate(np.ones(len(w)), w, method)
  assert isinstance(info.value, ValueError)


def test_bad_values_and_options():
  with pytest.raises(E.EstimatorError, match="finite"):
    E.lr_estimate([1.0, np.nan], [1.0, 1.0])
  with pytest.raises(E.EstimatorError, match="broadcast"):
    E.lr_estimate([1.0, 2.0, 3.0], [1.0, 1.0])
  with pytest.raises(E.EstimatorError, match="one of"):
    E.estimate(F5, W5, "median")
  with pytest.raises(E.EstimatorError, match="tau"):
    E.truncated_estimate(F5, W5, tau=0.0)
  with pytest.raises(E.EstimatorError, match="truncation rule"):
    E.truncated_estimate(F5, W5, tau="sqrt")
  with pytest.raises(E.EstimatorError, match="beta"):
    E.truncated_estimate(F5, W5, tau="power", beta=-1.0)
  with pytest.raises(E.EstimatorError, match="zero"):  # every row needs positive weight
    E.lr_estimate(F5, [W5, [0.0] * 5])


def test_psis_needs_enough_samples():
  pytest.importorskip("arviz_stats")
  with pytest.raises(E.EstimatorError, match="at least 25"):
    E.psis_estimate(F5, W5)


def test_bad_mixes():
  doms = ["a", "a", "b"]
  with pytest.raises(E.EstimatorError, match=r"\['c'\].*no calibration records"):
    E.domain_weights(doms, {"a": 0.5, "c": 0.5})
  E.domain_weights(doms, {"a": 0.5, "b": 0.5, "c": 0.0})  # weight 0: fine
  with pytest.raises(E.EstimatorError, match=r"target_mix\['b'\].*>= 0"):
    E.domain_weights(doms, {"a": 1.0, "b": -0.1})
  with pytest.raises(E.EstimatorError, match="sum to 0"):
    E.domain_weights(doms, {"a": 0.0})
  with pytest.raises(E.EstimatorError, match="calib_mix gives no weight"):
    E.domain_weights(doms, {"a": 1.0}, calib_mix={"a": 1.0})
  with pytest.raises(E.EstimatorError, match="one label per record"):
    E.domain_weights([], {"a": 1.0})
  with pytest.raises(E.EstimatorError, match="one entry per record"):
    E.mix_perplexity(doms, [1.0, 2.0], [1, 1, 1], {"a": 1.0})
  with pytest.raises(E.EstimatorError, match="token_counts"):
    E.mix_perplexity(doms, [1.0, 2.0, 3.0], [1, -1, 1], {"a": 1.0})
  with pytest.raises(E.EstimatorError, match="loss_sums"):
    E.mix_perplexity(doms, [1.0, np.nan, 3.0], [1, 1, 1], {"a": 1.0})


# ------------------------------------------------ continuous weights: a hand-worked example
# Five documents, one weight far above the others: mean w = 4, the Ionides boundary
# tau = sqrt(5) * 4 = 8.944 < 16, so truncation fires on the fifth document only.
TINY_W = [1.0, 1.0, 1.0, 1.0, 16.0]
TINY_NLL = [10.0, 20.0, 30.0, 40.0, 100.0]
TINY_TOK = [10.0, 10.0, 10.0, 10.0, 20.0]
TINY_TAU = math.sqrt(5) * 4


def test_the_four_estimators_of_a_mean_differ_on_a_tiny_weight_vector():
  f = [1.0, 2.0, 3.0, 4.0, 5.0]
  assert E.lr_estimate(f, TINY_W).value == pytest.approx((1 + 2 + 3 + 4 + 80) / 5)  # 18
  assert E.self_normalized_estimate(f, TINY_W).value == pytest.approx(90 / 20)  # 4.5
  t = E.truncated_estimate(f, TINY_W)
  assert t.tau == pytest.approx(TINY_TAU)
  assert t.value == pytest.approx((1 + 2 + 3 + 4 + 5 * TINY_TAU) / 5)  # 2 + tau
  assert t.truncated_frac == pytest.approx(0.2)
  assert t.ess == pytest.approx((4 + TINY_TAU) ** 2 / (4 + TINY_TAU**2))


def test_target_perplexity_by_hand_with_truncation_that_fires():
  def by_hand(v, n_target):
    r = sum(a * b for a, b in zip(v, TINY_NLL)) / sum(a * b for a, b in zip(v, TINY_TOK))
    resid = [y - r * t for y, t in zip(TINY_NLL, TINY_TOK)]
    den = sum(a * t for a, t in zip(v, TINY_TOK))
    se = math.sqrt(5 / 4 * sum((a * e) ** 2 for a, e in zip(v, resid))) / den
    var_r = sum(a * e * e for a, e in zip(v, resid)) / sum(v)
    tok_mean = den / sum(v)
    se_pred = math.sqrt(se**2 + var_r / n_target / tok_mean**2)
    return r, se, se_pred

  z = 1.959963984540054
  for method, v in (
    ("lr", TINY_W),
    ("self_normalized", TINY_W),
    ("truncated", [1.0, 1.0, 1.0, 1.0, TINY_TAU]),
  ):
    got = E.target_perplexity(TINY_NLL, TINY_TOK, TINY_W, method, n_target=3)
    r, se, se_pred = by_hand(v, 3)
    assert got.loss == pytest.approx(r, rel=1e-12), method
    assert got.loss_se == pytest.approx(se, rel=1e-12), method
    assert got.perplexity == pytest.approx(math.exp(r), rel=1e-12)
    assert got.low == pytest.approx(math.exp(r - z * se), rel=1e-9)
    assert got.high == pytest.approx(math.exp(r + z * se), rel=1e-9)
    assert got.pred_low == pytest.approx(math.exp(r - z * se_pred), rel=1e-9)
    assert got.pred_high == pytest.approx(math.exp(r + z * se_pred), rel=1e-9)
  # the numbers themselves: 1700 / 360 untruncated, 5 (1 + tau) / (2 + tau) truncated
  assert E.target_perplexity(TINY_NLL, TINY_TOK, TINY_W, "lr").loss == pytest.approx(1700 / 360)
  t = E.target_perplexity(TINY_NLL, TINY_TOK, TINY_W, "truncated")
  assert t.loss == pytest.approx(5 * (1 + TINY_TAU) / (2 + TINY_TAU))
  assert t.truncated_frac == pytest.approx(0.2) and t.tau == pytest.approx(TINY_TAU)
  # without n_target the prediction interval is the population interval
  assert (t.pred_low, t.pred_high) == (t.low, t.high)


def test_target_perplexity_errors():
  with pytest.raises(E.EstimatorError, match="one entry per calibration document"):
    E.target_perplexity(TINY_NLL[:4], TINY_TOK, TINY_W)
  with pytest.raises(E.EstimatorError, match="n_target must be an integer >= 1"):
    E.target_perplexity(TINY_NLL, TINY_TOK, TINY_W, n_target=0)
  with pytest.raises(E.EstimatorError, match="level must lie in"):
    E.target_perplexity(TINY_NLL, TINY_TOK, TINY_W, level=1.5)
