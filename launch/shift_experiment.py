"""Quality under data shift: estimated vs measured perplexity-vs-sparsity on other mixes.

    python launch/shift_experiment.py --workdir runs/quality/router_informed_0.4
    python launch/shift_experiment.py --report-only      # redo docs/shift.{json,md,png}

What it does (each step one subprocess; outputs under --runs, default runs/shift):
  1. Passages. Held-out documents of three domains, cut into passages of about
     --passage-words words (~1.3 tokens per word): Shakespeare and news from the
     config's validation split (never trained on), Wikipedia articles from
     assets/text/wiki/enwiki_articles.jsonl (a domain never trained on).
     Passages are dealt alternately into two disjoint pools: A, the calibration
     set, subsampled to the calibration mix --calib-mix (default shakespeare
     0.45, news 0.45, wiki 0.10, by passage count), and B, the check set (the
     remaining passages, at most --max-check-passages per domain).
  2. `python -m ir_jax.eval` on A with every --target-mix and every estimator:
     the estimated curves (informed routing at --sparsity, plus dense).
  3. `python -m ir_jax.eval` on B: per-domain mean NLL and tokens per passage of
     every setting. The measured target-mix perplexity is
     exp(sum_d p_d NLL_d / sum_d p_d tokens_d), the value an evaluation of a
     target-mix sample of B converges to (no sampling noise from drawing a mix).
  4. Report: for each target mix, setting and estimator, the estimate, its
     standard error, ESS, truncated fraction and the error against B, into
     docs/shift.json and docs/shift.md (+ docs/shift.png: estimated vs measured).

Both evaluations use the same trained routers and forecasters, so estimate and
measurement differ only by which passages were scored (A vs B) and by what
the estimator does with the weights (truncation bias, variance).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import time

import numpy as np

from ir_jax import plotting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "shift_experiment"
WIKI = os.path.join(REPO, "assets", "text", "wiki", "enwiki_articles.jsonl")
DEFAULT_MIXES = (
  "shakespeare=1,news=1,wiki=1",
  "news=0.7,shakespeare=0.2,wiki=0.1",
  "wiki=0.5,news=0.25,shakespeare=0.25",
  "wiki=0.9,news=0.05,shakespeare=0.05",
  "wiki=1",
  "shakespeare=1",
)
METHODS = "lr,self_normalized,truncated,psis"


def rel(p: str) -> str:
  r = os.path.relpath(p, REPO)
  return p if r.startswith("..") else r


def passages(text: str, words: int) -> list[str]:
  """Consecutive passages of `words` words (the last one kept if at least half as long)."""
  ws = text.split()
  out = [" ".join(ws[i : i + words]) for i in range(0, len(ws), words)]
  if len(out) > 1 and len(out[-1].split()) < words // 2:
    out.pop()
  return out


def build_pools(
  config: str,
  runs: str,
  words: int,
  calib_mix: dict[str, float],
  max_wiki_articles: int,
  max_check: int,
  seed: int,
) -> dict:
  sys.path.insert(0, REPO)
  from ir_jax.config_file import load_config
  from ir_jax.data.config import from_config
  from ir_jax.eval.__main__ import _split_docs

  dcfg = from_config(load_config(config))
  by_domain: dict[str, list[str]] = {}
  for text, domain, _ in _split_docs(dcfg, dcfg.eval_split):
    by_domain.setdefault(domain, []).extend(passages(text, words))
  with open(WIKI, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if i >= max_wiki_articles:
        break
      by_domain.setdefault("wiki", []).extend(passages(json.loads(line)["text"], words))
  missing = sorted(set(calib_mix) - set(by_domain))
  if missing:
    raise SystemExit(
      f"{PROG}: error: --calib-mix names domains {missing}; the passages have {sorted(by_domain)}"
    )
  rng = random.Random(seed)
  pool_a, pool_b = {}, {}
  for d, ps in sorted(by_domain.items()):
    pool_a[d], pool_b[d] = ps[0::2], ps[1::2]
  # A at the calibration mix: the largest pool sizes with those proportions.
  total = sum(calib_mix.values())
  share = {d: w / total for d, w in calib_mix.items() if w > 0}
  n_a = min(int(len(pool_a[d]) / s) for d, s in share.items())
  for d in list(pool_a):
    k = int(round(share.get(d, 0.0) * n_a))
    rng.shuffle(pool_a[d])
    pool_b[d] += pool_a[d][k:]  # passages A does not use go to the check set
    pool_a[d] = pool_a[d][:k]
    rng.shuffle(pool_b[d])
    pool_b[d] = pool_b[d][:max_check]
  paths = {}
  for name, pool in (("A", pool_a), ("B", pool_b)):
    path = os.path.join(runs, f"pool_{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for d, ps in sorted(pool.items()):
        for p in ps:
          f.write(json.dumps({"text": p, "domain": d}) + "\n")
    paths[name] = path
  return {
    "paths": paths,
    "counts": {n: {d: len(v) for d, v in p.items()} for n, p in (("A", pool_a), ("B", pool_b))},
  }


def run_eval(args, data: str, out: str, extra: list[str]) -> None:
  cmd = [
    sys.executable,
    "-m",
    "ir_jax.eval",
    "--config",
    args.config,
    "--workdir",
    args.workdir,
    "--data",
    data,
    "--policy",
    args.policy,
    "--sparsity",
    args.sparsity,
    "--seq-len",
    str(args.seq_len),
    "--json",
    out,
    "--no-plot",
    *extra,
  ]
  log = out + ".log"
  print(f"{PROG}: {' '.join(rel(c) if os.path.isabs(c) else c for c in cmd[1:])}", flush=True)
  t0 = time.time()
  with open(log, "w", encoding="utf-8") as f:
    r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
  if r.returncode:
    raise SystemExit(f"{PROG}: error: the evaluation failed (exit {r.returncode}); see {log}")
  print(f"  done in {time.time() - t0:.0f}s", flush=True)


def measured(result: dict, mix: dict[str, float]) -> dict[tuple, float]:
  """Target-mix perplexity of every setting from the check set's per-domain means."""
  docs = result["documents"]
  total = sum(mix.values())
  out = {}
  for r in result["records"]:
    num = den = 0.0
    for d, w in mix.items():
      idx = [i for i, x in enumerate(docs) if x["domain"] == d]
      if w > 0 and not idx:
        raise SystemExit(f"{PROG}: error: the check set has no {d!r} passages")
      if w > 0:
        num += w / total * sum(r["doc_nll"][i] for i in idx) / len(idx)
        den += w / total * sum(docs[i]["tokens"] for i in idx) / len(idx)
    out[(r["mode"], r["policy"], r["sparsity"])] = math.exp(num / den)
  return out


def report(args) -> None:
  with open(os.path.join(args.runs, "A.json"), encoding="utf-8") as f:
    a = json.load(f)
  with open(os.path.join(args.runs, "B.json"), encoding="utf-8") as f:
    b = json.load(f)
  with open(os.path.join(args.runs, "plan.json"), encoding="utf-8") as f:
    plan = json.load(f)
  from ir_jax.eval.shift import parse_mix

  rows = []
  for e in a["shift"]["estimates"]:
    truth = measured(b, parse_mix(e["target_mix"]))[(e["mode"], e["policy"], e["sparsity"])]
    rows.append(
      {
        **e,
        "measured": truth,
        "error": e["perplexity"] - truth,
        "rel_error": e["perplexity"] / truth - 1,
      }
    )
  calib_measured = {(r["mode"], r["policy"], r["sparsity"]): r["perplexity"] for r in a["records"]}
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
  ).stdout.strip()
  out = {
    "format": "ir_jax.shift_experiment/1",
    "commit": commit,
    "plan": plan,
    "date": datetime.date.today().isoformat(),
    "calibration_mix": a["shift"]["calibration_mix"],
    "rows": rows,
  }
  with open(os.path.join(args.docs, "shift.json"), "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  mixes = list(dict.fromkeys(r["target_mix"] for r in rows))
  settings = list(dict.fromkeys((r["mode"], r["policy"], r["sparsity"]) for r in rows))
  lines = [
    "| target mix | setting | measured on B | " + " | ".join(methods) + " |",
    "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |",
  ]
  for mix in mixes:
    for st in settings:
      cells = []
      truth = None
      for m in methods:
        found = [
          r
          for r in rows
          if r["target_mix"] == mix
          and r["method"] == m
          and (r["mode"], r["policy"], r["sparsity"]) == st
        ]
        if not found:
          why = next(
            (
              k["reason"]
              for k in a["shift"].get("skipped", [])
              if k["target_mix"] == mix and k["method"] == m
            ),
            "",
          )
          cells.append(f"n/a ({why.split(';')[0]})")
          continue
        r = found[0]
        truth = r["measured"]
        cells.append(
          f"{r['perplexity']:.2f} ± {r['perplexity_se']:.2f} ({r['rel_error']:+.1%}"
          + (f", {r['truncated_frac']:.0%} cut" if r["truncated_frac"] else "")
          + ")"
        )
      truth = measured(b, parse_mix(mix))[st]
      name = "dense" if st[1] == "dense" else f"{st[1]} {st[2]:.2f}"
      lines.append(f"| {mix} | {name} | {truth:.2f} | " + " | ".join(cells) + " |")
  err = [
    "| estimator | mean abs rel. error | max abs rel. error | mean ESS | rows with truncation |",
    "| --- | --- | --- | --- | --- |",
  ]
  for m in methods:
    rs = [r for r in rows if r["method"] == m]
    e = np.abs([r["rel_error"] for r in rs])
    err.append(
      f"| {m} | {e.mean():.1%} | {e.max():.1%} | {np.mean([r['ess'] for r in rs]):.1f} "
      f"| {sum(r['truncated_frac'] > 0 for r in rs)} / {len(rs)} |"
    )
  cm = ", ".join(f"{d} {p:.2f}" for d, p in sorted(a["shift"]["calibration_mix"].items()))
  md = [
    f"Calibration set A: {a['shift']['documents']} passages, mix {cm}; check set B: "
    f"{len(b['documents'])} passages ({', '.join(f'{d} {n}' for d, n in sorted(b['domains'].items()))}). "
    f"Model: `{rel(plan['workdir'])}`; rows of {plan['seq_len']} tokens; commit {commit}.",
    "",
    "Estimated target-mix perplexity ± standard error (relative error vs B; share of "
    "weights truncated):",
    "",
    *lines,
    "",
    "Error of each estimator over all rows above:",
    "",
    *err,
    "",
    "Calibration-mix perplexity measured on A, for reference: "
    + ", ".join(
      f"{'dense' if k[1] == 'dense' else f'{k[1]} {k[2]:.2f}'} {v:.2f}"
      for k, v in calib_measured.items()
    )
    + ".",
    "",
  ]
  with open(os.path.join(args.docs, "shift.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(md))
  print("\n".join(md))
  try:
    _plot(rows, b, os.path.join(args.docs, "shift.png"))
  except ImportError:
    pass


def _plot(rows: list[dict], b: dict, path: str) -> None:
  plt = plotting.pyplot()

  mixes = list(dict.fromkeys(r["target_mix"] for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  fig, axes = plt.subplots(1, len(mixes), figsize=(4.2 * len(mixes), 3.8), squeeze=False)
  for ax, mix in zip(axes[0], mixes):
    rs = [r for r in rows if r["target_mix"] == mix and r["policy"] != "dense"]
    first = sorted({(r["realized_sparsity"], r["measured"]) for r in rs})
    ax.plot(*zip(*first), "k-o", label="measured (B)")
    for k, m in enumerate(methods):
      pts = sorted((r["realized_sparsity"], r["perplexity"]) for r in rs if r["method"] == m)
      ax.plot(*zip(*pts), linestyle="--", marker="x", color=f"C{k}", label=m)
    ax.set_title(mix, fontsize=8)
    ax.set_xlabel("realized sparsity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("perplexity (informed routing)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  plotting.save(fig, path, dpi=110)


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[2:]),
  )
  p.add_argument(
    "--workdir",
    default=os.path.join(REPO, "runs", "quality", "router_informed_0.4"),
    help="trained ir_jax.train workdir (forecasters + routers)",
  )
  p.add_argument("--config", default=os.path.join(REPO, "configs", "smollm2_135m.py"))
  p.add_argument("--runs", default=os.path.join(REPO, "runs", "shift"))
  p.add_argument("--docs", default=os.path.join(REPO, "docs"))
  p.add_argument("--policy", default="informed,dense")
  p.add_argument("--sparsity", default="0.25,0.4,0.7")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--passage-words", type=int, default=100)
  p.add_argument("--calib-mix", default="shakespeare=0.45,news=0.45,wiki=0.10")
  p.add_argument(
    "--target-mix",
    action="append",
    default=None,
    help=f"repeatable (default: {'; '.join(DEFAULT_MIXES)})",
  )
  p.add_argument("--estimator", default=METHODS)
  p.add_argument("--max-wiki-articles", type=int, default=12)
  p.add_argument(
    "--max-check-passages",
    type=int,
    default=30,
    help="passages per domain in the check set B (default 30)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--report-only", action="store_true")
  args = p.parse_args()
  args.workdir = os.path.abspath(args.workdir)
  args.config = os.path.abspath(args.config)
  mixes = args.target_mix or list(DEFAULT_MIXES)
  os.makedirs(args.runs, exist_ok=True)
  if not args.report_only:
    sys.path.insert(0, REPO)
    from ir_jax.eval.shift import parse_mix

    calib = parse_mix(args.calib_mix)
    pools = build_pools(
      args.config,
      args.runs,
      args.passage_words,
      calib,
      args.max_wiki_articles,
      args.max_check_passages,
      args.seed,
    )
    plan = {
      k: getattr(args, k)
      for k in (
        "workdir",
        "config",
        "policy",
        "sparsity",
        "seq_len",
        "passage_words",
        "calib_mix",
        "estimator",
        "max_wiki_articles",
        "max_check_passages",
        "seed",
      )
    }
    plan.update(target_mixes=mixes, pools=pools["counts"])
    with open(os.path.join(args.runs, "plan.json"), "w", encoding="utf-8") as f:
      json.dump(plan, f, indent=1)
    print(f"{PROG}: pools {pools['counts']}", flush=True)
    extra = ["--estimator", args.estimator]
    for m in mixes:
      extra += ["--target-mix", m]
    run_eval(args, pools["paths"]["A"], os.path.join(args.runs, "A.json"), extra)
    run_eval(args, pools["paths"]["B"], os.path.join(args.runs, "B.json"), [])
  report(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
