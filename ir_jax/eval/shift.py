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
(`density_ratio.classifier_weights` on hashed word n-grams), and every setting's perplexity on
B is estimated with a 95 % interval for the perplexity measured on those B documents:

    python -m ir_jax.eval.shift calib.json --target-docs deploy/ --estimator truncated,psis
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ir_jax import plotting
from ir_jax.config import ConfigError
from ir_jax.errors import cli_main
from ir_jax.eval.importance_weights import METHODS, TAU_RULES
from ir_jax.eval.shift_documents import (  # noqa: F401  (also importable from here)
  TEXT_SUFFIXES,
  calibration_texts,
  estimate_documents,
  read_documents,
)
from ir_jax.eval.shift_mix import (  # noqa: F401  (also importable from here)
  estimate_curves,
  parse_methods,
  parse_mix,
)
from ir_jax.files import write_json

PROG = "ir_jax.eval.shift"
DEFAULT_METHODS = "truncated,self_normalized,lr"


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
  cli_main(main, PROG)
