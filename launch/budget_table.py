"""The quality table in executed FLOPs: SmolLM2 routed at budgets of dense compute, resumable.

    python launch/budget_table.py                       # the run (about 1.5 h on 2 quiet cores)
    python launch/budget_table.py --report-only         # rebuild the report from the JSONs
    python launch/budget_table.py --dry-run             # print the steps and commands

Every arm starts from one forecaster run (closed-form fits, the demo's recipe: its
training split mixes Shakespeare, news and Wikipedia pieces equally) and
runs the router stage with `--config.routing.flops=B` (B in --budgets): the
per-unit loss probes and `routing.allocate_flops` choose execute / forecast / route
per unit. Arms: informed (routers warm-started on log forecast error), greedy
(routers on log |Unit|^2, skipping instead of forecasting), static (no router:
units execute or are forecast, chosen by the same probes). Each arm is evaluated by
`python -m ir_jax.eval` at its budget (top-k mode) on every held-out set; the
informed arm also with the random policy (its table moved to the same budget
under random's cost, which has no router) and the oracle (informed's table; it
runs every unit to rank tokens, so its FLOPs are not its point), and at the
paper's pair sparsities 0.25 and 0.4 (the table rescaled), as is greedy. At
--lora-budget, informed+lora and greedy+lora add the LoRA stage (--lora-steps steps of
4 x 256 tokens, base model frozen) on top of that arm's run, routing with its table. At
each of --distill-budgets, informed+distill and static+distill add the distill stage
(--distill-steps steps of 4 x 256 tokens: the forecasters trained end to end on the KL
divergence from the dense model, routing with the arm's table) on top of that arm's run;
greedy has no distill arm (it skips: no forecast to train). --policies restricts the
arms of a partial run (the rest keep whatever exists), --no-bench leaves out the timing
(for a run that shares its cores: timings would measure the other work).

Held-out sets (built once with `launch/quality_table.py heldout`, round-robin
over domains, each document cut to its first 1,024 tokens (wiki: 2,048)):
  valid  the config's validation split: Shakespeare, news and Wikipedia documents
         of the fitting domains that played no part in fitting;
  wiki   the Wikipedia documents of that split alone (Wikipedia is fitted since
         the forecasters and routers draw the three domains equally: in-distribution);
  pydoc  Python's reference documentation (the stdlib's `pydoc_data` topics):
         a domain that played no part in fitting, choosing or calibrating.

Every perplexity ratio carries a 95% bootstrap interval over documents
(ir_jax.bootstrap). Each trained arm's own table is also timed
(`python -m ir_jax.bench --workdir ARM`, prefill at 2,048 tokens, dense vs routed
in one run): the speed column, FLOPs alone where a JSON is missing.
Output: RUNS/... and docs/results_flops.{json,md,png}.
A step whose output exists is skipped, so a killed run resumes when rerun.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ir_jax.bootstrap import ratio_interval  # noqa: E402
from ir_jax.files import write_json  # noqa: E402
from ir_jax.plotting import pyplot, save  # noqa: E402
from ir_jax.provenance import git_info  # noqa: E402

CONFIG = "configs/smollm2_135m.py"
# name: (source, option for build_heldout, tokens per document)
SETS = {
  "valid": ("split", [], 1024),
  "pydoc": ("pydoc", ["--domain", "pydoc"], 1024),
  "wiki": ("split", ["--only-domain", "wiki"], 2048),
}


def pydoc_source(path: Path) -> None:
  """Python's reference documentation topics (stdlib `pydoc_data`), one JSONL line each."""
  import pydoc_data.topics as topics

  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for name in sorted(topics.topics):
      text = topics.topics[name].strip()
      if len(text) > 400:  # skip stubs
        f.write(json.dumps({"text": text, "topic": name}) + "\n")


PAIRS = (0.25, 0.4)


def _run(cmd: list[str], log: Path, what: str) -> None:
  log.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  print(f"[{time.strftime('%H:%M:%S')}] {what} ...", flush=True)
  with open(log, "a", encoding="utf-8") as f:
    f.write("$ " + shlex.join(cmd) + "\n")
    f.flush()
    rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if rc:
    raise SystemExit(f"{what} failed (exit {rc}); see {log}")
  print(f"    done in {time.time() - t0:.0f}s", flush=True)


def _train_cmd(workdir: Path, extra: list[str]) -> list[str]:
  return (
    [sys.executable, "-m", "ir_jax.train", "--config", CONFIG, "--workdir", str(workdir)]
    + ["--config.train.eval_batches=0"]
    + extra
  )


def steps(a: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
  """(name, output that marks it done, command) in order."""
  runs = Path(a.runs)
  py = sys.executable
  out: list[tuple[str, Path, list[str]]] = []
  for name, (source, opts, doc_tokens) in SETS.items():
    jsonl = runs / "heldout" / f"{name}.jsonl"
    if source == "pydoc":
      source = str(runs / "heldout" / "pydoc_topics.jsonl")  # written by main() when run
    cmd = [py, "launch/quality_table.py", "heldout", "--config", CONFIG, "--source", source]
    cmd += ["--out", str(jsonl), "--max-tokens", str(a.max_tokens)]
    cmd += ["--doc-tokens", str(doc_tokens), *opts]
    out.append((f"heldout {name}", jsonl, cmd))
  fc = runs / "forecaster"
  out.append(
    (
      "forecasters",
      fc / "train_summary.json",
      _train_cmd(fc, ["--config.train.stages=forecaster"]),
    )
  )
  evals = {"informed": "dense,informed,random,oracle", "static": "dense,static"}
  for b in a.budgets:  # one budget at a time: partial results are whole rows
    for policy in [p for p in ("informed", "static", "greedy") if p in a.policies]:
      wd = runs / f"{policy}_{b:g}"
      extra = [
        "--config.train.stages=router",
        f"--config.train.init_from={fc}",
        f"--config.routing.policy={policy}",
        f"--config.routing.flops={b}",
        f"--config.train.router.allocation_batches={a.probe_batches}",
      ]
      if policy == "static":
        extra.append("--config.train.router.calibration_batches=0")
      out.append((f"train {policy} {b:g}", wd / "train_summary.json", _train_cmd(wd, extra)))
      # The speed column: this arm's own table timed, dense vs routed prefill in one run.
      bench = [py, "-m", "ir_jax.bench", "--workdir", str(wd), "--seq-lens", "2048"]
      bench += [
        "--decode-steps",
        "0",
        "--reps",
        "3",
        "--quiet",
        "--json",
        str(bench_json(runs, wd.name)),
      ]
      if a.bench:
        out.append((f"bench {policy} {b:g}", bench_json(runs, wd.name), bench))
      pairs = ",".join(str(p) for p in PAIRS) if (policy != "static" and b == a.pair_arm) else ""
      for name in SETS:
        if name != "valid":
          pairs = ""  # the paper's pair-sparsity points on the in-domain set only
        js = runs / "eval" / name / f"{policy}_{b:g}.json"
        cmd = [py, "-m", "ir_jax.eval", "--workdir", str(wd), "--data"]
        cmd += [
          str(runs / "heldout" / f"{name}.jsonl"),
          "--policy",
          evals.get(policy, "dense,greedy"),
        ]
        cmd += ["--flops", str(b), "--sparsity", pairs, "--json", str(js), "--no-plot"]
        out.append((f"eval {policy} {b:g} on {name}", js, cmd))
    if b == a.lora_budget and a.lora_steps > 0:
      out += _tuned_arms(a, b, "lora", ("informed", "greedy"), a.lora_steps, [])
    if b in a.distill_budgets and a.distill_steps > 0:
      lr = [f"--config.train.distill.learning_rate={a.distill_lr}"]
      out += _tuned_arms(a, b, "distill", ("informed", "static"), a.distill_steps, lr)
  return out


def bench_json(runs: Path, arm: str) -> Path:
  return runs / "bench" / f"{arm}.json"


def speed_for(runs: Path, arm: str, policy: str) -> dict:
  """The measured prefill speedup of an arm's own table (its `ir_jax.bench --workdir`
  JSON), for the arm's own policy only (random and oracle rows route differently)."""
  js = bench_json(runs, arm)
  if not js.is_file() or not arm.startswith(policy + "_"):
    return {}
  speed = json.loads(js.read_text()).get("speed", {})
  return {
    "prefill_speedup_2048": speed.get("prefill_2048"),
    "prefill_ideal_2048": speed.get("prefill_2048_ideal"),
  }


def _tuned_arms(
  a: argparse.Namespace,
  b: float,
  stage: str,
  policies: tuple[str, ...],
  n_steps: int,
  extra_cfg: list[str],
) -> list[tuple[str, Path, list[str]]]:
  """POLICY+STAGE arms at budget b (stage lora or distill): the stage on top of each
  arm's run (its forecasters, routers and table), routing as deployed, then evaluated
  like the arm."""
  runs = Path(a.runs)
  py = sys.executable
  out: list[tuple[str, Path, list[str]]] = []
  for policy in [p for p in policies if p in a.policies]:
    wd = runs / f"{policy}+{stage}_{b:g}"
    extra = [
      f"--config.train.stages={stage}",
      f"--config.train.init_from={runs / f'{policy}_{b:g}'}",
      f"--config.routing.policy={policy}",
      f"--config.routing.flops={b}",
      f"--config.train.{stage}.steps={n_steps}",
      "--config.train.checkpoint_every=10",
      *extra_cfg,
    ]
    name = f"{policy}+{stage} {b:g}"
    out.append((f"train {name}", wd / "train_summary.json", _train_cmd(wd, extra)))
    for set_name in SETS:
      js = runs / "eval" / set_name / f"{policy}+{stage}_{b:g}.json"
      cmd = [py, "-m", "ir_jax.eval", "--workdir", str(wd), "--data"]
      cmd += [str(runs / "heldout" / f"{set_name}.jsonl"), "--policy", f"dense,{policy}"]
      cmd += ["--flops", str(b), "--sparsity", "", "--json", str(js), "--no-plot"]
      out.append((f"eval {name} on {set_name}", js, cmd))
  return out


def report(a: argparse.Namespace) -> None:
  """docs/results_flops.{json,md,png} from the eval JSONs present."""
  runs = Path(a.runs)
  rows = []
  # The checkout the runs were made in (a pinned worktree), else this one.
  commit = git_info(str(runs.resolve())) if runs.is_dir() else {}
  if not commit.get("commit"):
    commit = git_info(str(ROOT))
  for name in SETS:
    for js in sorted((runs / "eval" / name).glob("*.json")):
      arm = js.stem
      res = json.loads(js.read_text())
      dense = next(r for r in res["records"] if r["policy"] == "dense")
      for r in res["records"]:
        if r["policy"] == "dense" and not arm.startswith("informed"):
          continue  # dense once per set
        tuned = arm.split("_")[0].partition("+")[2]  # lora / distill arms
        if tuned and r["policy"] != "dense":
          r = dict(r, policy=f"{r['policy']}+{tuned}")
        budget = r.get("flops_budget") or 0.0
        rows.append(
          {
            "arm": arm,
            "policy": r["policy"],
            "budget_kind": "flops" if budget else ("pairs" if r["policy"] != "dense" else "none"),
            "budget": budget or r["sparsity"],
            "eval_set": name,
            "perplexity": r["perplexity"],
            "dense_perplexity": dense["perplexity"],
            "ratio": r.get("ratio"),
            "ci_low": r.get("ci_low"),
            "ci_high": r.get("ci_high"),
            "flops_fraction": r["flops_fraction"],
            "realized_sparsity": r["realized_sparsity"],
            "tokens": r["tokens"],
            "documents": len(res["documents"]),
            "commit": commit.get("commit", "?") + ("+dirty" if commit.get("dirty") else ""),
            **speed_for(runs, arm, r["policy"]),
          }
        )
  seen, uniq = set(), []
  for r in rows:  # the dense row of each set once
    key = (r["policy"], r["budget_kind"], r["budget"], r["eval_set"])
    if key not in seen:
      seen.add(key)
      uniq.append(r)
  rows = uniq
  docs = ROOT / "docs"
  if getattr(a, "keep_rows", True):
    rows = kept_rows(docs / "results_flops.json", rows) + rows
  paired = paired_rows(runs)
  write_json(
    str(docs / "results_flops.json"),
    {"generated_by": "launch/budget_table.py", "commit": commit, "rows": rows, "paired": paired},
    indent=1,
  )
  # The same rows in docs/results.json (launch/quality_table.py keeps this key).
  main_json = docs / "results.json"
  merged = json.loads(main_json.read_text()) if main_json.is_file() else {}
  merged["flops_records"] = rows
  write_json(str(main_json), merged, indent=1)
  _plot(rows, docs / "results_flops.png")
  _markdown(rows, commit, docs / "results_flops.md", a, paired)
  print(f"wrote docs/results_flops.json, .md, .png ({len(rows)} rows)")


def paired_rows(runs: Path) -> list[dict]:
  """Each tuned arm (POLICY+STAGE_B: lora, distill) against the arm it builds on
  (POLICY_B), on the same documents of each held-out set: the perplexity ratio tuned /
  base with a paired 95% bootstrap interval over documents (both resampled together)."""
  out = []
  for name in SETS:
    for js in sorted((runs / "eval" / name).glob("*+*.json")):
      arm = js.stem
      head, _, budget = arm.rpartition("_")
      policy, _, stage = head.partition("+")
      base_js = js.parent / f"{policy}_{budget}.json"
      if not base_js.is_file():
        continue
      tuned, base = json.loads(js.read_text()), json.loads(base_js.read_text())
      if [d["source"] for d in tuned["documents"]] != [d["source"] for d in base["documents"]]:
        raise SystemExit(f"{js} and {base_js} scored different documents; rerun both")
      rec = lambda res: next(  # noqa: E731  (the row at this FLOPs budget, not a pairs row)
        r
        for r in res["records"]
        if r["policy"] == policy and (r.get("flops_budget") or 0.0) == float(budget)
      )
      t, b = rec(tuned), rec(base)
      tokens = [d["tokens"] for d in tuned["documents"]]
      ratio, lo, hi = ratio_interval(t["doc_nll"], b["doc_nll"], tokens)
      out.append(
        {
          "eval_set": name,
          "tuned": f"{policy}+{stage}",
          "base": policy,
          "budget": float(budget),
          "ratio": ratio,
          "ci_low": lo,
          "ci_high": hi,
          "documents": len(tokens),
        }
      )
  return out


def kept_rows(path: Path, rows: list[dict]) -> list[dict]:
  """The rows of an earlier report (`path`) that `rows` do not measure again: a partial
  run (--policies, --budgets) updates the table instead of dropping what it did not
  rerun. Each row keeps the commit it ran at."""
  if not path.is_file():
    return []
  key = lambda r: (r["policy"], r["budget_kind"], r["budget"], r["eval_set"])  # noqa: E731
  new = {key(r) for r in rows}
  return [r for r in json.loads(path.read_text())["rows"] if key(r) not in new]


def _plot(rows: list[dict], path: Path) -> None:
  plt = pyplot()
  sets = list(SETS)
  fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
  for ax, name in zip(axes[0], sets):
    for policy in (
      "informed",
      "greedy",
      "random",
      "oracle",
      "static",
      "informed+lora",
      "greedy+lora",
      "informed+distill",
      "static+distill",
    ):
      pts = sorted(
        (r["flops_fraction"], r["ratio"], r["ci_low"], r["ci_high"])
        for r in rows
        if r["eval_set"] == name and r["policy"] == policy and r["budget_kind"] == "flops"
      )
      if pts:
        x, y, lo, hi = map(list, zip(*pts))
        ax.errorbar(
          x, y, yerr=[[v - l for v, l in zip(y, lo)], [h - v for v, h in zip(y, hi)]],
          marker="o", capsize=3, label=policy,
        )  # fmt: skip
    pair = [r for r in rows if r["eval_set"] == name and r["budget_kind"] == "pairs"]
    for r in pair:
      ax.plot(r["flops_fraction"], r["ratio"], "x", color="k")
      ax.annotate(f"{r['policy']} s={r['budget']:g}", (r["flops_fraction"], r["ratio"]), fontsize=7)
    ax.set_yscale("log")
    ax.set(
      title=f"{name} (lower is better)",
      xlabel="executed FLOPs / dense",
      ylabel="perplexity x dense",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  save(fig, str(path))


def _markdown(
  rows: list[dict], commit: dict, path: Path, a: argparse.Namespace, paired: list[dict] = ()
) -> None:
  lines = [
    "# Quality at matched compute: SmolLM2-135M at executed-FLOPs budgets",
    "",
    "Generated by `python launch/budget_table.py` (`--report-only` rebuilds this page "
    "from the eval JSONs, keeping the rows of earlier runs that were not rerun); every "
    "number below is read from `results_flops.json`. Rows by the commit they ran at: "
    + ", ".join(
      f"`{c[:7]}` {sum(r['commit'] == c for r in rows)}"
      for c in dict.fromkeys(r["commit"] for r in rows)
    )
    + ".",
    "",
    "Perplexity x dense with a 95% bootstrap interval over documents; executed FLOPs "
    "are per `ir_jax.routing.flops` (forecasters and routers included, causal attention). "
    "Budgets are top-k mode; `pairs` rows are the paper's pair sparsity (the table rescaled).",
    "",
  ]
  for name in SETS:
    sub = [r for r in rows if r["eval_set"] == name]
    if not sub:
      continue
    d = sub[0]["dense_perplexity"]
    lines += [
      f"## {name} (dense perplexity {d:.2f}, {sub[0]['tokens']} tokens, "
      f"{sub[0]['documents']} documents)",
      "",
      "| policy | budget | executed FLOPs | perplexity | x dense (95% CI) | realized sparsity "
      "| prefill speedup at 2,048 tokens (ideal) | commit |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(sub, key=lambda r: (r["budget_kind"], -r["budget"], r["policy"])):
      if r["policy"] == "dense":
        continue
      b = f"{r['budget']:g} of FLOPs" if r["budget_kind"] == "flops" else f"pairs {r['budget']:g}"
      ci = f"{r['ratio']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})"
      sp = r.get("prefill_speedup_2048")
      speed = f"{sp:.2f}x ({r['prefill_ideal_2048']:.2f}x)" if sp else "-"
      lines.append(
        f"| {r['policy']} | {b} | {r['flops_fraction']:.3f} | {r['perplexity']:.2f} | {ci} | "
        f"{r['realized_sparsity']:.3f} | {speed} | {r['commit'][:7]} |"
      )
    lines.append("")
  if paired:
    lines += [
      "## Tuned arms against the arm they build on (paired, same documents)",
      "",
      "Perplexity of the tuned arm over its base arm's, both routed at the same budget on "
      "the same documents; 95% paired bootstrap interval over documents (below 1: the "
      "tuning helps).",
      "",
      "| set | tuned | base | budget | ratio (95% CI) | documents |",
      "|---|---|---|---|---|---|",
    ]
    for p in paired:
      lines.append(
        f"| {p['eval_set']} | {p['tuned']} | {p['base']} | {p['budget']:g} of FLOPs | "
        f"{p['ratio']:.3f} ({p['ci_low']:.3f}-{p['ci_high']:.3f}) | {p['documents']} |"
      )
    lines.append("")
  lines += ["![perplexity x dense against executed FLOPs](results_flops.png)", ""]
  reading = path.parent / "results_flops_reading.md"
  if reading.is_file():  # hand-written: what the numbers say, kept beside the generated page
    lines += [
      "## Reading (hand-written in `results_flops_reading.md`, not generated)",
      "",
      reading.read_text(encoding="utf-8").strip(),
      "",
    ]
  path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python launch/budget_table.py", description=__doc__.split("\n")[0]
  )
  p.add_argument("--runs", default="runs/budget")
  p.add_argument("--budgets", default="0.8,0.9,0.7", help="in the order run")
  p.add_argument("--max-tokens", type=int, default=16384, help="tokens per held-out set")
  p.add_argument("--probe-batches", type=int, default=2, help="batches of the loss probes")
  p.add_argument("--pair-arm", type=float, default=0.8, help="arm also evaluated at pairs")
  p.add_argument("--lora-budget", type=float, default=0.8, help="budget of the +lora arms")
  p.add_argument("--lora-steps", type=int, default=40, help="LoRA steps (0: no +lora arms)")
  p.add_argument(
    "--distill-budgets", default="0.9,0.8", help="budgets of the +distill arms (comma-separated)"
  )
  p.add_argument(
    "--distill-steps", type=int, default=100, help="distill steps (0: no +distill arms)"
  )
  p.add_argument("--distill-lr", type=float, default=1e-4, help="distill learning rate")
  p.add_argument(
    "--policies",
    default="informed,static,greedy",
    help="arms to run (a partial run: the others keep what exists)",
  )
  p.add_argument(
    "--no-bench", dest="bench", action="store_false", help="leave out the timing of each arm"
  )
  p.add_argument(
    "--fresh-report",
    dest="keep_rows",
    action="store_false",
    help="report only this run's rows (default: keep earlier rows it did not rerun)",
  )
  p.add_argument("--report-only", action="store_true")
  p.add_argument("--dry-run", action="store_true")
  a = p.parse_args(argv)
  a.budgets = [float(b) for b in a.budgets.split(",")]
  a.distill_budgets = [float(b) for b in a.distill_budgets.split(",") if b.strip()]
  a.policies = tuple(p.strip() for p in a.policies.split(",") if p.strip())
  unknown = sorted(set(a.policies) - {"informed", "static", "greedy"})
  if unknown:
    p.error(f"--policies takes informed, static, greedy; got {unknown}")
  if a.report_only:
    report(a)
    return 0
  todo = steps(a)
  for name, done, cmd in todo:
    if a.dry_run:
      print(f"{'[done] ' if done.exists() else ''}{name}: {shlex.join(cmd)}")
      continue
    if done.exists():
      continue
    if name == "heldout pydoc":
      pydoc_source(Path(a.runs) / "heldout" / "pydoc_topics.jsonl")
    _run(cmd, Path(a.runs) / "logs" / (name.replace(" ", "_") + ".log"), name)
    if name.startswith("eval"):
      report(a)  # partial results as they come
  if not a.dry_run:
    report(a)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
