"""Quality under data shift, checked against truth: the scenarios, the resampled trials
and their verdicts (`launch/shift_experiment.py` is the driver; `report` writes the page).

`load` reads the per-document NLL of every evaluated setting and the documents' texts;
`run` draws, per scenario and resample, disjoint pools A and B, weights A's documents by
classifier density ratios (`ir_jax.eval.density_ratio.classifier_weights`) and compares every
estimator's perplexity on B with the perplexity measured there.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from ir_jax.eval.density_ratio import classifier_weights, text_features
from ir_jax.eval.estimator_inputs import EstimatorError
from ir_jax.eval.lr_estimates import target_perplexity

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
  """Disjoint random index sets: `a[d]` and `b[d]` documents of every domain d."""
  ia, ib = [], []
  for d in sorted(set(a) | set(b)):
    idx = rng.permutation(np.flatnonzero(domains == d))
    need = a.get(d, 0) + b.get(d, 0)
    if need > len(idx):
      raise SystemExit(f"{PROG}: error: the scenario needs {need} {d!r} documents, have {len(idx)}")
    ia += list(idx[: a.get(d, 0)])
    ib += list(idx[a.get(d, 0) : need])
  return np.asarray(ia), np.asarray(ib)


def run(data: dict, resamples: int, seed: int, log=print, scenarios: dict | None = None) -> dict:
  """Every scenario (default SCENARIOS): per resample, weights, estimates and the truth;
  bias, RMSE and coverage per estimator and setting."""
  feats = text_features(data["texts"])
  nll, tok, dom = data["nll"], data["tokens"], data["domains"]
  out = {}
  for si, (name, (ca, cb, heavy)) in enumerate((scenarios or SCENARIOS).items()):
    t0 = time.time()
    rng = np.random.default_rng([seed, si])
    est = {m: np.full((resamples, len(data["settings"]), 3), np.nan) for m in METHODS}
    diag = {m: np.full((resamples, 3), np.nan) for m in METHODS}  # ess, truncated, k
    truth = np.empty((resamples, len(data["settings"])))
    aucs, wmax, wmean, label_w = [], [], [], []
    for r in range(resamples):
      ia, ib = draw(rng, dom, ca, cb)
      dr = classifier_weights(feats[ia], feats[ib], seed=r)
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
          e = target_perplexity(nll[:, ia], tok[ia], w, m, n_target=len(ib))
        except EstimatorError:
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
