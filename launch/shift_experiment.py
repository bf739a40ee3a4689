"""Quality under data shift, checked against truth: classifier density ratios between a
calibration pool A and unlabeled target documents B, four estimators, many resamples.

    python launch/shift_experiment.py --eval runs/budget/eval --heldout runs/budget/heldout
    python launch/shift_experiment.py ... --resamples 50 --docs /tmp/shift   # a quick look

Material: the per-document summed NLL of every setting (`python -m ir_jax.eval --json`, one
JSON per routed arm and budget, each with dense beside it) on the held-out sets `--sets`
(default valid,pydoc: disjoint documents of four domains), and the documents' texts (the
held-out JSONL each evaluation read, in the same order). No model runs here.

For each target (a scenario: how many documents of each domain A and B hold) and each
resample: A and B are drawn without replacement, disjoint; B's domain labels are then
forgotten. Weights w(x) = p_B(x) / p_A(x) at A's documents come from
`estimators.classifier_weights` on hashed word n-grams (`estimators.text_features`),
cross-fitted. Every estimator of `estimators.target_perplexity` turns A's NLLs, the weights
and B's mean token count into B's perplexity with a 95 % prediction interval, for every
setting; the truth is the perplexity measured on B. Output: docs/shift.{json,md,png}
(bias, RMSE and coverage per target, setting and estimator).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices, a shared machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ir_jax import plotting  # noqa: E402
from ir_jax.eval import estimators as es  # noqa: E402
from ir_jax.files import write_json  # noqa: E402

PROG = "shift_experiment"
METHODS = ("lr", "self_normalized", "truncated", "psis")
# name: (A counts per domain, B counts per domain, heavy-tailed?). Domains of the default
# sets: news 25, pydoc 32, wiki 8, shakespeare 4 documents.
_ALL = {"news": 11, "pydoc": 13, "wiki": 4, "shakespeare": 2}
SCENARIOS = {
  "no shift": (_ALL, {"news": 7, "pydoc": 9, "wiki": 3, "shakespeare": 1}, False),
  "more pydoc": (
    {"news": 14, "pydoc": 10, "wiki": 4, "shakespeare": 2},
    {"news": 5, "pydoc": 13, "wiki": 2},
    False,
  ),
  "pydoc only": ({"news": 16, "pydoc": 8, "wiki": 4, "shakespeare": 2}, {"pydoc": 20}, False),
  "news only": ({"news": 10, "pydoc": 14, "wiki": 4, "shakespeare": 2}, {"news": 15}, False),
  "pydoc rare in A": (
    {"news": 20, "pydoc": 2, "wiki": 5, "shakespeare": 3},
    {"news": 4, "pydoc": 16},
    True,
  ),
  "news rare in A": (
    {"news": 2, "pydoc": 22, "wiki": 4, "shakespeare": 2},
    {"news": 16, "pydoc": 4},
    True,
  ),
  "wiki rare in A": (
    {"news": 16, "pydoc": 12, "wiki": 1, "shakespeare": 1},
    {"news": 3, "pydoc": 1, "wiki": 6},
    True,
  ),
}


def rel(p: str) -> str:
  r = os.path.relpath(p, REPO)
  return p if r.startswith("..") else r


def load(eval_dir: str, heldout: str, sets: list[str]) -> dict:
  """Texts, domains, tokens [n] and NLL [settings, n] of every document of `sets` (the
  settings every set has, dense first)."""
  texts, domains, tokens, per_set = [], [], [], []
  for name in sets:
    with open(os.path.join(heldout, f"{name}.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    folder = os.path.join(eval_dir, name)
    files = (
      sorted(f for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
    )
    per: dict[str, np.ndarray] = {}
    docs = None
    for fn in files:
      with open(os.path.join(folder, fn), encoding="utf-8") as f:
        res = json.load(f)
      docs = docs or res["documents"]
      if [d["domain"] for d in res["documents"]] != [r["domain"] for r in rows]:
        raise SystemExit(f"{PROG}: error: {fn} of {name}: documents differ from {name}.jsonl")
      arm = fn[: -len(".json")]
      for r in res["records"]:
        if r["mode"] != "topk":
          continue
        if r["policy"] == "dense":
          key = "dense"
        elif r.get("flops_budget"):
          key = f"{r['policy']} {arm.split('_')[-1]}"  # at the arm's FLOPs budget
        else:
          key = f"{r['policy']} s{r['sparsity']:g} ({arm})"
        per.setdefault(key, np.asarray(r["doc_nll"], np.float64))
    if docs is None:
      raise SystemExit(f"{PROG}: error: no eval JSON in {folder}; run launch/budget_table.py")
    texts += [r["text"] for r in rows]
    domains += [r["domain"] for r in rows]
    tokens += [d["tokens"] for d in docs]
    per_set.append(per)
  keys = [k for k in per_set[0] if all(k in p for p in per_set)]
  keys.sort(key=lambda k: (k != "dense", k))
  return {
    "texts": texts,
    "domains": np.asarray(domains),
    "tokens": np.asarray(tokens, np.float64),
    "nll": np.stack([np.concatenate([p[k] for p in per_set]) for k in keys]),
    "settings": keys,
  }


def draw(rng: np.random.Generator, domains: np.ndarray, a: dict, b: dict) -> tuple:
  ia, ib = [], []
  for d in sorted(set(a) | set(b)):
    idx = rng.permutation(np.flatnonzero(domains == d))
    need = a.get(d, 0) + b.get(d, 0)
    if need > len(idx):
      raise SystemExit(f"{PROG}: error: the scenario needs {need} {d!r} documents, have {len(idx)}")
    ia += list(idx[: a.get(d, 0)])
    ib += list(idx[a.get(d, 0) : need])
  return np.asarray(ia), np.asarray(ib)


def run(data: dict, resamples: int, seed: int, log=print) -> dict:
  feats = es.text_features(data["texts"])
  nll, tok, dom = data["nll"], data["tokens"], data["domains"]
  out = {}
  for si, (name, (ca, cb, heavy)) in enumerate(SCENARIOS.items()):
    t0 = time.time()
    rng = np.random.default_rng([seed, si])
    est = {m: np.full((resamples, len(data["settings"]), 3), np.nan) for m in METHODS}
    diag = {m: np.full((resamples, 3), np.nan) for m in METHODS}  # ess, truncated, k
    truth = np.empty((resamples, len(data["settings"])))
    aucs, wmax, wmean, label_w = [], [], [], []
    for r in range(resamples):
      ia, ib = draw(rng, dom, ca, cb)
      dr = es.classifier_weights(feats[ia], feats[ib], seed=r)
      w = dr.weights
      aucs.append(dr.auc)
      wmax.append(w.max() / w.mean())
      wmean.append(w.mean())
      # the share of the weight on A's documents of the domains B holds (the true ratio is 0
      # on the others, so the right weights put all of it there)
      label_w.append(w[np.isin(dom[ia], list(cb))].sum() / w.sum())
      truth[r] = np.exp(nll[:, ib].sum(1) / tok[ib].sum())
      for m in METHODS:
        try:
          e = es.target_perplexity(nll[:, ia], tok[ia], w, m, n_target=len(ib))
        except es.EstimatorError:
          continue
        est[m][r] = np.stack([e.perplexity, e.pred_low, e.pred_high], -1)
        diag[m][r] = (e.ess, e.truncated_frac, np.nan if e.pareto_k is None else e.pareto_k)
    rows = {}
    for m in METHODS:
      ok = ~np.isnan(est[m][:, 0, 0])
      if not ok.any():
        continue
      rel_err = est[m][ok, :, 0] / truth[ok] - 1
      cover = (est[m][ok, :, 1] <= truth[ok]) & (truth[ok] <= est[m][ok, :, 2])
      rows[m] = {
        "resamples": int(ok.sum()),
        "bias": rel_err.mean(0).tolist(),
        "rmse": np.sqrt((rel_err**2).mean(0)).tolist(),
        "coverage": cover.mean(0).tolist(),
        "ess": float(np.nanmean(diag[m][ok, 0])),
        "truncated_frac": float(np.nanmean(diag[m][ok, 1])),
        "pareto_k_median": None
        if np.isnan(diag[m][ok, 2]).all()
        else float(np.nanmedian(diag[m][ok, 2])),
        "example": {"estimate": est[m][0, :, 0].tolist(), "measured": truth[0].tolist()},
      }
    out[name] = {
      "A": ca,
      "B": cb,
      "heavy_tailed": heavy,
      "auc_median": float(np.median(aucs)),
      "max_weight_over_mean_median": float(np.median(wmax)),
      "mean_weight_median": float(np.median(wmean)),
      "weight_share_on_B_domains_median": float(np.median(label_w)),
      "measured_median": np.median(truth, 0).tolist(),
      "methods": rows,
      "_scatter": {m: (est[m][:, :, 0], truth) for m in METHODS},
    }
    log(f"{PROG}: {name}: {resamples} resamples in {time.time() - t0:.0f}s")
  return out


def verdicts(res: dict) -> dict:
  """Item 4's targets per scenario (RMSE averaged over settings; coverage over all)."""
  out = {}
  for name, s in res.items():
    m = s["methods"]
    if "lr" not in m or "truncated" not in m:
      continue
    lr, tr = np.mean(m["lr"]["rmse"]), np.mean(m["truncated"]["rmse"])
    out[name] = {
      "rmse_lr": float(lr),
      "rmse_truncated": float(tr),
      "truncated_at_most_lr": bool(tr <= lr),
      "truncated_at_most_half_lr": bool(tr <= 0.5 * lr) if s["heavy_tailed"] else None,
      "coverage": {k: float(np.mean(v["coverage"])) for k, v in m.items()},
    }
  return out


def write(res: dict, data: dict, args, docs: str) -> None:
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
    "eval": rel(args.eval),
    "heldout": rel(args.heldout),
    "sets": args.sets,
    "documents": counts,
    "settings": settings,
    "resamples": args.resamples,
    "seed": args.seed,
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
    f"the held-out sets {args.sets} (`{rel(args.heldout)}`), per-document NLL from "
    f"`{rel(args.eval)}`; settings: {', '.join(settings)}. {args.resamples} resamples per "
    f"target, seed {args.seed}; commit {commit}. Regenerate: `python launch/shift_experiment.py "
    f"--eval {rel(args.eval)} --heldout {rel(args.heldout)} --resamples {args.resamples}`.",
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


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  p.add_argument("--eval", default=os.path.join(REPO, "runs", "budget", "eval"))
  p.add_argument("--heldout", default=os.path.join(REPO, "runs", "budget", "heldout"))
  p.add_argument("--sets", default="valid,pydoc")
  p.add_argument("--resamples", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--docs", default=os.path.join(REPO, "docs"))
  args = p.parse_args(argv)
  data = load(args.eval, args.heldout, [s.strip() for s in args.sets.split(",") if s.strip()])
  print(f"{PROG}: {len(data['texts'])} documents, settings {data['settings']}", flush=True)
  res = run(data, args.resamples, args.seed)
  write(res, data, args, args.docs)
  return 0


if __name__ == "__main__":
  sys.exit(main())
