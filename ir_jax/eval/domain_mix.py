"""Quality on another domain mix from per-document domain labels.

`domain_weights` turns per-document domain labels and a target mix into
w_i = p_target(domain_i) / p_calib(domain_i) with p_calib the empirical domain
frequency; `mix_perplexity` estimates the target-mix perplexity from per-document
loss sums and token counts (`ratio_estimate`). See docs/estimators.md for the formulas.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from ir_jax.eval.estimator_inputs import EstimatorError, as_scalar, check_values
from ir_jax.eval.lr_estimates import ratio_estimate

# Target weights within this relative distance of 1 are set to exactly 1, so that a
# target mix equal to the empirical calibration mix reproduces the measured value.
_UNIT_WEIGHT_RTOL = 1e-12


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
  loss_sums = check_values(loss_sums, "loss_sums")
  token_counts = check_values(token_counts, "token_counts")
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
    perplexity=as_scalar(ppl),
    perplexity_se=as_scalar(ppl * est.se),
    loss=est.value,
    loss_se=est.se,
    measured=as_scalar(measured),
    weights=w,
    ess=est.ess,
    truncated_frac=est.truncated_frac,
    method=method,
    n=est.n,
    tau=est.tau,
    pareto_k=est.pareto_k,
  )
