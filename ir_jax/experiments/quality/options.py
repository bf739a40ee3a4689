"""The options of launch/quality_table.py: defaults, the --smoke budget, the command line.

`resolve` turns parsed arguments into `Options` (paths absolute); FIXED names
the options a rerun into the same RUNS directory must keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from ir_jax.experiments.quality.common import PROG, REPO

WIKI = "assets/text/wiki/enwiki_articles.jsonl"
FORECASTER_BATCH = 4  # data.batch_size of configs/smollm2_135m.py (rows per forecaster step)

DEFAULTS = dict(
  config="configs/smollm2_135m.py",
  runs="runs/quality",
  docs="docs",
  forecaster_steps=0,
  forecaster_fit_batches=48,
  router_steps=40,
  router_fit_batches=16,
  router_batch=2,
  seq_len=256,
  lora_steps=40,
  eval_max_tokens=16384,
  eval_doc_tokens=4096,
  eval_max_documents=0,
  wiki=WIKI,
)
SMOKE = dict(
  config="configs/tiny.py",
  runs="runs/quality_smoke",
  docs=None,
  forecaster_steps=4,
  forecaster_fit_batches=2,
  router_steps=2,
  router_fit_batches=2,
  router_batch=2,
  seq_len=64,
  lora_steps=2,
  eval_max_tokens=256,
  eval_doc_tokens=128,
  eval_max_documents=0,
  wiki=WIKI,
)
# Options that change what a step produces: a rerun into the same RUNS must keep them.
FIXED = (
  "config",
  "forecaster_steps",
  "forecaster_fit_batches",
  "router_steps",
  "router_fit_batches",
  "router_batch",
  "seq_len",
  "lora_steps",
  "eval_max_tokens",
  "eval_doc_tokens",
  "eval_max_documents",
  "wiki",
  "smoke",
  "seed",
)


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


def _floats(text: str) -> tuple[float, ...]:
  try:
    vals = tuple(sorted({float(s) for s in text.split(",") if s.strip()}))
  except ValueError:
    raise SystemExit(
      f"{PROG}: error: --sparsity {text!r}: give numbers like 0.25,0.4,0.7"
    ) from None
  if not vals or any(not 0.0 < v < 1.0 for v in vals):
    raise SystemExit(f"{PROG}: error: --sparsity {text!r}: fractions in (0, 1)")
  return vals


def parser() -> argparse.ArgumentParser:
  """The command line of launch/quality_table.py (its `heldout` subcommand has its own)."""
  p = argparse.ArgumentParser(
    prog="python launch/quality_table.py",
    description="Train forecasters and informed/greedy routers on SmolLM2-135M, evaluate them "
    "on two held-out sets and write the quality table (docs/results.md). "
    "Resumable: rerun the same command after a stop. The module docstring has "
    "the steps, defaults and expected time; `quality_table.py heldout --help` is "
    "the held-out set builder it runs.",
  )
  d = DEFAULTS
  p.add_argument(
    "--runs",
    default=None,
    help=f"workdirs, logs and eval JSONs (default {d['runs']}; {SMOKE['runs']} with --smoke)",
  )
  p.add_argument(
    "--docs",
    default=None,
    help="where results.json/.md/.png go (default docs/; RUNS/docs with --smoke)",
  )
  p.add_argument(
    "--config",
    default=None,
    help=f"train config (default {d['config']}; {SMOKE['config']} with --smoke)",
  )
  p.add_argument(
    "--forecaster-steps",
    type=int,
    default=None,
    help=f"forecaster steps of {FORECASTER_BATCH} x seq-len tokens "
    f"(default {d['forecaster_steps']})",
  )
  p.add_argument(
    "--forecaster-fit-batches",
    type=int,
    default=None,
    help=f"batches of statistics for the closed-form forecaster fit (default "
    f"{d['forecaster_fit_batches']})",
  )
  p.add_argument(
    "--router-steps",
    type=int,
    default=None,
    help=f"Gumbel-gate LM-loss router steps per arm after the warm start "
    f"(default {d['router_steps']})",
  )
  p.add_argument(
    "--router-fit-batches",
    type=int,
    default=None,
    help=f"batches of statistics for each arm's router warm start (default "
    f"{d['router_fit_batches']})",
  )
  p.add_argument(
    "--router-batch",
    type=int,
    default=None,
    help=f"rows per router (and LoRA) step (default {d['router_batch']})",
  )
  p.add_argument(
    "--seq-len",
    type=int,
    default=None,
    help=f"tokens per row, training and evaluation (default {d['seq_len']})",
  )
  p.add_argument(
    "--sparsity",
    default=None,
    help="comma-separated target sparsities, fractions of token-unit pairs "
    "approximated (default 0.25,0.4,0.7; 0.4 with --smoke)",
  )
  p.add_argument(
    "--policies",
    default="informed,greedy",
    help="router arms to train: informed and/or greedy (default both)",
  )
  p.add_argument(
    "--lora",
    action="store_true",
    help="add a LoRA stage after every router arm (greedy+lora, informed+lora)",
  )
  p.add_argument(
    "--lora-steps", type=int, default=None, help=f"LoRA steps per arm (default {d['lora_steps']})"
  )
  p.add_argument(
    "--causal",
    action="store_true",
    help="also evaluate causal mode (calibrated thresholds, what decoding uses)",
  )
  p.add_argument(
    "--eval-max-tokens",
    type=int,
    default=None,
    help=f"tokens per held-out set (default {d['eval_max_tokens']})",
  )
  p.add_argument(
    "--eval-doc-tokens",
    type=int,
    default=None,
    help=f"first tokens of each held-out document (default {d['eval_doc_tokens']})",
  )
  p.add_argument(
    "--eval-max-documents",
    type=int,
    default=None,
    help="documents per held-out set (default 0: no limit beyond the tokens)",
  )
  p.add_argument("--wiki", default=None, help=f"the other-domain held-out text (default {WIKI})")
  p.add_argument(
    "--smoke",
    action="store_true",
    help="tiny end-to-end run (configs/tiny.py, a few steps) to test this driver",
  )
  p.add_argument(
    "--report-only",
    action="store_true",
    help="only rebuild results.json/.md/.png from the JSON files under RUNS (or, "
    "without RUNS/plan.json, results.md/.png from DOCS/results.json)",
  )
  p.add_argument(
    "--dry-run",
    action="store_true",
    help="print the steps, their commands and the expected time; run nothing",
  )
  return p


def resolve(args: argparse.Namespace) -> Options:
  """Options from parsed arguments: --smoke defaults, absolute paths, bounds checked."""
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
    runs=runs,
    docs=docs,
    forecaster_steps=pick("forecaster_steps"),
    forecaster_fit_batches=pick("forecaster_fit_batches"),
    router_steps=pick("router_steps"),
    router_fit_batches=pick("router_fit_batches"),
    router_batch=pick("router_batch"),
    seq_len=pick("seq_len"),
    lora_steps=pick("lora_steps"),
    sparsities=_floats(args.sparsity or ("0.4" if args.smoke else "0.25,0.4,0.7")),
    policies=policies,
    lora=args.lora,
    causal=args.causal,
    eval_max_tokens=pick("eval_max_tokens"),
    eval_doc_tokens=pick("eval_doc_tokens"),
    eval_max_documents=pick("eval_max_documents"),
    wiki=_abs(args.wiki, cwd) if args.wiki else str(REPO / base["wiki"]),
    smoke=args.smoke,
  )
  for name, low in (
    ("forecaster_steps", 0),
    ("router_steps", 0),
    ("router_batch", 1),
    ("forecaster_fit_batches", 1),
    ("router_fit_batches", 1),
    ("seq_len", 2),
    ("lora_steps", 1),
    ("eval_max_tokens", 2),
    ("eval_doc_tokens", 2),
    ("eval_max_documents", 0),
  ):
    if getattr(opts, name) < low:
      raise SystemExit(f"{PROG}: error: --{name.replace('_', '-')} must be >= {low}")
  return opts
