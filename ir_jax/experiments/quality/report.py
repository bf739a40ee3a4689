"""The report of launch/quality_table.py: results.json from a run's files, then results.md/.png.

`collect` reads only JSON files under RUNS (plan, train summaries, held-out
manifests, eval JSONs); `write_report` rebuilds the page and plot from
results.json alone, keeping the hand-written sections beside it.
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Any

from ir_jax import plotting
from ir_jax.experiments.quality.common import (
  PLAN_FORMAT,
  PROG,
  RESULTS_FORMAT,
  git_info,
  read_json,
  rel,
)
from ir_jax.experiments.quality.options import Options
from ir_jax.experiments.quality.plan import (
  arms,
  eval_jobs,
  eval_path,
  heldout_paths,
  show,
  steps,
  train_complete,
)

# Label order in tables and plots; greedy+lora is the greedy arm after a LoRA stage.
LABELS = ("dense", "informed", "informed+lora", "greedy", "greedy+lora", "random", "oracle")
SET_TITLES = {
  "valid": "validation split (training domains, unseen documents)",
  "wiki": "Wikipedia (a domain not trained on)",
}


def collect(runs: str) -> dict[str, Any]:
  """results.json content from the JSON files under RUNS only (plan, train summaries,
  held-out manifests, eval JSONs); missing pieces are left out."""
  plan = read_json(os.path.join(runs, "plan.json"))
  if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
    raise SystemExit(f"{PROG}: error: {rel(runs)}/plan.json is missing; nothing to collect")
  o = dict(plan["options"])
  opts = Options(**{**o, "sparsities": tuple(o["sparsities"]), "policies": tuple(o["policies"])})
  arm_info: dict[str, Any] = {}
  for a in arms(opts):
    wd = os.path.join(runs, a.name)
    summ = read_json(os.path.join(wd, "train_summary.json"))
    done = train_complete(wd, a.steps)
    stages = {s["stage"]: s.get("train_s") for s in (summ or {}).get("stages", [])} if done else {}
    cfg = (read_json(os.path.join(wd, "run.json")) or {}).get("config") or {}
    rows = {}  # batch rows x tokens per row of each stage, as the run was configured
    for st in a.stages:
      stage_cfg, dc = cfg.get("train", {}).get(st, {}), cfg.get("data", {})
      if dc:
        rows[st] = [
          stage_cfg.get("batch_size") or dc.get("batch_size"),
          stage_cfg.get("seq_len") or dc.get("seq_len"),
        ]
    arm_info[a.name] = {
      "workdir": rel(wd),
      "stages": list(a.stages),
      "steps": a.steps,
      "batch": rows,
      "builds_on": a.builds_on,
      "policy": a.policy or None,
      "sparsity": a.sparsity if a.policy else None,
      "complete": done,
      "train_s": round(sum(v or 0.0 for v in stages.values()), 3) if done else None,
      "stage_train_s": stages,
    }

  def arm_s(name: str) -> float | None:
    return arm_info.get(name, {}).get("train_s")

  sets = {}
  for es in ("valid", "wiki"):
    m = read_json(heldout_paths(opts, es)[1]) or {}
    sets[es] = {
      "title": SET_TITLES[es],
      "source": m.get("source"),
      "data": rel(heldout_paths(opts, es)[0]),
      "documents": m.get("documents"),
      "tokens": m.get("tokens"),
      "domains": m.get("domains"),
      "doc_tokens": m.get("doc_tokens"),
      "max_tokens": m.get("max_tokens"),
      "max_documents": m.get("max_documents"),
    }
  records = []
  for job in eval_jobs(opts):
    res = read_json(eval_path(opts, job))
    if not isinstance(res, dict):
      continue
    domains = [d["domain"] for d in res.get("documents", [])]
    for r in res.get("records", []):
      if r["policy"] not in job.policies:
        continue
      label = job.label[r["policy"]]
      # Training time behind the row: its arm plus the arm it needs (see the docstring).
      fc = arm_s("forecaster")
      if label == "dense":
        parts = {}
      elif label in ("random", "oracle"):
        parts = {"forecasters": fc}
      elif label == "informed":
        parts = {"routers": arm_s(job.arm), "forecasters": fc}
      elif label == "greedy":
        parts = {"routers": arm_s(job.arm)}
      elif label == "informed+lora":
        parts = {
          "lora": arm_s(job.arm),
          "routers": arm_s(arm_info[job.arm]["builds_on"]),
          "forecasters": fc,
        }
      else:
        parts = {"lora": arm_s(job.arm), "routers": arm_s(arm_info[job.arm]["builds_on"])}
      total = None if any(v is None for v in parts.values()) else sum(parts.values())
      sums: dict[str, list[float]] = {}  # domain -> [NLL sum, scored tokens]
      for d, nll, doc in zip(domains, r.get("doc_nll", []), res.get("documents", [])):
        acc = sums.setdefault(d, [0.0, 0])
        acc[0] += nll
        acc[1] += doc["tokens"]
      by_dom = {
        d: {"tokens": n, "perplexity": math.exp(v / n) if n else None} for d, (v, n) in sums.items()
      }
      records.append(
        {
          "eval_set": job.eval_set,
          "arm": job.arm,
          "label": label,
          "mode": r["mode"],
          "policy": r["policy"],
          "sparsity": r["sparsity"],
          "perplexity": r["perplexity"],
          "nll": r["nll"],
          "tokens": r["tokens"],
          "realized_sparsity": r["realized_sparsity"],
          "sparsity_attn": r.get("sparsity_attn"),
          "sparsity_mlp": r.get("sparsity_mlp"),
          "flops_fraction": r.get("flops_fraction"),
          "ideal_flops_fraction": r.get("ideal_flops_fraction"),
          "eval_wall_s": r.get("wall_s"),
          "train_s": total,
          "train_s_parts": parts,
          "by_domain": by_dom,
          "source": rel(eval_path(opts, job)),
        }
      )
  invocations = plan.get("invocations", [])
  runs_cmds = [
    i["command"]
    for i in invocations
    if "--report-only" not in i["command"] and "--dry-run" not in i["command"]
  ]
  return {
    "format": RESULTS_FORMAT,
    "created": datetime.datetime.now().isoformat(timespec="seconds"),
    "git": {**git_info(), "run_started_at": (invocations[0]["git"] if invocations else None)},
    "options": {
      **o,
      "runs": rel(o["runs"]),
      "docs": rel(o["docs"]),
      "config": rel(o["config"]),
      "wiki": rel(o["wiki"]),
    },
    "eval_sets": sets,
    "arms": arm_info,
    "commands": {
      "driver": runs_cmds[-1] if runs_cmds else None,
      "driver_invocations": runs_cmds,
      "steps": [
        {
          "step": s.name,
          "command": show(s.argv),
          "log": rel(os.path.join(runs, "logs", f"{s.name}.log")),
        }
        for s in steps(opts)
      ],
    },
    "records": records,
  }


# ------------------------------------------------------------------ the page and plot
def _fmt_min(s: float | None) -> str:
  return "–" if s is None else f"{s / 60:.1f} min"


def _row_key(r: dict[str, Any]) -> tuple:
  return (r["sparsity"], r["mode"] != "topk", LABELS.index(r["label"]))


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per (label, sparsity, mode) with each eval set's record."""
  rows: dict[tuple, dict[str, Any]] = {}
  for r in results["records"]:
    key = (r["label"], r["sparsity"], r["mode"])
    row = rows.setdefault(
      key, {"label": r["label"], "sparsity": r["sparsity"], "mode": r["mode"], "sets": {}}
    )
    row["sets"][r["eval_set"]] = r
  return sorted(rows.values(), key=_row_key)


def markdown_table(results: dict[str, Any]) -> str:
  sets = list(results["eval_sets"])
  dense = {r["eval_set"]: r["perplexity"] for r in results["records"] if r["label"] == "dense"}
  causal = any(r["mode"] == "causal" for r in results["records"])
  head = (
    ["policy", "sparsity"]
    + (["mode"] if causal else [])
    + [f"perplexity {s} (× dense)" for s in sets]
    + [f"realized sparsity ({' / '.join(sets)})", "FLOPs fraction", "training time"]
  )
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in table_rows(results):
    recs = [row["sets"].get(s) for s in sets]
    any_rec = next(r for r in recs if r is not None)
    ppl = []
    for s, r in zip(sets, recs):
      if r is None:
        ppl.append("–")
      elif row["label"] == "dense" or s not in dense:
        ppl.append(f"{r['perplexity']:.2f}")
      else:
        ppl.append(f"{r['perplexity']:.2f} ({r['perplexity'] / dense[s]:.2f}×)")
    real = " / ".join("–" if r is None else f"{r['realized_sparsity']:.3f}" for r in recs)
    parts = {k: v for k, v in any_rec["train_s_parts"].items()}
    if not parts:
      ttime = "0 (no training)"
    elif len(parts) == 1:
      ((k, v),) = parts.items()
      ttime = f"{_fmt_min(v)} ({k})"
    else:
      ttime = (
        f"{_fmt_min(any_rec['train_s'])} ("
        + " + ".join(f"{k} {_fmt_min(v)}" for k, v in parts.items())
        + ")"
      )
    cells = (
      [row["label"], f"{row['sparsity']:g}"]
      + ([row["mode"]] if causal else [])
      + ppl
      + [
        real,
        f"{any_rec['flops_fraction']:.3f}" if any_rec.get("flops_fraction") is not None else "–",
        ttime,
      ]
    )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> str:
  """Perplexity vs target sparsity, one line per policy (and mode), one panel per eval set."""
  plt = plotting.pyplot()
  from matplotlib.ticker import FuncFormatter

  sets = list(results["eval_sets"])
  recs = results["records"]
  fig, axes = plt.subplots(1, len(sets), figsize=(5.8 * len(sets), 4.4), squeeze=False)
  for ax, es in zip(axes[0], sets):
    rs = [r for r in recs if r["eval_set"] == es]
    dense = next((r["perplexity"] for r in rs if r["label"] == "dense"), None)
    for i, label in enumerate(LABELS[1:]):
      for mode, style in (("topk", "-"), ("causal", "--")):
        pts = sorted(
          (r["sparsity"], r["perplexity"]) for r in rs if r["label"] == label and r["mode"] == mode
        )
        if not pts:
          continue
        if dense is not None:
          pts = [(0.0, dense)] + pts
        ax.plot(
          *zip(*pts),
          style,
          marker="o",
          color=f"C{i}",
          label=label + ("" if mode == "topk" else " (causal)"),
        )
    if dense is not None:
      ax.axhline(dense, color="gray", linestyle=":", linewidth=1, label=f"dense {dense:.3g}")
    info = results["eval_sets"][es]
    ax.set_title(
      f"{info.get('title', es)}\n{info.get('tokens') or '?'} tokens, "
      f"{info.get('documents') or '?'} documents",
      fontsize=10,
    )
    ax.set_xlabel("target sparsity (fraction of token-unit pairs approximated)")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
      axis(FuncFormatter(lambda v, _: f"{v:.4g}"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("perplexity")
  fig.tight_layout()
  plotting.save(fig, path)
  return path


def _budget(arms_: dict[str, Any], stage: str, o: dict[str, Any]) -> str:
  """'N steps of B x T tokens' of a stage, from the first arm that trained it."""
  steps_ = {
    "forecaster": o["forecaster_steps"],
    "router": o["router_steps"],
    "lora": o["lora_steps"],
  }[stage]
  rows = next((a["batch"][stage] for a in arms_.values() if stage in a.get("batch", {})), None)
  if rows is None:
    rows = [o["router_batch"] if stage != "forecaster" else "?", o["seq_len"]]
  return f"{steps_} steps of {rows[0]} x {rows[1]} tokens"


def markdown(
  results: dict[str, Any], png: str | None, reading: str | None = None, shift: str | None = None
) -> str:
  o = results["options"]
  g = results["git"]
  arms_ = results["arms"]
  sets = results["eval_sets"]
  lines = [
    "# Quality table: informed vs greedy routing",
    "",
    f"Generated by `launch/quality_table.py` from `results.json` ({results['created']}); "
    "`python launch/quality_table.py --report-only` rebuilds this page from the JSON files "
    "without training. Every number below is read from those files.",
    "",
    "## Setup",
    "",
    f"- Model and data: `{o['config']}`"
    + (" (smoke run: tiny random model)" if o.get("smoke") else "")
    + f"; rows of {o['seq_len']} tokens.",
    f"- Training (base model frozen, seed {o['seed']} for every arm): forecasters "
    f"{_budget(arms_, 'forecaster', o)}; routers {_budget(arms_, 'router', o)} per arm "
    "(Gumbel gates), every arm from the same forecasters"
    + (f"; LoRA {_budget(arms_, 'lora', o)} after each greedy arm." if o.get("lora") else "."),
    f"- Target sparsities {', '.join(f'{s:g}' for s in o['sparsities'])}; routing mode "
    f"{' and '.join(('topk', 'causal') if o.get('causal') else ('topk',))}.",
  ]
  for name, s in sets.items():
    doms = ", ".join(
      f"{d} {v['documents']} documents / {v['tokens']} tokens"
      for d, v in (s.get("domains") or {}).items()
    )
    lines.append(
      f"- Held-out `{name}`: {s['title']}; {s.get('source')}, capped to "
      f"{s.get('tokens')} tokens in {s.get('documents')} documents (first "
      f"{s.get('doc_tokens')} tokens of each, at most {s.get('max_tokens')} per set"
      + (f", {s['max_documents']} documents" if s.get("max_documents") else "")
      + f"): {doms}."
    )
  lines += [
    f"- Git commit: `{g.get('commit')}`"
    + (" (with uncommitted changes)" if g.get("dirty") else "")
    + (
      f"; the run started at `{g['run_started_at'].get('commit')}`"
      if g.get("run_started_at") and g["run_started_at"].get("commit") != g.get("commit")
      else ""
    )
    + ".",
    "",
    "## Results",
    "",
    "Perplexity on each held-out set (in parentheses: relative to dense), realized sparsity "
    "(fraction of approximated token-unit pairs, per set), executed FLOPs relative to dense "
    "(units run + forecasters + routers) and the training time behind the row: informed "
    "rows need the forecasters and their routers; greedy rows only their routers; "
    "greedy+lora rows the greedy routers and the LoRA stage; random and oracle rows use "
    "the forecasters with no router. Training time is wall time of the training steps "
    "(`train_s` in each workdir's train_summary.json), on the machine that ran it.",
    "",
    markdown_table(results) if results["records"] else "(no evaluation results yet)",
    "",
  ]
  if png:
    lines += [f"![perplexity vs sparsity]({os.path.basename(png)})", ""]
  else:
    lines += ["(no plot: matplotlib is not installed; `pip install 'ir_jax[eval]'`)", ""]
  lines += [
    "Training runs:",
    "",
    "| arm | stages x steps | builds on | training time |",
    "|---|---|---|---|",
  ]
  for name, a in arms_.items():
    st = ", ".join(f"{k} x {v}" for k, v in a["steps"].items())
    lines.append(
      f"| {name} | {st} | {a['builds_on'] or '–'} | "
      f"{_fmt_min(a['train_s']) if a['complete'] else 'incomplete'} |"
    )
  c = results["commands"]
  lines += [
    "",
    "## Commands",
    "",
    "The driver (resumable; rerun it to continue):",
    "",
    "```bash",
    c["driver"] or "python launch/quality_table.py",
    "```",
    "",
    "What it ran, in order (logs under the runs directory's logs/):",
    "",
    "```bash",
  ]
  lines += [s["command"] for s in c["steps"]]
  lines += ["```", ""]
  if shift:
    lines += [
      "## Quality under data shift",
      "",
      "From `launch/shift_experiment.py` (its own page: `shift.md`, plot `shift.png`); "
      "estimators described in `estimators.md`.",
      "",
      shift.strip(),
      "",
      "![estimated vs measured](shift.png)",
      "",
    ]
  if reading:
    lines += ["## Reading", "", reading.strip(), ""]
    return "\n".join(lines)
  lines += [
    "## Reading",
    "",
    "**To be written from the numbers above.** This section is a placeholder: the "
    "analysis (does informed routing without LoRA match or beat greedy routing, with "
    "or without LoRA, at each sparsity, in and out of the training domains, and at "
    "what training time) is to be written by a person reading the table and the plot; "
    "nothing here was written before the numbers existed.",
    "",
  ]
  return "\n".join(lines)


def write_report(results_path: str, out_dir: str) -> list[str]:
  """results.md and results.png in `out_dir`, from results.json alone; returns the paths."""
  results = read_json(results_path)
  if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
    raise SystemExit(f"{PROG}: error: {results_path}: not a results file of this driver")
  os.makedirs(out_dir, exist_ok=True)
  png: str | None = os.path.join(out_dir, "results.png")
  try:
    plot(results, png)
  except ImportError:
    png = None
  # Hand-written parts kept across rebuilds: the reading of the numbers, and the
  # data-shift section that launch/shift_experiment.py writes.
  extra = {}
  for key, name in (("reading", "results_reading.md"), ("shift", "shift.md")):
    path = os.path.join(out_dir, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        extra[key] = f.read()
  md = os.path.join(out_dir, "results.md")
  with open(md, "w", encoding="utf-8") as f:
    f.write(markdown(results, png, **extra))
  return [md] + ([png] if png else [])
