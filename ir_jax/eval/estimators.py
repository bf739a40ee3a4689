"""Likelihood-ratio estimates of quality on another data mix from one evaluation pass.

Documents x_1..x_n are drawn from a calibration (nominal) distribution q; we want
E_p[f] under a target p, with weights w_i = p(x_i) / q(x_i). This module gathers
the public names of the modules that do it, one concern each:

  estimator_inputs    EstimatorError and the checks on weights, values and shapes
  importance_weights  the weights each method applies (as given, truncated at tau_n,
                      Pareto-smoothed) and their diagnostics (Kish ESS, k-hat)
  lr_estimates        lr, self-normalized, truncated and PSIS estimates of a mean or a
                      ratio with standard errors; target_perplexity with its intervals
  domain_mix          weights from domain labels and a target mix; mix_perplexity
  density_ratio       weights from a cross-fitted classifier on hashed n-gram features

Code in ir_jax imports from those modules; this one keeps `ir_jax.eval.estimators.X`
working for scripts and notebooks. See docs/estimators.md for the formulas.
"""

from __future__ import annotations

from ir_jax.eval.density_ratio import DensityRatio, classifier_weights, text_features
from ir_jax.eval.domain_mix import MixPerplexity, domain_weights, empirical_mix, mix_perplexity
from ir_jax.eval.estimator_inputs import EstimatorError
from ir_jax.eval.importance_weights import METHODS, TAU_RULES, truncation_level
from ir_jax.eval.lr_estimates import (
  Estimate,
  TargetPerplexity,
  estimate,
  lr_estimate,
  psis_estimate,
  ratio_estimate,
  self_normalized_estimate,
  target_perplexity,
  truncated_estimate,
)

__all__ = [
  "METHODS",
  "TAU_RULES",
  "DensityRatio",
  "Estimate",
  "EstimatorError",
  "MixPerplexity",
  "TargetPerplexity",
  "classifier_weights",
  "domain_weights",
  "empirical_mix",
  "estimate",
  "lr_estimate",
  "mix_perplexity",
  "psis_estimate",
  "ratio_estimate",
  "self_normalized_estimate",
  "target_perplexity",
  "text_features",
  "truncated_estimate",
  "truncation_level",
]
