"""The page of the data-shift check: docs/shift.{json,md,png} from `trials.run`'s results."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ir_jax import plotting
from ir_jax.experiments.shift.trials import METHODS, PROG, verdicts
from ir_jax.files import write_json

REPO = str(Path(__file__).resolve().parents[3])  # the checkout: ir_jax/experiments/shift/


def rel(p: str) -> str:
  r = os.path.relpath(p, REPO)
  return p if r.startswith("..") else r


def write(
  res: dict,
  data: dict,
  docs: str,
  *,
  eval_dir: str,
  heldout: str,
  sets: str,
  resamples: int,
  seed: int,
) -> None:
  """docs/shift.json (results, verdicts), shift.md (the page, also printed), shift.png."""
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
  ).stdout.strip()
  settings = data["settings"]
  counts = {d: int((data["domains"] == d).sum()) for d in sorted(set(data["domains"]))}
  clean = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in res.items()}
  ver = verdicts(res)
  out = {
    "format": "ir_jax.shift_experiment/2",
    "commit": commit,
    "date": datetime.date.today().isoformat(),
    "eval": rel(eval_dir),
    "heldout": rel(heldout),
    "sets": sets,
    "documents": counts,
    "settings": settings,
    "resamples": resamples,
    "seed": seed,
    "scenarios": clean,
    "targets": ver,
  }
  write_json(os.path.join(docs, "shift.json"), out)
  md = [
    "# Quality under data shift, checked against measured perplexity",
    "",
    "Written by `launch/shift_experiment.py`; the method is in `estimators.md`. For each "
    "target below and each resample, two disjoint pools are drawn from the held-out "
    "documents: A (the documents every setting was evaluated on) and B (the unlabeled "
    "documents where the model will be deployed; their domain labels are not used). The "
    "weights w(x) = p_B(x) / p_A(x) at A's documents come from a cross-fitted, calibrated "
    "logistic regression on hashed word n-grams (`estimators.classifier_weights`); each "
    "estimator (`estimators.target_perplexity`) turns A's per-document NLLs and the weights "
    "into every setting's perplexity on B with a 95 % prediction interval, and the truth is "
    "the perplexity measured on B. For the perplexity, a ratio of two expectations, lr and "
    "self_normalized coincide by construction; truncated (Ionides' boundary sqrt(n) mean(w)) "
    "and psis treat the large weights differently.",
    "",
    f"Documents: {sum(counts.values())} ({', '.join(f'{d} {n}' for d, n in counts.items())}) of "
    f"the held-out sets {sets} (`{rel(heldout)}`), per-document NLL from "
    f"`{rel(eval_dir)}`; settings: {', '.join(settings)}. {resamples} resamples per "
    f"target, seed {seed}; commit {commit}. Regenerate: `python launch/shift_experiment.py "
    f"--eval {rel(eval_dir)} --heldout {rel(heldout)} --resamples {resamples}`.",
    "",
    "Per target: documents of each domain in A and in B (disjoint, drawn afresh each "
    "resample), the classifier's out-of-fold AUC (0.5: A and B indistinguishable), the "
    "largest weight over the mean weight, and the share of the total weight on A's documents "
    "of the domains B holds (1 for the true ratio; medians over resamples).",
    "",
    "| target | A | B | AUC | max w / mean w | weight on B's domains | heavy-tailed |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  fmt = lambda c: ", ".join(f"{d} {n}" for d, n in c.items())
  for name, s in res.items():
    md.append(
      f"| {name} | {fmt(s['A'])} | {fmt(s['B'])} | {s['auc_median']:.2f} | "
      f"{s['max_weight_over_mean_median']:.1f} | "
      f"{s['weight_share_on_B_domains_median']:.2f} | {'yes' if s['heavy_tailed'] else ''} |"
    )
  md += [
    "",
    "Relative error of the estimated perplexity against the perplexity measured on B: "
    "bias / RMSE / coverage of the 95 % prediction interval, averaged over the settings "
    "(per setting in shift.json), and the mean ESS and share of weights truncated "
    "(truncated) or smoothed (psis, with the median Pareto k):",
    "",
    "| target | " + " | ".join(METHODS) + " |",
    "| --- | " + " | ".join("---" for _ in METHODS) + " |",
  ]
  for name, s in res.items():
    cells = []
    for m in METHODS:
      v = s["methods"].get(m)
      if v is None:
        cells.append("n/a")
        continue
      extra = f", ESS {v['ess']:.1f}"
      if m == "truncated":
        extra += f", {v['truncated_frac']:.0%} cut"
      if m == "psis" and v["pareto_k_median"] is not None:
        extra += f", {v['truncated_frac']:.0%} smoothed, k {v['pareto_k_median']:.2f}"
      cells.append(
        f"{np.mean(v['bias']):+.1%} / {np.mean(v['rmse']):.1%} / {np.mean(v['coverage']):.0%}{extra}"
      )
    md.append(f"| {name} | " + " | ".join(cells) + " |")
  md += [
    "",
    "Per setting (RMSE of the relative error; truncated vs lr):",
    "",
    "| target | " + " | ".join(settings) + " |",
    "| --- | " + " | ".join("---" for _ in settings) + " |",
  ]
  for name, s in res.items():
    m = s["methods"]
    md.append(
      f"| {name} | "
      + " | ".join(
        f"{m['truncated']['rmse'][i]:.1%} vs {m['lr']['rmse'][i]:.1%}" for i in range(len(settings))
      )
      + " |"
    )
  md += ["", "Targets of issue 27 item 4 (RMSE averaged over settings):", ""]
  for name, v in ver.items():
    half = (
      ""
      if v["truncated_at_most_half_lr"] is None
      else f"; at most half: {v['truncated_at_most_half_lr']}"
    )
    cov = ", ".join(f"{k} {c:.0%}" for k, c in v["coverage"].items())
    md.append(
      f"- {name}: truncated {v['rmse_truncated']:.1%} vs lr {v['rmse_lr']:.1%}, at most lr: "
      f"{v['truncated_at_most_lr']}{half}; coverage {cov}"
    )
  md.append("")
  with open(os.path.join(docs, "shift.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(md))
  print("\n".join(md))
  try:
    plot(res, settings, os.path.join(docs, "shift.png"))
  except ImportError:
    print(f"{PROG}: {plotting.NO_MATPLOTLIB}", file=sys.stderr)


def plot(res: dict, settings: list[str], path: str) -> None:
  """Estimated vs measured perplexity, one panel per estimator, every resample of every
  target for dense and the first routed setting."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(1, len(METHODS), figsize=(4.0 * len(METHODS), 4.0), squeeze=False)
  show = [0] + ([1] if len(settings) > 1 else [])
  for ax, m in zip(axes[0], METHODS):
    lo, hi = np.inf, 0.0
    for k, (name, s) in enumerate(res.items()):
      est, truth = s["_scatter"][m]
      for j, i in enumerate(show):
        ok = ~np.isnan(est[:, i])
        ax.scatter(
          truth[ok, i],
          est[ok, i],
          s=6,
          alpha=0.5,
          color=f"C{k}",
          marker="o" if j == 0 else "^",
          label=name if j == 0 else None,
        )
        if ok.any():
          lo, hi = (
            min(lo, truth[ok, i].min(), est[ok, i].min()),
            max(hi, truth[ok, i].max(), est[ok, i].max()),
          )
    ax.plot([lo, hi], [lo, hi], "k-", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(m, fontsize=9)
    ax.set_xlabel("measured on B")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel(
    f"estimated from A (o {settings[0]}" + (f", ^ {settings[1]})" if len(show) > 1 else ")")
  )
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  plotting.save(fig, path, dpi=110)
