"""Perplexity-vs-sparsity curves for other data mixes, estimated from one evaluation.

An `ir_jax.eval` result holds, for every setting (mode, policy, sparsity), the summed
NLL of every evaluated document and the document's domain. For a target mix
p(domain) the documents are reweighted by w_i = p(domain_i) / q(domain_i), q the
empirical domain frequency of the evaluated (calibration) documents, and the
target-mix perplexity is estimated with the likelihood-ratio estimators of
`ir_jax.eval.estimators` (ratio form: weighted NLL over weighted tokens).

    python -m ir_jax.eval ... --json calib.json --target-mix news=0.8,shakespeare=0.2
    python -m ir_jax.eval.shift calib.json --target-mix news=0.8,shakespeare=0.2 \\
        --target-mix wiki=1 --estimator truncated,self_normalized --json shift.json

The second form reads an existing result, runs no model and writes the estimates
(and a plot beside --json). A target mix equal to the calibration mix gives
weights of exactly 1 and reproduces the measured curve.

Without domain labels: --target-docs B (a text/JSONL file or a directory of them) holds
unlabeled documents from where the model will be deployed. A cross-fitted classifier
between the evaluated documents (their texts read back from the sources the result
records, or --calib-docs) and B gives per-document weights w(x) = p_B(x) / p_calib(x)
(`estimators.classifier_weights` on hashed word n-grams), and every setting's perplexity on
B is estimated with a 95 % interval for the perplexity measured on those B documents:

    python -m ir_jax.eval.shift calib.json --target-docs deploy/ --estimator truncated,psis
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from ir_jax import plotting
from ir_jax.config import ConfigError
from ir_jax.eval.density_ratio import classifier_weights, text_features
from ir_jax.eval.domain_mix import domain_weights, empirical_mix, mix_perplexity
from ir_jax.eval.estimator_inputs import EstimatorError
from ir_jax.eval.importance_weights import METHODS, TAU_RULES
from ir_jax.eval.lr_estimates import Estimate, ratio_estimate, target_perplexity
from ir_jax.files import write_json

PROG = "ir_jax.eval.shift"
DEFAULT_METHODS = "truncated,self_normalized,lr"


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


def _settings(result: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]], np.ndarray]]:
  """(mode, records, loss sums [R, n]) per routing mode; dense only under the first mode."""
  from ir_jax.eval.evaluate import doc_losses

  out = []
  seen_dense = False
  modes = list(dict.fromkeys(r["mode"] for r in result["records"] if r["policy"] != "dense"))
  for mode in modes or ["topk"]:
    _, recs, losses, _ = doc_losses(result, mode)
    keep = [i for i, r in enumerate(recs) if r["policy"] != "dense" or not seen_dense]
    seen_dense = seen_dense or any(r["policy"] == "dense" for r in recs)
    out.append((mode, [recs[i] for i in keep], losses[keep]))
  return out


def _pick(a: Any, i: int) -> float | None:
  """Setting i's value of an estimate field (a scalar is shared by every setting)."""
  return None if a is None else float(np.asarray(a).reshape(-1)[i if np.size(a) > 1 else 0])


def _rows(
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
      "perplexity": _pick(m.perplexity, i),
      "perplexity_se": _pick(perplexity_se, i),
      "ess": _pick(m.ess, i),
      "truncated_frac": _pick(m.truncated_frac, i),
      "tau": _pick(m.tau, i),
      "pareto_k": _pick(m.pareto_k, i),
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
  groups = _settings(result)
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
        rows += _rows(head, recs, m, m.perplexity_se)
  return {
    "calibration_mix": calib,
    "documents": len(domains),
    "methods": list(methods),
    "tau": {"rule": tau, "c": c, "beta": beta},
    "estimates": rows,
    "skipped": skipped,
  }


TEXT_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".md", ".gz", ".csv")


def read_documents(spec: str) -> list[tuple[str, str, str]]:
  """(text, domain, source) of every document of a text/JSONL file or of every such file
  under a directory (sorted), read as `python -m ir_jax.eval --data` reads them."""
  from ir_jax.data import sources
  from ir_jax.data.config import DataConfig, FileSpec

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
  density ratios (`estimators.classifier_weights`, `estimators.target_perplexity`), and the
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
    for mode, recs, losses in _settings(result):
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
        out = {"low": _pick(m.pred_low, i), "high": _pick(m.pred_high, i)}
        if sparsity is not None:
          out["est_realized_sparsity"] = _pick(sparsity.value, i)
          out["est_realized_sparsity_se"] = _pick(sparsity.se, i)
        return out

      rows += _rows(head, recs, m, se, extra)
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


def table(shift: dict[str, Any]) -> str:
  """The estimates as a console table, one block per target mix."""
  calib = ", ".join(f"{d}={p:.3f}" for d, p in sorted(shift["calibration_mix"].items()))
  lines = [f"calibration mix ({shift['documents']} documents): {calib}"]
  for wt in shift.get("weights", []):
    lines.append(
      f"target {wt['target']}: classifier AUC {wt['auc']:.3f} (0.5: indistinguishable), "
      f"weights mean {wt['mean']:.3f} max {wt['max']:.2f}, ESS {wt['ess']:.1f} of "
      f"{len(wt['values'])}"
    )
  head = (
    f"{'method':16s} {'mode':6s} {'policy':8s} {'sparsity':>8s} {'calib ppl':>10s} "
    f"{'target ppl':>10s} {'+-se':>8s} {'ess':>7s} {'trunc':>6s} {'95% interval':>19s}"
  )
  for label in dict.fromkeys(e["target_mix"] for e in shift["estimates"]):
    lines += ["", f"target mix {label}", head, "-" * len(head)]
    for e in shift["estimates"]:
      if e["target_mix"] == label:
        lines.append(
          f"{e['method']:16s} {e['mode']:6s} {e['policy']:8s} {e['sparsity']:8.2f} "
          f"{e['calibration_perplexity']:10.4f} {e['perplexity']:10.4f} "
          f"{e['perplexity_se']:8.3f} {e['ess']:7.1f} {e['truncated_frac']:6.3f}"
          + (f" {e['low']:9.3f}-{e['high']:<9.3f}" if "low" in e else "")
          + (
            f" expected sparsity {e['est_realized_sparsity']:.3f}"
            f" +-{e['est_realized_sparsity_se']:.3f}"
            if "est_realized_sparsity" in e and e["policy"] != "dense"
            else ""
          )
        )
    for k in shift.get("skipped", []):
      if k["target_mix"] == label:
        lines.append(f"{k['method']:16s} {k['mode']:6s} not estimated: {k['reason']}")
  return "\n".join(lines)


def plot(result: dict[str, Any], shift: dict[str, Any], path: str, title: str = "") -> str:
  """One panel per target mix: measured calibration curves (solid) and estimates (dashed)."""
  plt = plotting.pyplot()

  labels = list(dict.fromkeys(e["target_mix"] for e in shift["estimates"]))
  n = max(len(labels), 1)
  fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False, sharey=True)
  policies = list(dict.fromkeys(r["policy"] for r in result["records"] if r["policy"] != "dense"))
  dense = next((r["perplexity"] for r in result["records"] if r["policy"] == "dense"), None)
  styles = {"truncated": "--", "self_normalized": ":", "lr": "-.", "psis": (0, (1, 3))}
  for ax, label in zip(axes[0], labels):
    for k, policy in enumerate(policies):
      color = f"C{k}"
      pts = sorted(
        (r["realized_sparsity"], r["perplexity"])
        for r in result["records"]
        if r["policy"] == policy and r["mode"] == "topk"
      )
      if pts:
        ax.plot(*zip(*pts), color=color, marker="o", label=f"{policy} measured (calibration)")
      for method in shift["methods"]:
        est = sorted(
          (e["realized_sparsity"], e["perplexity"])
          for e in shift["estimates"]
          if e["target_mix"] == label
          and e["method"] == method
          and e["policy"] == policy
          and e["mode"] == "topk"
        )
        if est:
          ax.plot(
            *zip(*est),
            color=color,
            linestyle=styles.get(method, "--"),
            marker="x",
            label=f"{policy} {method}",
          )
    if dense is not None:
      ax.axhline(dense, color="gray", linewidth=1, label=f"dense (calibration) {dense:.3g}")
    ax.set_title(f"target {label}", fontsize=9)
    ax.set_xlabel("realized sparsity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("perplexity")
  axes[0][0].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  plotting.save(fig, path)
  return path


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--target-mix",
    action="append",
    default=[],
    metavar="DOMAIN=W,...",
    help="a target data mix (weights normalised to 1; repeat for several); "
    "every domain with weight > 0 must occur in the evaluated documents",
  )
  p.add_argument(
    "--target-docs",
    action="append",
    default=[],
    metavar="PATH",
    help="unlabeled target documents (a text/JSONL file or a directory of them; repeat for "
    "several targets): weights from a classifier between them and the evaluated documents",
  )
  p.add_argument(
    "--calib-docs",
    default=None,
    metavar="PATH",
    help="the evaluated documents' texts for --target-docs (default: read back from the "
    "source files the result names)",
  )
  p.add_argument(
    "--estimator",
    default=DEFAULT_METHODS,
    help=f"comma-separated estimators of {','.join(METHODS)} (default {DEFAULT_METHODS})",
  )
  p.add_argument(
    "--tau",
    default="ionides",
    help="truncation boundary of the truncated estimator: ionides "
    "(c sqrt(n) mean w), power (c n^beta mean w) or a number (default "
    "ionides)",
  )
  p.add_argument("--tau-c", type=float, default=1.0, help="c of the tau rule (default 1)")
  p.add_argument("--tau-beta", type=float, default=0.5, help="beta of the power rule (default 0.5)")


def from_args(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
  """The estimates the parsed `add_arguments` options ask for, or None without --target-mix
  and --target-docs."""
  targets = getattr(args, "target_docs", None) or []
  if not args.target_mix and not targets:
    return None
  mixes = [(t.replace(" ", ""), parse_mix(t)) for t in args.target_mix]
  methods = parse_methods(args.estimator)
  tau: str | float = args.tau
  if tau not in TAU_RULES:
    try:
      tau = float(tau)
    except ValueError:
      raise ConfigError(
        f"--tau {args.tau!r}: expected {' or '.join(TAU_RULES)} or a number"
      ) from None
  out = estimate_curves(result, mixes, methods, tau=tau, c=args.tau_c, beta=args.tau_beta)
  if targets:
    calib = calibration_texts(result, getattr(args, "calib_docs", None))
    out["weights"] = []
    for spec in targets:
      docs = read_documents(spec)
      got = estimate_documents(
        result,
        calib,
        (f"docs:{spec}", [t for t, _, _ in docs]),
        methods,
        tau=tau,
        c=args.tau_c,
        beta=args.tau_beta,
      )
      out["weights"].append(got["weights"])
      out["estimates"] += got["estimates"]
      out["skipped"] += got["skipped"]
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m ir_jax.eval.shift",
    description="Estimated perplexity-vs-sparsity curves for other domain mixes, or for "
    "unlabeled target documents, from an existing `python -m ir_jax.eval` JSON (its "
    "per-document losses and domains); runs no model.",
  )
  p.add_argument("result", metavar="EVAL_JSON", help="a JSON written by python -m ir_jax.eval")
  add_arguments(p)
  p.add_argument("--json", default=None, help="write the estimates here (plot beside it, .png)")
  p.add_argument("--no-plot", action="store_true", help="do not write the .png plot")
  args = p.parse_args(argv)
  if not args.target_mix and not args.target_docs:
    raise ConfigError(
      "give at least one --target-mix domain=weight,... or --target-docs FILE_OR_DIRECTORY"
    )
  if not os.path.isfile(args.result):
    raise FileNotFoundError(f"{args.result}: no such file")
  with open(args.result, encoding="utf-8") as f:
    try:
      result = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{args.result}: not JSON ({e})") from None
  if not isinstance(result, dict) or not str(result.get("format", "")).startswith("ir_jax.eval/"):
    raise ConfigError(f"{args.result}: not an ir_jax.eval result (no 'format': 'ir_jax.eval/1')")
  shift = from_args(result, args)
  print(table(shift))
  if args.json:
    out = {"format": "ir_jax.eval.shift/1", "source": os.path.abspath(args.result), **shift}
    write_json(args.json, out)
    print(f"wrote {args.json}")
    if not args.no_plot:
      png = os.path.splitext(args.json)[0] + ".png"
      try:
        plot(result, shift, png, title=f"estimated from {os.path.basename(args.result)}")
        print(f"wrote {png}")
      except ImportError:
        print(f"{PROG}: {plotting.NO_MATPLOTLIB}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  from ir_jax.errors import cli_main

  cli_main(main, PROG)
