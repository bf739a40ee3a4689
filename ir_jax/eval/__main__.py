"""`python -m ir_jax.eval`: held-out perplexity for every routing policy and sparsity.

    python -m ir_jax.eval --config configs/tiny.py --workdir runs/tiny \
        --policy informed,greedy,random,oracle,dense --sparsity 0.25,0.4,0.7 \
        --mode topk,causal --json runs/tiny/policies.json

writes the JSON (records, per-document losses; see ir_jax.eval.evaluate), prints
a table and writes a plot beside the JSON (same name, .png). With
`--target-mix news=0.8,wiki=0.2` (repeatable) it also estimates the curves on
those domain mixes from the same per-document losses (ir_jax.eval.shift):
printed, stored under "shift" in the JSON and plotted beside it (.shift.png).

This module is the command line only: the run is `ir_jax.eval.runner` (checks, model,
evaluation, outputs) over `ir_jax.eval.documents` (held-out and calibration text).
"""

from __future__ import annotations

import argparse
from typing import Any

from ir_jax.config import ConfigError
from ir_jax.errors import cli_main
from ir_jax.eval import shift
from ir_jax.progress import Heartbeat

# ir_jax.data.config.SPLIT_MODES, spelled out: importing ir_jax.data loads JAX, and --help
# stays quick without it.
SPLIT_MODES = ("file", "blank_lines", "lines")

PROG = "ir_jax.eval"
DEFAULT_POLICIES = "informed,greedy,random,oracle,dense"
DEFAULT_SPARSITIES = "0.25,0.4,0.7"  # runner.DEFAULT_SPARSITIES


def _split_list(text: str, what: str) -> list[str]:
  items = [s.strip() for s in text.split(",") if s.strip()]
  if not items:
    raise ConfigError(f"--{what} is empty")
  return items


def _floats(text: str, what: str = "sparsity") -> list[float]:
  out = []
  for s in _split_list(text, what):
    try:
      out.append(float(s))
    except ValueError:
      raise ConfigError(f"--{what}: {s!r} is not a number") from None
  return out


def main(argv: list[str] | None = None) -> int:
  # "  ... WHAT (Ns so far)" whenever the output has been quiet for 8 s (ir_jax.progress)
  with Heartbeat():
    return _main(argv)


def parser() -> argparse.ArgumentParser:
  """The command line of `python -m ir_jax.eval`."""
  p = argparse.ArgumentParser(
    prog="python -m ir_jax.eval",
    description="Held-out perplexity of a routed model for every policy x sparsity x routing "
    "mode. Documents are packed into full rows of --seq-len tokens (one segment "
    "per document piece; the remainder is one shorter row), so top-k capacity "
    "applies to real tokens only. Writes --json (one record per setting, with "
    "realized sparsity, executed-FLOPs fraction, token count and per-document "
    "NLL sums), prints a table, and writes a plot beside the JSON (.png).",
  )
  p.add_argument(
    "--config",
    default=None,
    help="config file (configs/*.py): its data section gives the tokenizer, eval "
    "split, seq_len and batch_size (default: the config a --workdir was "
    "trained with; with --model and no config, the model's tokenizer and "
    "--data is required)",
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument(
    "--workdir", help="an ir_jax.train run directory: base weights + trained forecasters/routers"
  )
  src.add_argument(
    "--model",
    help="anything ir_jax.load_model takes: ir_jax checkpoint dir, "
    "train workdir, HF directory, .gguf",
  )
  p.add_argument(
    "--data",
    default=None,
    help="held-out text: a text/JSONL file or glob, or several comma separated "
    "(every document is evaluated), or a TFDS dataset name / prepared "
    "directory (its eval split); default: the config's data eval split",
  )
  p.add_argument(
    "--split-mode",
    choices=SPLIT_MODES,  # = ir_jax.data.config.SPLIT_MODES (tests/eval_test.py checks)
    default=None,
    help="how a .txt/.text/.md file given to --data becomes documents: file (the whole "
    "file is one document), blank_lines (each block between blank lines is one), lines "
    "(each non-empty line is one); JSONL files always give one document per line "
    "(default: the config's data.split_mode, file unless the config says otherwise)",
  )
  p.add_argument(
    "--policy",
    default=DEFAULT_POLICIES,
    help=f"comma-separated policies (default {DEFAULT_POLICIES}); dense is "
    "evaluated once, at sparsity 0",
  )
  p.add_argument(
    "--sparsity",
    default=None,
    help=f"comma-separated fractions of (token, unit) pairs approximated (default: a "
    f"--workdir trained for a FLOPs budget is evaluated at that budget alone; otherwise "
    f"{DEFAULT_SPARSITIES})",
  )
  p.add_argument(
    "--flops",
    default=None,
    help="comma-separated executed-FLOPs budgets (fractions of dense, forecasters and "
    "routers included), beside --sparsity: the model's trained capacity table moved to "
    "each budget (the model needs one). Give --sparsity '' to evaluate budgets only",
  )
  p.add_argument(
    "--mode",
    default="topk",
    help="comma-separated routing modes: topk (k = round(capacity x row length) "
    "per row) and/or causal (calibrated per-unit thresholds; what decoding "
    "uses) (default topk)",
  )
  p.add_argument(
    "--calibration-data",
    default=None,
    help="text/JSONL file(s) or globs for the causal-mode thresholds; must not be "
    "the evaluated text (default: the config's train split)",
  )
  p.add_argument(
    "--calibration-batches",
    type=int,
    default=4,
    help="batches of --batch-size x --seq-len tokens for calibration (default 4)",
  )
  p.add_argument("--seq-len", type=int, default=None, help="row length (default data.seq_len)")
  p.add_argument(
    "--batch-size", type=int, default=None, help="rows per forward (default data.batch_size)"
  )
  p.add_argument(
    "--max-documents",
    type=int,
    default=None,
    help="evaluate only the first N documents (default all)",
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the random policy (default 0)")
  p.add_argument("--json", required=True, help="output JSON path; the plot goes beside it (.png)")
  shift_group = p.add_argument_group(
    "data shift",
    "estimate the curves on other domain mixes from this one evaluation "
    "(likelihood-ratio reweighting of the per-document losses; see "
    "docs/estimators.md); also `python -m ir_jax.eval.shift` on a saved JSON",
  )
  shift.add_arguments(shift_group)
  p.add_argument("--no-plot", action="store_true", help="do not write the .png plot")
  return p


def _main(argv: list[str] | None) -> int:
  args = parser().parse_args(argv)
  options = request_options(args)
  # The library (JAX, the data pipeline) loads after the options parse, so --help is quick.
  from ir_jax.eval import runner

  req = runner.EvalRequest(**options)
  result = runner.run(req)
  runner.write_outputs(result, req.json_path, shift.from_args(result, args), not args.no_plot)
  return 0


def request_options(args: argparse.Namespace) -> dict[str, Any]:
  """The parsed options as `ir_jax.eval.runner.EvalRequest` fields; lists and mixes checked.
  No --sparsity and no --flops leaves both None: the run's trained budget, else the
  default sparsities."""
  policies = _split_list(args.policy, "policy")
  both_unset = args.sparsity is None and args.flops is None
  sparsities = _floats(args.sparsity) if (args.sparsity or "").strip() else []
  budgets = _floats(args.flops, "flops") if (args.flops or "").strip() else []
  modes = _split_list(args.mode, "mode")
  mixes = [shift.parse_mix(t) for t in args.target_mix]
  if mixes:
    shift.parse_methods(args.estimator)
  return dict(
    json_path=args.json,
    workdir=args.workdir,
    model=args.model,
    config=args.config,
    data=args.data,
    policies=policies,
    sparsities=None if both_unset else sparsities,
    budgets=None if both_unset else budgets,
    modes=modes,
    calibration_data=args.calibration_data,
    calibration_batches=args.calibration_batches,
    seq_len=args.seq_len,
    batch_size=args.batch_size,
    max_documents=args.max_documents,
    split_mode=args.split_mode,
    seed=args.seed,
    target_mixes=list(zip(args.target_mix, mixes)),
  )


if __name__ == "__main__":
  cli_main(main, PROG)
