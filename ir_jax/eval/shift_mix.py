"""Perplexity of every setting of an `ir_jax.eval` result under another domain mix.

The documents are reweighted by w_i = p(domain_i) / q(domain_i), q the empirical domain
frequency of the evaluated documents (`ir_jax.eval.domain_mix`); the rows here are what
`ir_jax.eval.shift` prints, plots and writes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from ir_jax.config import ConfigError
from ir_jax.eval.domain_mix import domain_weights, empirical_mix, mix_perplexity
from ir_jax.eval.estimator_inputs import EstimatorError
from ir_jax.eval.importance_weights import METHODS


def doc_losses(
  result: dict[str, Any], mode: str = "topk", policy: str | None = None
) -> tuple[list[str], list[dict[str, Any]], np.ndarray, np.ndarray]:
  """(domains [n], records, loss sums [R, n], token counts [n]) for `mix_perplexity`.

  The records of `mode` (and `policy` if given; dense is always included),
  in file order; rows of the loss sums follow them.
  """
  recs = [
    r
    for r in result["records"]
    if (r["mode"] == mode or r["policy"] == "dense")
    and (policy is None or r["policy"] in (policy, "dense"))
  ]
  domains = [d["domain"] for d in result["documents"]]
  tokens = np.asarray([d["tokens"] for d in result["documents"]], np.float64)
  losses = np.asarray([r["doc_nll"] for r in recs], np.float64).reshape(len(recs), len(domains))
  return domains, recs, losses, tokens


def parse_mix(text: str) -> dict[str, float]:
  """'news=0.8,wiki=0.2' -> {'news': 0.8, 'wiki': 0.2} (weights are normalised later)."""
  mix: dict[str, float] = {}
  for part in (p.strip() for p in text.split(",")):
    if not part:
      continue
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or not name:
      raise ConfigError(f"--target-mix {text!r}: expected domain=weight,..., got {part!r}")
    try:
      w = float(value)
    except ValueError:
      raise ConfigError(
        f"--target-mix {text!r}: weight of {name!r} is not a number: {value.strip()!r}"
      ) from None
    if not math.isfinite(w) or w < 0:
      raise ConfigError(
        f"--target-mix {text!r}: weight of {name!r} must be finite and >= 0, got {value.strip()}"
      )
    if name in mix:
      raise ConfigError(f"--target-mix {text!r}: domain {name!r} given twice")
    mix[name] = w
  if not mix:
    raise ConfigError("--target-mix is empty; expected domain=weight,...")
  if sum(mix.values()) <= 0:
    raise ConfigError(f"--target-mix {text!r}: weights sum to 0")
  return mix


def parse_methods(text: str) -> list[str]:
  methods = [m.strip() for m in text.split(",") if m.strip()]
  bad = [m for m in methods if m not in METHODS]
  if not methods or bad:
    raise ConfigError(f"--estimator {text!r}: choose from {','.join(METHODS)}")
  return methods


def setting_losses(result: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]], np.ndarray]]:
  """(mode, records, loss sums [R, n]) per routing mode; dense only under the first mode."""
  out = []
  seen_dense = False
  modes = list(dict.fromkeys(r["mode"] for r in result["records"] if r["policy"] != "dense"))
  for mode in modes or ["topk"]:
    _, recs, losses, _ = doc_losses(result, mode)
    keep = [i for i, r in enumerate(recs) if r["policy"] != "dense" or not seen_dense]
    seen_dense = seen_dense or any(r["policy"] == "dense" for r in recs)
    out.append((mode, [recs[i] for i in keep], losses[keep]))
  return out


def pick(a: Any, i: int) -> float | None:
  """Setting i's value of an estimate field (a scalar is shared by every setting)."""
  return None if a is None else float(np.asarray(a).reshape(-1)[i if np.size(a) > 1 else 0])


def estimate_rows(
  head: dict[str, Any],
  recs: Sequence[dict[str, Any]],
  m: Any,
  perplexity_se: Any,
  extra: Callable[[int], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
  """One estimate row per setting: `head` (target, method, mode), the setting, its
  calibration perplexity and the estimate `m` (a mix or target perplexity) with its
  diagnostics, then `extra(i)`."""
  out = []
  for i, r in enumerate(recs):
    row = {
      **head,
      "policy": r["policy"],
      "sparsity": r["sparsity"],
      "realized_sparsity": r["realized_sparsity"],
      "calibration_perplexity": r["perplexity"],
      "perplexity": pick(m.perplexity, i),
      "perplexity_se": pick(perplexity_se, i),
      "ess": pick(m.ess, i),
      "truncated_frac": pick(m.truncated_frac, i),
      "tau": pick(m.tau, i),
      "pareto_k": pick(m.pareto_k, i),
      "n": m.n,
    }
    if extra is not None:
      row.update(extra(i))
    out.append(row)
  return out


def estimate_curves(
  result: dict[str, Any],
  mixes: Sequence[tuple[str, dict[str, float]]],
  methods: Sequence[str] = ("truncated",),
  *,
  tau: str | float = "ionides",
  c: float = 1.0,
  beta: float = 0.5,
) -> dict[str, Any]:
  """Estimated target-mix perplexity of every setting of `result`, per mix and method.

  Returns {"calibration_mix", "methods", "tau", "estimates": [one dict per (mix, method,
  setting)]}; an estimate carries the setting's calibration perplexity beside it.
  """
  domains = [d["domain"] for d in result["documents"]]
  tokens = np.asarray([d["tokens"] for d in result["documents"]], np.float64)
  calib = empirical_mix(domains)
  groups = setting_losses(result)
  rows, skipped = [], []
  for label, mix in mixes:
    domain_weights(domains, mix)  # a domain without records is the caller's error
    for method in methods:
      for mode, recs, losses in groups:
        if not recs:
          continue
        try:
          m = mix_perplexity(domains, losses, tokens, mix, method=method, tau=tau, c=c, beta=beta)
        except EstimatorError as e:  # e.g. PSIS with too few positive weights
          skipped.append({"target_mix": label, "method": method, "mode": mode, "reason": str(e)})
          continue
        head = {"target_mix": label, "mix": mix, "method": method, "mode": mode}
        rows += estimate_rows(head, recs, m, m.perplexity_se)
  return {
    "calibration_mix": calib,
    "documents": len(domains),
    "methods": list(methods),
    "tau": {"rule": tau, "c": c, "beta": beta},
    "estimates": rows,
    "skipped": skipped,
  }
