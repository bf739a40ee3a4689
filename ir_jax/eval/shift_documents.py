"""Perplexity of every setting of an `ir_jax.eval` result on unlabeled target documents.

A cross-fitted classifier between the evaluated documents and the target documents gives
per-document density ratios (`ir_jax.eval.density_ratio`); each setting's perplexity on
the target is estimated from them (`ir_jax.eval.lr_estimates`).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ir_jax.config import ConfigError
from ir_jax.data import sources
from ir_jax.data.config import DataConfig, FileSpec
from ir_jax.eval.density_ratio import classifier_weights, text_features
from ir_jax.eval.estimator_inputs import EstimatorError
from ir_jax.eval.lr_estimates import Estimate, ratio_estimate, target_perplexity
from ir_jax.eval.shift_mix import estimate_rows, pick, setting_losses

TEXT_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".md", ".gz", ".csv")


def read_documents(spec: str) -> list[tuple[str, str, str]]:
  """(text, domain, source) of every document of a text/JSONL file or of every such file
  under a directory (sorted), read as `python -m ir_jax.eval --data` reads them."""
  if os.path.isdir(spec):
    paths = sorted(
      os.path.join(root, f)
      for root, _, files in os.walk(spec)
      for f in files
      if f.lower().endswith(TEXT_SUFFIXES)
    )
    if not paths:
      raise ConfigError(f"{spec}: no text files ({', '.join(TEXT_SUFFIXES)}) in this directory")
  elif os.path.isfile(spec):
    paths = [spec]
  else:
    raise FileNotFoundError(f"{spec}: no such file or directory")
  cfg = DataConfig(name="local", files=tuple(FileSpec(os.path.abspath(p)) for p in paths))
  stats = sources.Stats()
  docs = [
    (d.text, d.domain, d.source)
    for f in sources.resolve_files(cfg)
    for d in sources.read_documents(f, cfg, stats)
  ]
  if not docs:
    raise ConfigError(f"{spec}: no documents (empty files or records without text)")
  return docs


def calibration_texts(result: dict[str, Any], spec: str | None = None) -> list[str]:
  """The texts of the result's documents, in its order: read from `spec` (the --data of
  the evaluation) or, without it, from the files the result's sources ("path:line") name."""
  docs = result["documents"]
  if spec is not None:
    read = read_documents(spec)
    if len(read) != len(docs):
      raise ConfigError(
        f"--calib-docs {spec}: {len(read)} documents, but the result evaluated {len(docs)}; "
        "give the --data the evaluation read"
      )
    return [t for t, _, _ in read]
  by_source: dict[str, str] = {}
  for path in dict.fromkeys(str(d.get("source", "")).rpartition(":")[0] for d in docs):
    if not path or not os.path.isfile(path):
      raise ConfigError(
        f"the result's documents come from {path or 'an unnamed source'!r}, which is not a "
        "readable file here; give their texts with --calib-docs (the evaluation's --data)"
      )
    by_source.update({src: t for t, _, src in read_documents(path)})
  missing = [d["source"] for d in docs if d["source"] not in by_source]
  if missing:
    raise ConfigError(
      f"{len(missing)} evaluated documents (first {missing[0]}) are no longer in their source "
      "file; give their texts with --calib-docs"
    )
  return [by_source[d["source"]] for d in docs]


def _sparsity_estimate(
  recs: Sequence[dict[str, Any]], tokens: np.ndarray, w: np.ndarray, method: str, **kw: Any
) -> Estimate | None:
  """The realized sparsity each setting should have on the target: the documents'
  approximated shares (`doc_sparsity`) averaged with weight w x tokens (`ratio_estimate`);
  None for results written before per-document sparsity was recorded."""
  if not all("doc_sparsity" in r for r in recs):
    return None
  share = np.asarray([r["doc_sparsity"] for r in recs], np.float64)
  return ratio_estimate(share * tokens, tokens, w, method, **kw)


def estimate_documents(
  result: dict[str, Any],
  calib_texts: Sequence[str],
  target: tuple[str, Sequence[str]],
  methods: Sequence[str] = ("truncated",),
  *,
  tau: str | float = "ionides",
  c: float = 1.0,
  beta: float = 0.5,
  seed: int = 0,
) -> dict[str, Any]:
  """Every setting's perplexity on unlabeled target documents, per method, from classifier
  density ratios (`density_ratio.classifier_weights`, `lr_estimates.target_perplexity`), and the
  realized sparsity to expect there (`est_realized_sparsity`, from per-document sparsity).

  Returns {"weights": diagnostics of the ratio fit, "estimates": rows as in
  `estimate_curves` with "low"/"high" (the 95 % interval for the perplexity measured on the
  target documents), "skipped"}.
  """
  label, target_texts = target
  tokens = np.asarray([d["tokens"] for d in result["documents"]], np.float64)
  feats = text_features(list(calib_texts) + list(target_texts))
  dr = classifier_weights(feats[: len(calib_texts)], feats[len(calib_texts) :], seed=seed)
  w = dr.weights
  rows, skipped = [], []
  for method in methods:
    for mode, recs, losses in setting_losses(result):
      if not recs:
        continue
      try:
        m = target_perplexity(
          losses, tokens, w, method, n_target=len(target_texts), tau=tau, c=c, beta=beta
        )
      except EstimatorError as e:
        skipped.append({"target_mix": label, "method": method, "mode": mode, "reason": str(e)})
        continue
      sparsity = _sparsity_estimate(recs, tokens, w, method, tau=tau, c=c, beta=beta)
      head = {
        "target_mix": label,
        "target_documents": len(target_texts),
        "method": method,
        "mode": mode,
      }
      se = np.asarray(m.perplexity) * np.asarray(m.loss_se)

      def extra(i: int, m=m, sparsity=sparsity) -> dict[str, Any]:
        out = {"low": pick(m.pred_low, i), "high": pick(m.pred_high, i)}
        if sparsity is not None:
          out["est_realized_sparsity"] = pick(sparsity.value, i)
          out["est_realized_sparsity_se"] = pick(sparsity.se, i)
        return out

      rows += estimate_rows(head, recs, m, se, extra)
  return {
    "weights": {
      "target": label,
      "auc": dr.auc,
      "penalty": dr.penalty,
      "calibration": list(dr.calibration),
      "folds": dr.folds,
      "mean": float(w.mean()),
      "max": float(w.max()),
      "ess": float(w.sum() ** 2 / (w * w).sum()),
      "values": w.tolist(),
    },
    "estimates": rows,
    "skipped": skipped,
  }
