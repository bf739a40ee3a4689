"""The plan of launch/quality_table.py: arms, evaluations, their commands, when each is done.

Every step is one subprocess (the held-out builder, `python -m ir_jax.train`,
`python -m ir_jax.eval`) with a completeness test on its output files, so a
rerun skips what is done; `estimate` is the expected time on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Callable, Sequence

from ir_jax.experiments.quality.common import HELDOUT_FORMAT, read_json, rel
from ir_jax.experiments.quality.options import FORECASTER_BATCH, Options

# The command the held-out steps run (`quality_table.py heldout`), beside this package.
SCRIPT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "quality_table.py"
)
# Rates measured on a 2-core CPU for SmolLM2-135M at 256-token rows (see the docstring of
# launch/quality_table.py).
RATES = {
  "forecaster_tps": 470.0,
  "router_tps": 160.0,
  "lora_tps": 250.0,
  "eval_tps": 500.0,
  "train_run_s": 90.0,
  "eval_run_s": 20.0,
  "eval_setting_s": 15.0,
}


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
  """A sparsity as it appears in arm names (0.25, 0.4)."""
  return f"{s:g}"


def arms(opts: Options) -> list[Arm]:
  """Every training workdir: the forecasters, then each policy's routers (and LoRA) per sparsity."""
  out = [Arm("forecaster", ("forecaster",), {"forecaster": opts.forecaster_steps}, "")]
  for s in opts.sparsities:
    for p in opts.policies:
      out.append(
        Arm(
          f"router_{p}_{sp_name(s)}", ("router",), {"router": opts.router_steps}, "forecaster", p, s
        )
      )
      if opts.lora:
        out.append(
          Arm(
            f"lora_{p}_{sp_name(s)}",
            ("lora",),
            {"lora": opts.lora_steps},
            f"router_{p}_{sp_name(s)}",
            p,
            s,
          )
        )
  return out


def eval_jobs(opts: Options) -> list[EvalJob]:
  """Every evaluation: dense once per held-out set, then each arm with the rows it labels."""
  jobs = []
  for es in ("valid", "wiki"):
    jobs.append(EvalJob(es, "forecaster", ("dense",), 0.0, {"dense": "dense"}))
    for a in arms(opts):
      if a.name == "forecaster":
        continue
      if a.name.startswith("lora_"):
        jobs.append(EvalJob(es, a.name, (a.policy,), a.sparsity, {a.policy: f"{a.policy}+lora"}))
      elif a.policy == "informed":
        pols = ("informed", "random", "oracle")
        jobs.append(EvalJob(es, a.name, pols, a.sparsity, {p: p for p in pols}))
      else:
        jobs.append(EvalJob(es, a.name, ("greedy",), a.sparsity, {"greedy": "greedy"}))
  return jobs


def heldout_paths(opts: Options, name: str) -> tuple[str, str]:
  """A held-out set's JSONL and its manifest."""
  base = os.path.join(opts.runs, "heldout", name)
  return base + ".jsonl", base + ".json"


def eval_path(opts: Options, job: EvalJob) -> str:
  """Where an evaluation's JSON goes."""
  return os.path.join(opts.runs, "eval", job.eval_set, f"{job.arm}.json")


def train_argv(opts: Options, arm: Arm) -> list[str]:
  """The `python -m ir_jax.train` command of an arm."""
  wd = os.path.join(opts.runs, arm.name)
  argv = [
    sys.executable,
    "-m",
    "ir_jax.train",
    "--config",
    opts.config,
    "--workdir",
    wd,
    f"--config.train.stages={','.join(arm.stages)}",
    f"--config.data.seq_len={opts.seq_len}",
    f"--config.train.seed={opts.seed}",
    "--config.train.eval_batches=0",
  ]  # evaluated by ir_jax.eval below
  if opts.smoke:
    argv.append(f"--config.data.data_dir={os.path.join(opts.runs, 'tfds')}")
  if arm.builds_on:
    argv.append(f"--config.train.init_from={os.path.join(opts.runs, arm.builds_on)}")
  if arm.policy:
    argv += [f"--config.routing.policy={arm.policy}", f"--config.routing.sparsity={arm.sparsity}"]
  for stage in arm.stages:
    argv.append(f"--config.train.{stage}.steps={arm.steps[stage]}")
    if stage in ("forecaster", "router"):
      argv.append(f"--config.train.{stage}.fit_batches={getattr(opts, stage + '_fit_batches')}")
    if stage == "router":  # the capacity table's error curves: 2,048 tokens at 2 x 256
      argv.append(f"--config.train.router.allocation_batches={max(1, 8 // opts.router_batch)}")
    if stage in ("router", "lora"):
      argv.append(f"--config.train.{stage}.batch_size={opts.router_batch}")
  return argv


def eval_argv(opts: Options, job: EvalJob) -> list[str]:
  """The `python -m ir_jax.eval` command of an evaluation."""
  argv = [
    sys.executable,
    "-m",
    "ir_jax.eval",
    "--config",
    opts.config,
    "--workdir",
    os.path.join(opts.runs, job.arm),
    "--data",
    heldout_paths(opts, job.eval_set)[0],
    "--policy",
    ",".join(job.policies),
    "--seq-len",
    str(opts.seq_len),
    "--json",
    eval_path(opts, job),
    "--no-plot",
  ]
  if job.policies != ("dense",):
    argv += ["--sparsity", str(job.sparsity), "--mode", ",".join(opts.modes)]
  return argv


def heldout_argv(opts: Options, name: str) -> list[str]:
  """The `quality_table.py heldout` command of a held-out set (valid or wiki)."""
  argv = [
    sys.executable,
    SCRIPT,
    "heldout",
    "--config",
    opts.config,
    "--source",
    "split" if name == "valid" else opts.wiki,
    "--out",
    heldout_paths(opts, name)[0],
    "--max-tokens",
    str(opts.eval_max_tokens),
    "--doc-tokens",
    str(opts.eval_doc_tokens),
    "--max-documents",
    str(opts.eval_max_documents),
  ]
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
  out = [
    Step(
      f"heldout_{n}",
      heldout_argv(opts, n),
      (lambda n=n: heldout_complete(heldout_paths(opts, n)[1])),
      "heldout",
    )
    for n in ("valid", "wiki")
  ]
  jobs = eval_jobs(opts)
  for a in arms(opts):
    wd = os.path.join(opts.runs, a.name)
    out.append(
      Step(
        f"train_{a.name}",
        train_argv(opts, a),
        (lambda wd=wd, a=a: train_complete(wd, a.steps)),
        "train",
      )
    )
    for j in jobs:
      if j.arm == a.name:
        out.append(
          Step(
            f"eval_{j.eval_set}_{j.arm}",
            eval_argv(opts, j),
            (lambda j=j: eval_complete(eval_path(opts, j), j, opts.modes)),
            "eval",
          )
        )
  return out


# ------------------------------------------------------------------ completeness
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
  return all(
    max(_checkpoint_steps(os.path.join(workdir, "checkpoints", st)), default=0) >= n
    for st, n in want.items()
  )


def eval_complete(path: str, job: EvalJob, modes: Sequence[str]) -> bool:
  """The eval JSON holds a record for every setting the job asks for."""
  res = read_json(path)
  if not isinstance(res, dict) or not isinstance(res.get("records"), list):
    return False
  have = {
    (r.get("mode"), r.get("policy"), round(float(r.get("sparsity", -1)), 6)) for r in res["records"]
  }
  for p in job.policies:
    for m in ("topk",) if p == "dense" else modes:
      if (m, p, round(0.0 if p == "dense" else job.sparsity, 6)) not in have:
        return False
  return True


def heldout_complete(manifest: str) -> bool:
  """The manifest is this driver's and its JSONL exists."""
  m = read_json(manifest)
  return (
    isinstance(m, dict) and m.get("format") == HELDOUT_FORMAT and os.path.isfile(m.get("jsonl", ""))
  )


# ------------------------------------------------------------------ estimate
def estimate(opts: Options) -> dict[str, float]:
  """Expected seconds per part on a 2-core CPU (SmolLM2-135M rates, see RATES)."""
  r = RATES
  a = arms(opts)
  n_router = sum(x.name.startswith("router_") for x in a)
  n_lora = sum(x.name.startswith("lora_") for x in a)
  jobs = eval_jobs(opts)
  settings = sum(1 if j.policies == ("dense",) else len(j.policies) * len(opts.modes) for j in jobs)
  tokens = (
    opts.eval_max_tokens
    if not opts.eval_max_documents
    else min(opts.eval_max_tokens, opts.eval_max_documents * opts.eval_doc_tokens)
  )
  out = {
    "forecasters": (
      opts.forecaster_steps * FORECASTER_BATCH * opts.seq_len / r["forecaster_tps"]
      + opts.forecaster_fit_batches * FORECASTER_BATCH * opts.seq_len / r["eval_tps"]
    ),
    "routers": n_router
    * (
      opts.router_steps * opts.router_batch * opts.seq_len / r["router_tps"]
      + (opts.router_fit_batches + 4) * opts.router_batch * opts.seq_len / r["eval_tps"]
    ),
    "lora": n_lora * opts.lora_steps * opts.router_batch * opts.seq_len / r["lora_tps"],
    "evaluation": settings * tokens / r["eval_tps"],
    "overheads": (
      len(a) * r["train_run_s"] + len(jobs) * r["eval_run_s"] + settings * r["eval_setting_s"]
    ),
  }
  out["total"] = sum(out.values())
  return out


def hms(s: float) -> str:
  """Seconds as 42s, 3m05s or 1h02m03s."""
  s = int(round(s))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s"
