"""The quality table: informed vs greedy routing on SmolLM2-135M, end to end, resumable.

    python launch/quality_table.py                   # the real run (about 3 h 20 min, see below)
    python launch/quality_table.py --lora --causal   # + greedy+LoRA arms, + causal-mode rows
    python launch/quality_table.py --report-only     # rebuild docs/results.{json,md,png}
    python launch/quality_table.py --dry-run         # print the plan, commands and estimate
    python launch/quality_table.py --smoke --runs /tmp/qt --docs /tmp/qt/docs   # ~1-2 min test

Steps (each one subprocess, its output in RUNS/logs/<step>.log, one console line):
  1. held-out sets -> RUNS/heldout/{valid,wiki}.jsonl (+ .json manifest):
     `valid`: the config's validation split (the training domains, Shakespeare
     and news, documents the routers never saw); `wiki`: Wikipedia articles
     (assets/text/wiki/enwiki_articles.jsonl, a domain never trained on).
     Capped: documents taken round-robin over domains, in split/file order,
     each cut (at a line or word boundary) to its first --eval-doc-tokens
     tokens, until --eval-max-tokens tokens (and at most --eval-max-documents
     documents) per set. Defaults: 4,096 tokens per document, 24,576 per set
     (valid: all ~9k news tokens + ~11k Shakespeare; wiki: ~7 articles).
  2. forecasters: `python -m ir_jax.train --config configs/smollm2_135m.py
     --workdir RUNS/forecaster --config.train.stages=forecaster ...` (the
     config's Shakespeare + news train split, its batch of 4 x --seq-len).
  3. routers, for policy in --policies x sparsity in --sparsity, all from the
     forecasters (`--config.train.init_from=RUNS/forecaster`), with the same
     steps, batch and seed: RUNS/router_{policy}_{sparsity}. With --lora, a
     LoRA stage on every greedy arm: RUNS/lora_greedy_{sparsity}.
  4. `python -m ir_jax.eval` on both held-out sets (mode topk; --causal adds
     causal, thresholds calibrated on the config's train split): dense once
     (RUNS/forecaster); the informed arm with policies informed, random,
     oracle; the greedy arm with greedy; the LoRA arm with greedy (labelled
     greedy+lora). -> RUNS/eval/<set>/<arm>.json
  5. report: docs/results.json (every record, arm training times from each
     train_summary.json, commands, git commit), docs/results.md (table,
     plot, commands, commit, a "Reading" placeholder), docs/results.png.
     `--report-only` redoes only this from the JSON files.

Training time of a row: the sum of `train_s` (training wall seconds, over
resumes) in its workdir's train_summary.json, plus what it builds on: informed
rows add the forecasters' time (they need them), greedy rows do not (they
skip), greedy+lora rows add the greedy routers' time, random/oracle rows are the
forecasters' time alone.

Resuming. A step is skipped when its output is complete: a train workdir with
train_summary.json whose stages all reached their step count, an eval JSON
with every requested setting, a held-out manifest. A killed run, rerun with the
same command, continues (ir_jax.train resumes from its checkpoints; Ctrl-C or
SIGTERM makes the running ir_jax.train save a checkpoint before it stops).
RUNS/plan.json keeps the options; a rerun with other budgets is refused (the
lists --sparsity, --policies, --lora, --causal may grow).

Defaults and expected time on a 2-core CPU (rates measured there: forecaster
stage ~470 tokens/s, router stage with Gumbel gates ~160 tokens/s since every
unit is computed, SmolLM2 forward ~500 tokens/s; LoRA stage assumed ~250
tokens/s; ~90 s start-up per training run, ~20 s per eval run + ~15 s compile
per setting):
  forecasters  --forecaster-steps 800 x 4 x 256 tokens        ~29 min
  routers      6 arms x --router-steps 400 x --router-batch 2 x 256 tokens   ~2 h 08 min
  evaluation   2 sets x 13 settings x <=24,576 tokens          ~20 min
  overheads    7 training runs, 14 eval runs, 26 compiles     ~21 min
  total        about 3 h 20 min (--dry-run prints the estimate for other options);
  --lora adds 3 x --lora-steps 200 x 2 x 256 tokens + 6 settings: ~35 min;
  --causal doubles the routed settings: ~+25 min.

--smoke: configs/tiny.py (random 2-layer model, byte tokenizer), 4 forecaster
and 2 router/LoRA steps, sparsity 0.4 only (unless --sparsity), held-out sets
of <=256 tokens, rows of 64 tokens, data prepared under RUNS/tfds, report under
RUNS/docs unless --docs is given: the whole pipeline, 11 subprocesses of 5-35 s
each (JAX start-up and compiles), in about 3 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
PROG = "quality_table"
PLAN_FORMAT = "ir_jax.quality_table.plan/1"
RESULTS_FORMAT = "ir_jax.quality_table/1"
HELDOUT_FORMAT = "ir_jax.quality_table.heldout/1"
WIKI = "assets/text/wiki/enwiki_articles.jsonl"
# Label order in tables and plots; greedy+lora is the greedy arm after a LoRA stage.
LABELS = ("dense", "informed", "informed+lora", "greedy", "greedy+lora", "random", "oracle")
# Rates measured on a 2-core CPU for SmolLM2-135M at 256-token rows (see the docstring).
RATES = {"forecaster_tps": 470.0, "router_tps": 160.0, "lora_tps": 250.0, "eval_tps": 500.0,
         "train_run_s": 90.0, "eval_run_s": 20.0, "eval_setting_s": 15.0}
FORECASTER_BATCH = 4  # data.batch_size of configs/smollm2_135m.py (rows per forecaster step)

DEFAULTS = dict(config="configs/smollm2_135m.py", runs="runs/quality", docs="docs",
                forecaster_steps=0, forecaster_fit_batches=48, router_steps=40,
                router_fit_batches=16, router_batch=2, seq_len=256,
                lora_steps=40, eval_max_tokens=16384, eval_doc_tokens=4096,
                eval_max_documents=0, wiki=WIKI)
SMOKE = dict(config="configs/tiny.py", runs="runs/quality_smoke", docs=None,
             forecaster_steps=4, forecaster_fit_batches=2, router_steps=2, router_fit_batches=2, router_batch=2, seq_len=64, lora_steps=2,
             eval_max_tokens=256, eval_doc_tokens=128, eval_max_documents=0, wiki=WIKI)
# Options that change what a step produces: a rerun into the same RUNS must keep them.
FIXED = ("config", "forecaster_steps", "forecaster_fit_batches", "router_steps",
         "router_fit_batches", "router_batch", "seq_len", "lora_steps",
         "eval_max_tokens", "eval_doc_tokens", "eval_max_documents", "wiki", "smoke", "seed")


# ------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True)
class Options:
  """Resolved options of one run (paths absolute)."""

  config: str
  runs: str
  docs: str
  forecaster_steps: int
  forecaster_fit_batches: int
  router_steps: int
  router_fit_batches: int
  router_batch: int
  seq_len: int
  lora_steps: int
  sparsities: tuple[float, ...]
  policies: tuple[str, ...]
  lora: bool
  causal: bool
  eval_max_tokens: int
  eval_doc_tokens: int
  eval_max_documents: int
  wiki: str
  smoke: bool
  seed: int = 0

  @property
  def modes(self) -> tuple[str, ...]:
    return ("topk", "causal") if self.causal else ("topk",)


def _abs(path: str, base: Path) -> str:
  p = Path(os.path.expanduser(path))
  return str(p if p.is_absolute() else (base / p).resolve())


def rel(path: str) -> str:
  """`path` relative to the repository root when inside it (for display)."""
  try:
    return Path(path).resolve().relative_to(REPO).as_posix()
  except ValueError:
    return str(path)


def _floats(text: str) -> tuple[float, ...]:
  try:
    vals = tuple(sorted({float(s) for s in text.split(",") if s.strip()}))
  except ValueError:
    raise SystemExit(f"{PROG}: error: --sparsity {text!r}: give numbers like 0.25,0.4,0.7"
                     ) from None
  if not vals or any(not 0.0 < v < 1.0 for v in vals):
    raise SystemExit(f"{PROG}: error: --sparsity {text!r}: fractions in (0, 1)")
  return vals


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python launch/quality_table.py",
      description="Train forecasters and informed/greedy routers on SmolLM2-135M, evaluate them "
                  "on two held-out sets and write the quality table (docs/results.md). "
                  "Resumable: rerun the same command after a stop. The module docstring has "
                  "the steps, defaults and expected time; `quality_table.py heldout --help` is "
                  "the held-out set builder it runs.")
  d = DEFAULTS
  p.add_argument("--runs", default=None, help=f"workdirs, logs and eval JSONs (default "
                 f"{d['runs']}; {SMOKE['runs']} with --smoke)")
  p.add_argument("--docs", default=None, help="where results.json/.md/.png go (default docs/; "
                 "RUNS/docs with --smoke)")
  p.add_argument("--config", default=None, help=f"train config (default {d['config']}; "
                 f"{SMOKE['config']} with --smoke)")
  p.add_argument("--forecaster-steps", type=int, default=None,
                 help=f"forecaster steps of {FORECASTER_BATCH} x seq-len tokens "
                      f"(default {d['forecaster_steps']})")
  p.add_argument("--forecaster-fit-batches", type=int, default=None,
                 help=f"batches of statistics for the closed-form forecaster fit (default "
                      f"{d['forecaster_fit_batches']})")
  p.add_argument("--router-steps", type=int, default=None,
                 help=f"Gumbel-gate LM-loss router steps per arm after the warm start "
                      f"(default {d['router_steps']})")
  p.add_argument("--router-fit-batches", type=int, default=None,
                 help=f"batches of statistics for each arm's router warm start (default "
                      f"{d['router_fit_batches']})")
  p.add_argument("--router-batch", type=int, default=None,
                 help=f"rows per router (and LoRA) step (default {d['router_batch']})")
  p.add_argument("--seq-len", type=int, default=None,
                 help=f"tokens per row, training and evaluation (default {d['seq_len']})")
  p.add_argument("--sparsity", default=None,
                 help="comma-separated target sparsities, fractions of token-unit pairs "
                      "approximated (default 0.25,0.4,0.7; 0.4 with --smoke)")
  p.add_argument("--policies", default="informed,greedy",
                 help="router arms to train: informed and/or greedy (default both)")
  p.add_argument("--lora", action="store_true",
                 help="add a LoRA stage after every router arm (greedy+lora, informed+lora)")
  p.add_argument("--lora-steps", type=int, default=None,
                 help=f"LoRA steps per arm (default {d['lora_steps']})")
  p.add_argument("--causal", action="store_true",
                 help="also evaluate causal mode (calibrated thresholds, what decoding uses)")
  p.add_argument("--eval-max-tokens", type=int, default=None,
                 help=f"tokens per held-out set (default {d['eval_max_tokens']})")
  p.add_argument("--eval-doc-tokens", type=int, default=None,
                 help=f"first tokens of each held-out document (default {d['eval_doc_tokens']})")
  p.add_argument("--eval-max-documents", type=int, default=None,
                 help="documents per held-out set (default 0: no limit beyond the tokens)")
  p.add_argument("--wiki", default=None, help=f"the other-domain held-out text (default {WIKI})")
  p.add_argument("--smoke", action="store_true",
                 help="tiny end-to-end run (configs/tiny.py, a few steps) to test this driver")
  p.add_argument("--report-only", action="store_true",
                 help="only rebuild results.json/.md/.png from the JSON files under RUNS (or, "
                      "without RUNS/plan.json, results.md/.png from DOCS/results.json)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the steps, their commands and the expected time; run nothing")
  return p


def resolve(args: argparse.Namespace) -> Options:
  base = SMOKE if args.smoke else DEFAULTS
  cwd = Path.cwd()

  def pick(name: str) -> Any:
    v = getattr(args, name)
    return base[name] if v is None else v

  runs = _abs(args.runs, cwd) if args.runs else str(REPO / base["runs"])
  if args.docs:
    docs = _abs(args.docs, cwd)
  else:
    docs = os.path.join(runs, "docs") if args.smoke else str(REPO / DEFAULTS["docs"])
  policies = tuple(dict.fromkeys(s.strip() for s in args.policies.split(",") if s.strip()))
  if not policies or any(p not in ("informed", "greedy") for p in policies):
    raise SystemExit(f"{PROG}: error: --policies {args.policies!r}: informed and/or greedy")
  opts = Options(
      config=_abs(args.config, cwd) if args.config else str(REPO / base["config"]),
      runs=runs, docs=docs, forecaster_steps=pick("forecaster_steps"),
      forecaster_fit_batches=pick("forecaster_fit_batches"),
      router_steps=pick("router_steps"), router_fit_batches=pick("router_fit_batches"), router_batch=pick("router_batch"),
      seq_len=pick("seq_len"), lora_steps=pick("lora_steps"),
      sparsities=_floats(args.sparsity or ("0.4" if args.smoke else "0.25,0.4,0.7")),
      policies=policies, lora=args.lora, causal=args.causal,
      eval_max_tokens=pick("eval_max_tokens"), eval_doc_tokens=pick("eval_doc_tokens"),
      eval_max_documents=pick("eval_max_documents"),
      wiki=_abs(args.wiki, cwd) if args.wiki else str(REPO / base["wiki"]), smoke=args.smoke)
  for name, low in (("forecaster_steps", 0), ("router_steps", 0), ("router_batch", 1),
                    ("forecaster_fit_batches", 1), ("router_fit_batches", 1),
                    ("seq_len", 2), ("lora_steps", 1), ("eval_max_tokens", 2),
                    ("eval_doc_tokens", 2), ("eval_max_documents", 0)):
    if getattr(opts, name) < low:
      raise SystemExit(f"{PROG}: error: --{name.replace('_', '-')} must be >= {low}")
  return opts


# ------------------------------------------------------------------ the plan
@dataclasses.dataclass(frozen=True)
class Arm:
  """One training workdir."""

  name: str  # forecaster, router_informed_0.25, lora_greedy_0.4
  stages: tuple[str, ...]
  steps: dict[str, int]  # batches per stage when finished
  builds_on: str  # the arm it starts from ('' for the forecasters)
  policy: str = ""
  sparsity: float = 0.0


@dataclasses.dataclass(frozen=True)
class EvalJob:
  """One `python -m ir_jax.eval` run: an arm's workdir on one held-out set."""

  eval_set: str
  arm: str
  policies: tuple[str, ...]
  sparsity: float  # 0 for dense
  label: dict[str, str]  # policy -> row label


@dataclasses.dataclass
class Step:
  """A unit of work: a subprocess, its log, how to tell it is done."""

  name: str
  argv: list[str]
  done: Callable[[], bool]
  kind: str  # heldout | train | eval


def sp_name(s: float) -> str:
  return f"{s:g}"


def arms(opts: Options) -> list[Arm]:
  out = [Arm("forecaster", ("forecaster",), {"forecaster": opts.forecaster_steps}, "")]
  for s in opts.sparsities:
    for p in opts.policies:
      out.append(Arm(f"router_{p}_{sp_name(s)}", ("router",), {"router": opts.router_steps},
                     "forecaster", p, s))
      if opts.lora:
        out.append(Arm(f"lora_{p}_{sp_name(s)}", ("lora",), {"lora": opts.lora_steps},
                       f"router_{p}_{sp_name(s)}", p, s))
  return out


def eval_jobs(opts: Options) -> list[EvalJob]:
  jobs = []
  for es in ("valid", "wiki"):
    jobs.append(EvalJob(es, "forecaster", ("dense",), 0.0, {"dense": "dense"}))
    for a in arms(opts):
      if a.name == "forecaster":
        continue
      if a.name.startswith("lora_"):
        jobs.append(EvalJob(es, a.name, (a.policy,), a.sparsity,
                            {a.policy: f"{a.policy}+lora"}))
      elif a.policy == "informed":
        pols = ("informed", "random", "oracle")
        jobs.append(EvalJob(es, a.name, pols, a.sparsity, {p: p for p in pols}))
      else:
        jobs.append(EvalJob(es, a.name, ("greedy",), a.sparsity, {"greedy": "greedy"}))
  return jobs


def heldout_paths(opts: Options, name: str) -> tuple[str, str]:
  base = os.path.join(opts.runs, "heldout", name)
  return base + ".jsonl", base + ".json"


def eval_path(opts: Options, job: EvalJob) -> str:
  return os.path.join(opts.runs, "eval", job.eval_set, f"{job.arm}.json")


def train_argv(opts: Options, arm: Arm) -> list[str]:
  wd = os.path.join(opts.runs, arm.name)
  argv = [sys.executable, "-m", "ir_jax.train", "--config", opts.config, "--workdir", wd,
          f"--config.train.stages={','.join(arm.stages)}",
          f"--config.data.seq_len={opts.seq_len}", f"--config.train.seed={opts.seed}",
          "--config.train.eval_batches=0"]  # evaluated by ir_jax.eval below
  if opts.smoke:
    argv.append(f"--config.data.data_dir={os.path.join(opts.runs, 'tfds')}")
  if arm.builds_on:
    argv.append(f"--config.train.init_from={os.path.join(opts.runs, arm.builds_on)}")
  if arm.policy:
    argv += [f"--config.routing.policy={arm.policy}",
             f"--config.routing.sparsity={arm.sparsity}"]
  for stage in arm.stages:
    argv.append(f"--config.train.{stage}.steps={arm.steps[stage]}")
    if stage in ("forecaster", "router"):
      argv.append(f"--config.train.{stage}.fit_batches="
                  f"{getattr(opts, stage + '_fit_batches')}")
    if stage == "router":  # the capacity table's error curves: 2,048 tokens at 2 x 256
      argv.append(f"--config.train.router.allocation_batches={max(1, 8 // opts.router_batch)}")
    if stage in ("router", "lora"):
      argv.append(f"--config.train.{stage}.batch_size={opts.router_batch}")
  return argv


def eval_argv(opts: Options, job: EvalJob) -> list[str]:
  argv = [sys.executable, "-m", "ir_jax.eval", "--config", opts.config,
          "--workdir", os.path.join(opts.runs, job.arm),
          "--data", heldout_paths(opts, job.eval_set)[0], "--policy", ",".join(job.policies),
          "--seq-len", str(opts.seq_len), "--json", eval_path(opts, job), "--no-plot"]
  if job.policies != ("dense",):
    argv += ["--sparsity", str(job.sparsity), "--mode", ",".join(opts.modes)]
  return argv


def heldout_argv(opts: Options, name: str) -> list[str]:
  argv = [sys.executable, os.path.abspath(__file__), "heldout", "--config", opts.config,
          "--source", "split" if name == "valid" else opts.wiki,
          "--out", heldout_paths(opts, name)[0], "--max-tokens", str(opts.eval_max_tokens),
          "--doc-tokens", str(opts.eval_doc_tokens),
          "--max-documents", str(opts.eval_max_documents)]
  if name != "valid":
    argv += ["--domain", name]
  if opts.smoke:
    argv += ["--data-dir", os.path.join(opts.runs, "tfds")]
  return argv


def show(argv: Sequence[str]) -> str:
  """A command for people: `python`, paths relative to the repository root."""
  out = []
  for i, a in enumerate(argv):
    if i == 0 and a == sys.executable:
      out.append("python")
      continue
    if "=" in a and a.startswith("--"):
      k, v = a.split("=", 1)
      out.append(f"{k}={rel(v)}" if os.path.isabs(v) else a)
    else:
      out.append(rel(a) if os.path.isabs(a) else a)
  return shlex.join(out)


def steps(opts: Options) -> list[Step]:
  """Every step, in run order: held-out sets, forecasters, then each arm and its evals."""
  out = [Step(f"heldout_{n}", heldout_argv(opts, n),
              (lambda n=n: heldout_complete(heldout_paths(opts, n)[1])), "heldout")
         for n in ("valid", "wiki")]
  jobs = eval_jobs(opts)
  for a in arms(opts):
    wd = os.path.join(opts.runs, a.name)
    out.append(Step(f"train_{a.name}", train_argv(opts, a),
                    (lambda wd=wd, a=a: train_complete(wd, a.steps)), "train"))
    for j in jobs:
      if j.arm == a.name:
        out.append(Step(f"eval_{j.eval_set}_{j.arm}", eval_argv(opts, j),
                        (lambda j=j: eval_complete(eval_path(opts, j), j, opts.modes)), "eval"))
  return out


# ------------------------------------------------------------------ completeness
def read_json(path: str) -> Any:
  """The JSON in `path`, or None when it is missing or unreadable (e.g. half written)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _checkpoint_steps(stage_dir: str) -> list[int]:
  try:
    return [int(n) for n in os.listdir(stage_dir) if n.isdigit()]
  except OSError:
    return []


def train_complete(workdir: str, want: dict[str, int]) -> bool:
  """train_summary.json lists every stage and each has a checkpoint at its last step."""
  summary = read_json(os.path.join(workdir, "train_summary.json"))
  if not isinstance(summary, dict):
    return False
  have = [s.get("stage") for s in summary.get("stages", [])]
  if have != list(want):
    return False
  return all(max(_checkpoint_steps(os.path.join(workdir, "checkpoints", st)), default=0) >= n
             for st, n in want.items())


def eval_complete(path: str, job: EvalJob, modes: Sequence[str]) -> bool:
  """The eval JSON holds a record for every setting the job asks for."""
  res = read_json(path)
  if not isinstance(res, dict) or not isinstance(res.get("records"), list):
    return False
  have = {(r.get("mode"), r.get("policy"), round(float(r.get("sparsity", -1)), 6))
          for r in res["records"]}
  for p in job.policies:
    for m in (("topk",) if p == "dense" else modes):
      if (m, p, round(0.0 if p == "dense" else job.sparsity, 6)) not in have:
        return False
  return True


def heldout_complete(manifest: str) -> bool:
  m = read_json(manifest)
  return isinstance(m, dict) and m.get("format") == HELDOUT_FORMAT and os.path.isfile(
      m.get("jsonl", ""))


# ------------------------------------------------------------------ estimate
def estimate(opts: Options) -> dict[str, float]:
  """Expected seconds per part on a 2-core CPU (SmolLM2-135M rates, see RATES)."""
  r = RATES
  a = arms(opts)
  n_router = sum(x.name.startswith("router_") for x in a)
  n_lora = sum(x.name.startswith("lora_") for x in a)
  jobs = eval_jobs(opts)
  settings = sum(1 if j.policies == ("dense",) else len(j.policies) * len(opts.modes)
                 for j in jobs)
  tokens = opts.eval_max_tokens if not opts.eval_max_documents else min(
      opts.eval_max_tokens, opts.eval_max_documents * opts.eval_doc_tokens)
  out = {
      "forecasters": (opts.forecaster_steps * FORECASTER_BATCH * opts.seq_len
                      / r["forecaster_tps"] + opts.forecaster_fit_batches * FORECASTER_BATCH
                      * opts.seq_len / r["eval_tps"]),
      "routers": n_router * (opts.router_steps * opts.router_batch * opts.seq_len
                             / r["router_tps"] + (opts.router_fit_batches + 4)
                             * opts.router_batch * opts.seq_len / r["eval_tps"]),
      "lora": n_lora * opts.lora_steps * opts.router_batch * opts.seq_len / r["lora_tps"],
      "evaluation": settings * tokens / r["eval_tps"],
      "overheads": (len(a) * r["train_run_s"] + len(jobs) * r["eval_run_s"]
                    + settings * r["eval_setting_s"]),
  }
  out["total"] = sum(out.values())
  return out


def hms(s: float) -> str:
  s = int(round(s))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s"


# ------------------------------------------------------------------ running
class _Runner:
  """Runs steps as subprocesses; a stop (Ctrl-C, SIGTERM) reaches the child as SIGTERM, so
  ir_jax.train saves a checkpoint before exiting."""

  def __init__(self) -> None:
    self.child: subprocess.Popen | None = None
    self.stopping = False

  def _on_term(self, signum: int, frame: Any) -> None:
    self.stopping = True
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signal.SIGTERM)

  def run(self, argv: list[str], log_path: str) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n===== {datetime.datetime.now().isoformat(timespec='seconds')}  "
                f"{show(argv)}\n")
      log.flush()
      # The child ignores SIGINT (kept across exec): Ctrl-C stops it through _on_term.
      self.child = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
      try:
        while True:
          try:
            return self.child.wait()
          except KeyboardInterrupt:
            self._on_term(signal.SIGINT, None)
      finally:
        if self.child.poll() is None:  # wait for the checkpoint, then give up on it
          try:
            self.child.wait(timeout=300)
          except subprocess.TimeoutExpired:
            self.child.kill()
        self.child = None


def _tail(path: str, n: int = 15) -> str:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return "".join(f.readlines()[-n:])
  except OSError:
    return ""


def git_info() -> dict[str, Any]:
  def git(*a: str) -> str:
    try:
      return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                            timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
      return ""

  commit = git("rev-parse", "HEAD")
  return {"commit": commit or None,
          "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".partial"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def check_plan(opts: Options, plan_path: str, command: str) -> dict[str, Any]:
  """RUNS/plan.json for this run: refuses other budgets than the run was started with."""
  mine = {k: getattr(opts, k) for k in FIXED}
  old = read_json(plan_path)
  if isinstance(old, dict) and old.get("format") == PLAN_FORMAT:
    diff = [f"{k} {old['fixed'].get(k)!r} vs {v!r}" for k, v in mine.items()
            if old["fixed"].get(k) != v]
    if diff:
      raise SystemExit(f"{PROG}: error: {rel(opts.runs)} was started with other options "
                       f"({'; '.join(diff)}); rerun with those or choose another --runs")
    invocations = old.get("invocations", [])
  else:
    invocations = []
  invocations.append({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                      "command": command, "git": git_info()})
  plan = {"format": PLAN_FORMAT, "fixed": mine, "options": dataclasses.asdict(opts),
          "invocations": invocations}
  write_json(plan_path, plan)
  return plan


def run_all(opts: Options, command: str) -> int:
  todo = steps(opts)
  os.makedirs(os.path.join(opts.runs, "logs"), exist_ok=True)
  check_plan(opts, os.path.join(opts.runs, "plan.json"), command)
  est = estimate(opts)
  print(f"{PROG}: {len(todo)} steps into {rel(opts.runs)}"
        + ("" if opts.smoke else f"; expected about {hms(est['total'])} on a 2-core CPU from "
           "scratch") + f"; logs in {rel(os.path.join(opts.runs, 'logs'))}/", flush=True)
  runner = _Runner()
  old_term = signal.signal(signal.SIGTERM, runner._on_term)
  t0 = time.time()
  width = len(str(len(todo)))
  try:
    for i, st in enumerate(todo, 1):
      if runner.stopping:
        print(f"{PROG}: stopped on request; rerun the same command to resume", flush=True)
        return 130
      head = f"[{i:{width}d}/{len(todo)}] {st.name}"
      if st.done():
        print(f"{head}: complete, skipped (elapsed {hms(time.time() - t0)})", flush=True)
        continue
      log_path = os.path.join(opts.runs, "logs", f"{st.name}.log")
      print(f"{head} ...", end="", flush=True)
      t1 = time.time()
      rc = runner.run(st.argv, log_path)
      dt = time.time() - t1
      finished = rc == 0 and st.done()
      if runner.stopping:
        print(f" {'done in' if finished else 'stopped after'} {hms(dt)} (exit {rc}); stopped "
              "on request: rerun the same command to resume", flush=True)
        return 130
      if not finished:
        why = f"exit {rc}" if rc else "finished without complete output"
        print(f" FAILED ({why}) after {hms(dt)}; log {rel(log_path)}, last lines:\n"
              f"{_tail(log_path)}", flush=True)
        return 1
      print(f" done in {hms(dt)} (elapsed {hms(time.time() - t0)})", flush=True)
  except KeyboardInterrupt:  # between steps: nothing is running
    print(f"\n{PROG}: stopped on request; rerun the same command to resume", flush=True)
    return 130
  finally:
    signal.signal(signal.SIGTERM, old_term)
  results = collect(opts.runs)
  path = os.path.join(opts.docs, "results.json")
  write_json(path, results)
  written = write_report(path, opts.docs)
  print(f"{PROG}: all steps complete in {hms(time.time() - t0)}; wrote "
        + ", ".join(rel(p) for p in [path, *written]), flush=True)
  return 0


# ------------------------------------------------------------------ held-out sets
def _cut(text: str, tok: Any, limit: int) -> tuple[str, int]:
  """The longest prefix found of `text`, cut at a line (else word) boundary, with at most
  `limit` tokens; (prefix, its token count)."""
  n = len(tok.encode(text))
  if n <= limit:
    return text, n
  pos = int(len(text) * limit / n)
  for _ in range(20):
    cut = text[:pos]
    nl = cut.rfind("\n")
    cut = cut[:nl] if nl > len(cut) // 2 else cut[:max(cut.rfind(" "), 1)]
    cut = cut.strip()
    n_cut = len(tok.encode(cut))
    if n_cut <= limit:
      return cut, n_cut
    pos = int(len(cut) * 0.97 * limit / n_cut)
  return "", 0


def build_heldout(argv: Sequence[str]) -> int:
  """`quality_table.py heldout`: a capped held-out set as JSONL (text, domain) + manifest."""
  p = argparse.ArgumentParser(prog="python launch/quality_table.py heldout",
                              description=build_heldout.__doc__)
  p.add_argument("--config", required=True)
  p.add_argument("--source", required=True,
                 help="'split' (the config's eval split) or a text/JSONL file")
  p.add_argument("--domain", default="", help="domain of every document of --source FILE")
  p.add_argument("--out", required=True, help="output .jsonl (manifest: same name, .json)")
  p.add_argument("--max-tokens", type=int, required=True)
  p.add_argument("--doc-tokens", type=int, required=True)
  p.add_argument("--max-documents", type=int, default=0)
  p.add_argument("--data-dir", default="", help="override data.data_dir of the config")
  a = p.parse_args(argv)

  from ir_jax.config_file import load_config
  from ir_jax.data.config import FileSpec, from_config
  from ir_jax.data.tokenize import load_text_tokenizer

  cfg = load_config(a.config)
  if a.data_dir:
    cfg.data.data_dir = a.data_dir
  dcfg = from_config(cfg)
  tok = load_text_tokenizer(dcfg.tokenizer, dcfg.add_bos, dcfg.add_eos)
  if a.source == "split":
    from ir_jax.data.builder import open_split

    src = open_split(dcfg, dcfg.eval_split, prepare_if_missing=True)
    docs = [(*src.document(i), f"{dcfg.eval_split}:{i}") for i in range(len(src))]
    desc = f"split {dcfg.eval_split!r} of {rel(a.config)}"
  else:
    from ir_jax.data import sources

    fcfg = dataclasses.replace(dcfg, name="local", files=(FileSpec(a.source, domain=a.domain),))
    stats = sources.Stats()
    docs = [(d.text, d.domain, d.source) for f in sources.resolve_files(fcfg)
            for d in sources.read_documents(f, fcfg, stats)]
    desc = rel(a.source)
  by_domain: dict[str, list[tuple[str, str]]] = {}
  for text, domain, source in docs:
    by_domain.setdefault(domain, []).append((text, source))
  # Round-robin over domains, in order, until the token or document budget is spent.
  queues = {d: list(v) for d, v in by_domain.items()}
  chosen: list[dict[str, Any]] = []
  total = 0
  # Stop rather than add a fragment shorter than a quarter of a document's allowance.
  min_piece = min(a.doc_tokens, max(2, a.doc_tokens // 4))

  def room() -> bool:
    return (a.max_tokens - total >= min_piece
            and (not a.max_documents or len(chosen) < a.max_documents))

  while any(queues.values()) and room():
    for d in list(queues):
      if not queues[d] or not room():
        continue
      text, source = queues[d].pop(0)
      limit = min(a.doc_tokens, a.max_tokens - total)
      full = len(tok.encode(text))
      cut, n = _cut(text, tok, limit)
      if n < 2:
        continue
      chosen.append({"text": cut, "domain": d, "source": source, "tokens": n,
                     "document_tokens": full})
      total += n
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out + ".partial", "w", encoding="utf-8") as f:
    for c in chosen:
      f.write(json.dumps({dcfg.text_field: c["text"], dcfg.domain_field: c["domain"]},
                         ensure_ascii=False) + "\n")
  os.replace(a.out + ".partial", a.out)
  doms = {d: {"documents": sum(c["domain"] == d for c in chosen),
              "tokens": sum(c["tokens"] for c in chosen if c["domain"] == d),
              "available_documents": len(v)} for d, v in by_domain.items()}
  manifest = {"format": HELDOUT_FORMAT, "jsonl": os.path.abspath(a.out), "source": desc,
              "config": rel(a.config), "tokenizer": dcfg.tokenizer, "max_tokens": a.max_tokens,
              "doc_tokens": a.doc_tokens, "max_documents": a.max_documents,
              "documents": len(chosen), "tokens": total, "domains": doms,
              "selection": "round-robin over domains in source order; each document cut at a "
                           "line or word boundary to its first doc_tokens tokens; until "
                           "max_tokens (and max_documents), stopping before a piece of "
                           "less than doc_tokens / 4",
              "items": [{k: v for k, v in c.items() if k != "text"} for c in chosen]}
  write_json(os.path.splitext(a.out)[0] + ".json", manifest)
  print(f"{desc}: {len(chosen)} documents, {total} tokens "
        + ", ".join(f"{d} {v['documents']}/{v['tokens']}" for d, v in doms.items())
        + f" -> {a.out}")
  return 0


# ------------------------------------------------------------------ collecting
SET_TITLES = {"valid": "validation split (training domains, unseen documents)",
              "wiki": "Wikipedia (a domain not trained on)"}


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
      sc, dc = cfg.get("train", {}).get(st, {}), cfg.get("data", {})
      if dc:
        rows[st] = [sc.get("batch_size") or dc.get("batch_size"),
                    sc.get("seq_len") or dc.get("seq_len")]
    arm_info[a.name] = {"workdir": rel(wd), "stages": list(a.stages), "steps": a.steps,
                        "batch": rows,
                        "builds_on": a.builds_on, "policy": a.policy or None,
                        "sparsity": a.sparsity if a.policy else None, "complete": done,
                        "train_s": round(sum(v or 0.0 for v in stages.values()), 3) if done
                        else None, "stage_train_s": stages}

  def arm_s(name: str) -> float | None:
    return arm_info.get(name, {}).get("train_s")

  sets = {}
  for es in ("valid", "wiki"):
    m = read_json(heldout_paths(opts, es)[1]) or {}
    sets[es] = {"title": SET_TITLES[es], "source": m.get("source"), "data": rel(
        heldout_paths(opts, es)[0]), "documents": m.get("documents"), "tokens": m.get("tokens"),
        "domains": m.get("domains"), "doc_tokens": m.get("doc_tokens"),
        "max_tokens": m.get("max_tokens"), "max_documents": m.get("max_documents")}
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
        parts = {"lora": arm_s(job.arm), "routers": arm_s(arm_info[job.arm]["builds_on"]),
                 "forecasters": fc}
      else:
        parts = {"lora": arm_s(job.arm), "routers": arm_s(arm_info[job.arm]["builds_on"])}
      total = None if any(v is None for v in parts.values()) else sum(parts.values())
      sums: dict[str, list[float]] = {}  # domain -> [NLL sum, scored tokens]
      for d, nll, doc in zip(domains, r.get("doc_nll", []), res.get("documents", [])):
        acc = sums.setdefault(d, [0.0, 0])
        acc[0] += nll
        acc[1] += doc["tokens"]
      by_dom = {d: {"tokens": n, "perplexity": math.exp(v / n) if n else None}
                for d, (v, n) in sums.items()}
      records.append({
          "eval_set": job.eval_set, "arm": job.arm, "label": label, "mode": r["mode"],
          "policy": r["policy"], "sparsity": r["sparsity"], "perplexity": r["perplexity"],
          "nll": r["nll"], "tokens": r["tokens"], "realized_sparsity": r["realized_sparsity"],
          "sparsity_attn": r.get("sparsity_attn"), "sparsity_mlp": r.get("sparsity_mlp"),
          "flops_fraction": r.get("flops_fraction"),
          "ideal_flops_fraction": r.get("ideal_flops_fraction"), "eval_wall_s": r.get("wall_s"),
          "train_s": total, "train_s_parts": parts,
          "by_domain": by_dom,
          "source": rel(eval_path(opts, job))})
  invocations = plan.get("invocations", [])
  runs_cmds = [i["command"] for i in invocations if "--report-only" not in i["command"]
               and "--dry-run" not in i["command"]]
  return {
      "format": RESULTS_FORMAT,
      "created": datetime.datetime.now().isoformat(timespec="seconds"),
      "git": {**git_info(), "run_started_at": (invocations[0]["git"] if invocations else None)},
      "options": {**o, "runs": rel(o["runs"]), "docs": rel(o["docs"]), "config": rel(o["config"]),
                  "wiki": rel(o["wiki"])},
      "eval_sets": sets,
      "arms": arm_info,
      "commands": {"driver": runs_cmds[-1] if runs_cmds else None, "driver_invocations": runs_cmds,
                   "steps": [{"step": s.name, "command": show(s.argv),
                              "log": rel(os.path.join(runs, "logs", f"{s.name}.log"))}
                             for s in steps(opts)]},
      "records": records,
  }


# ------------------------------------------------------------------ the report
def _fmt_min(s: float | None) -> str:
  return "–" if s is None else f"{s / 60:.1f} min"


def _row_key(r: dict[str, Any]) -> tuple:
  return (r["sparsity"], r["mode"] != "topk", LABELS.index(r["label"]))


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per (label, sparsity, mode) with each eval set's record."""
  rows: dict[tuple, dict[str, Any]] = {}
  for r in results["records"]:
    key = (r["label"], r["sparsity"], r["mode"])
    row = rows.setdefault(key, {"label": r["label"], "sparsity": r["sparsity"],
                                "mode": r["mode"], "sets": {}})
    row["sets"][r["eval_set"]] = r
  return sorted(rows.values(), key=_row_key)


def markdown_table(results: dict[str, Any]) -> str:
  sets = list(results["eval_sets"])
  dense = {r["eval_set"]: r["perplexity"] for r in results["records"] if r["label"] == "dense"}
  causal = any(r["mode"] == "causal" for r in results["records"])
  head = ["policy", "sparsity"] + (["mode"] if causal else []) + [
      f"perplexity {s} (× dense)" for s in sets] + [
      f"realized sparsity ({' / '.join(sets)})", "FLOPs fraction", "training time"]
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
      (k, v), = parts.items()
      ttime = f"{_fmt_min(v)} ({k})"
    else:
      ttime = f"{_fmt_min(any_rec['train_s'])} (" + " + ".join(
          f"{k} {_fmt_min(v)}" for k, v in parts.items()) + ")"
    cells = [row["label"], f"{row['sparsity']:g}"] + ([row["mode"]] if causal else []) + ppl + [
        real, f"{any_rec['flops_fraction']:.3f}" if any_rec.get("flops_fraction") is not None
        else "–", ttime]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> str:
  """Perplexity vs target sparsity, one line per policy (and mode), one panel per eval set."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import FuncFormatter

  sets = list(results["eval_sets"])
  recs = results["records"]
  fig, axes = plt.subplots(1, len(sets), figsize=(5.8 * len(sets), 4.4), squeeze=False)
  for ax, es in zip(axes[0], sets):
    rs = [r for r in recs if r["eval_set"] == es]
    dense = next((r["perplexity"] for r in rs if r["label"] == "dense"), None)
    for i, label in enumerate(LABELS[1:]):
      for mode, style in (("topk", "-"), ("causal", "--")):
        pts = sorted((r["sparsity"], r["perplexity"]) for r in rs
                     if r["label"] == label and r["mode"] == mode)
        if not pts:
          continue
        if dense is not None:
          pts = [(0.0, dense)] + pts
        ax.plot(*zip(*pts), style, marker="o", color=f"C{i}",
                label=label + ("" if mode == "topk" else " (causal)"))
    if dense is not None:
      ax.axhline(dense, color="gray", linestyle=":", linewidth=1, label=f"dense {dense:.3g}")
    info = results["eval_sets"][es]
    ax.set_title(f"{info.get('title', es)}\n{info.get('tokens') or '?'} tokens, "
                 f"{info.get('documents') or '?'} documents", fontsize=10)
    ax.set_xlabel("target sparsity (fraction of token-unit pairs approximated)")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
      axis(FuncFormatter(lambda v, _: f"{v:.4g}"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  axes[0][0].set_ylabel("perplexity")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _budget(arms_: dict[str, Any], stage: str, o: dict[str, Any]) -> str:
  """'N steps of B x T tokens' of a stage, from the first arm that trained it."""
  steps_ = {"forecaster": o["forecaster_steps"], "router": o["router_steps"],
            "lora": o["lora_steps"]}[stage]
  rows = next((a["batch"][stage] for a in arms_.values() if stage in a.get("batch", {})), None)
  if rows is None:
    rows = [o["router_batch"] if stage != "forecaster" else "?", o["seq_len"]]
  return f"{steps_} steps of {rows[0]} x {rows[1]} tokens"


def markdown(results: dict[str, Any], png: str | None, reading: str | None = None,
             shift: str | None = None) -> str:
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
    doms = ", ".join(f"{d} {v['documents']} documents / {v['tokens']} tokens"
                     for d, v in (s.get("domains") or {}).items())
    lines.append(f"- Held-out `{name}`: {s['title']}; {s.get('source')}, capped to "
                 f"{s.get('tokens')} tokens in {s.get('documents')} documents (first "
                 f"{s.get('doc_tokens')} tokens of each, at most {s.get('max_tokens')} per set"
                 + (f", {s['max_documents']} documents" if s.get("max_documents") else "")
                 + f"): {doms}.")
  lines += [
      f"- Git commit: `{g.get('commit')}`" + (" (with uncommitted changes)" if g.get("dirty")
                                               else "")
      + (f"; the run started at `{g['run_started_at'].get('commit')}`"
         if g.get("run_started_at") and g["run_started_at"].get("commit") != g.get("commit")
         else "") + ".",
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
  lines += ["Training runs:", "", "| arm | stages x steps | builds on | training time |",
            "|---|---|---|---|"]
  for name, a in arms_.items():
    st = ", ".join(f"{k} x {v}" for k, v in a["steps"].items())
    lines.append(f"| {name} | {st} | {a['builds_on'] or '–'} | "
                 f"{_fmt_min(a['train_s']) if a['complete'] else 'incomplete'} |")
  c = results["commands"]
  lines += ["", "## Commands", "", "The driver (resumable; rerun it to continue):", "", "```bash",
            c["driver"] or "python launch/quality_table.py", "```", "",
            "What it ran, in order (logs under the runs directory's logs/):", "", "```bash"]
  lines += [s["command"] for s in c["steps"]]
  lines += ["```", ""]
  if shift:
    lines += ["## Quality under data shift", "",
              "From `launch/shift_experiment.py` (its own page: `shift.md`, plot `shift.png`); "
              "estimators described in `estimators.md`.", "", shift.strip(), "",
              "![estimated vs measured](shift.png)", ""]
  if reading:
    lines += ["## Reading", "", reading.strip(), ""]
    return "\n".join(lines)
  lines += ["## Reading", "",
            "**To be written from the numbers above.** This section is a placeholder: the "
            "analysis (does informed routing without LoRA match or beat greedy routing, with "
            "or without LoRA, at each sparsity, in and out of the training domains, and at "
            "what training time) is to be written by a person reading the table and the plot; "
            "nothing here was written before the numbers existed.", ""]
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


# ------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["heldout"]:
    return build_heldout(argv[1:])
  args = parser().parse_args(argv)
  opts = resolve(args)
  command = show(["python", os.path.relpath(__file__, REPO)] + argv) if Path(
      __file__).resolve().is_relative_to(REPO) else shlex.join(["python", __file__] + argv)
  if args.report_only:
    path = os.path.join(opts.docs, "results.json")
    if os.path.isfile(os.path.join(opts.runs, "plan.json")):
      write_json(path, collect(opts.runs))
    elif not os.path.isfile(path):
      raise SystemExit(f"{PROG}: error: neither {rel(opts.runs)}/plan.json nor {rel(path)}")
    written = write_report(path, opts.docs)
    print(f"{PROG}: wrote " + ", ".join(rel(p) for p in ([path] + written)))
    return 0
  if args.dry_run:
    est = estimate(opts)
    for i, st in enumerate(steps(opts), 1):
      print(f"[{i}] {st.name}{' (complete)' if st.done() else ''}\n    {show(st.argv)}")
    print("expected on a 2-core CPU (SmolLM2-135M rates): " + ", ".join(
        f"{k} {hms(v)}" for k, v in est.items()))
    return 0
  return run_all(opts, command)


if __name__ == "__main__":
  sys.exit(main())
