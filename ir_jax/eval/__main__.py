"""`python -m ir_jax.eval`: held-out perplexity for every routing policy and sparsity.

    python -m ir_jax.eval --config configs/tiny.py --workdir runs/tiny \
        --policy informed,greedy,random,oracle,dense --sparsity 0.25,0.4,0.7 \
        --mode topk,causal --json runs/tiny/policies.json

writes the JSON (records, per-document losses; see ir_jax.eval.evaluate), prints
a table and writes a plot beside the JSON (same name, .png). With
`--target-mix news=0.8,wiki=0.2` (repeatable) it also estimates the curves on
those domain mixes from the same per-document losses (ir_jax.eval.shift):
printed, stored under "shift" in the JSON and plotted beside it (.shift.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import time
from typing import Iterable, Iterator

import numpy as np

from ir_jax import plotting
from ir_jax.config import ConfigError, refuse_remote
from ir_jax.config_file import load_config  # noqa: F401  (re-exported)
from ir_jax.data.config import DataConfig, DataError, FileSpec
from ir_jax.errors import cli_main
from ir_jax.eval import estimators as es
from ir_jax.eval import shift
from ir_jax.files import write_json
from ir_jax.progress import Heartbeat, Progress, doing

PROG = "ir_jax.eval"
DEFAULT_POLICIES = "informed,greedy,random,oracle,dense"
DEFAULT_SPARSITIES = "0.25,0.4,0.7"


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


def _is_files(spec: str) -> bool:
  return any(glob.glob(os.path.expanduser(p.strip())) for p in spec.split(",") if p.strip())


def _local_docs(dcfg: DataConfig, spec: str) -> tuple[list[tuple[str, str, str]], list[str]]:
  """Documents of comma-separated files/globs, read as the data pipeline reads them."""
  from ir_jax.data import sources

  cfg = dataclasses.replace(
    dcfg, name="local", files=tuple(FileSpec(p.strip()) for p in spec.split(",") if p.strip())
  )
  files = sources.resolve_files(cfg)
  stats = sources.Stats()
  try:
    docs = [
      (d.text, d.domain, d.source) for f in files for d in sources.read_documents(f, cfg, stats)
    ]
  except DataError as e:
    raise DataError(_eval_hint(str(e))) from None
  return docs, [str(f.path.resolve()) for f in files]


def _eval_hint(msg: str) -> str:
  """A data error's hint in the options this command has: it sets no data.* field, so an
  undecodable file is converted or read through a --config whose data section says how."""
  if "not valid UTF-8" not in msg:
    return msg
  return (
    msg.split(";")[0] + "; ir_jax.eval reads --data files as UTF-8 (Latin-1 where a file is "
    "known to be): convert it (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8), or give "
    "--config a config whose data section sets data.encoding_errors to 'replace' or 'skip'"
  )


TEXT_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".cor", ".md", ".gz", ".csv")


def _looks_like_a_file(spec: str) -> bool:
  """A missing path rather than a TFDS name (`c4/en` has a slash too, but no suffix and
  no leading `/`, `.` or `~`)."""
  if "," in spec or any(c in spec for c in "*?[") or os.path.exists(spec):
    return False
  return spec.lower().endswith(TEXT_SUFFIXES) or spec.startswith((".", os.sep, "~"))


def _split_docs(dcfg: DataConfig, split: str) -> Iterator[tuple[str, str, str]]:
  from ir_jax.data.builder import open_split

  src = open_split(dcfg, split, prepare_if_missing=True)
  for i in range(len(src)):
    text, domain = src.document(i)
    yield text, domain, f"{src.name}/{split}:{i}"


def _config_files(dcfg: DataConfig) -> list[str]:
  if dcfg.name != "local":
    return []
  from ir_jax.data import sources

  try:
    return [str(f.path.resolve()) for f in sources.resolve_files(dcfg)]
  except DataError:
    return []


def _trained_budget(workdir: str | None) -> float:
  """The executed-FLOPs budget a run was trained for (routing.flops in its run.json), or 0."""
  path = os.path.join(workdir, "run.json") if workdir else ""
  if not path or not os.path.isfile(path):
    return 0.0
  with open(path, encoding="utf-8") as f:
    stored = json.load(f).get("config") or {}
  return float((stored.get("routing") or {}).get("flops") or 0.0)


def _data_section(args: argparse.Namespace, model_path: str) -> tuple[DataConfig, str | None]:
  """The data section to evaluate with, and where it came from (for the JSON).

  --config wins; a --workdir falls back to the config stored in its run.json; a bare
  --model has no data section, so the held-out text (--data) and, for causal mode,
  the calibration text (--calibration-data) must be named.
  """
  from ir_jax.data.config import data_config, from_config

  if args.config:
    dcfg, desc = from_config(load_config(args.config)), os.path.abspath(args.config)
  elif args.workdir:
    with open(os.path.join(args.workdir, "run.json"), encoding="utf-8") as f:
      stored = json.load(f).get("config") or {}
    if "data" not in stored:
      raise ConfigError(
        f"--workdir {args.workdir}: its run.json stores no data section; pass --config"
      )
    ckpt = (stored.get("model") or {}).get("checkpoint") or ""
    dcfg = data_config(stored["data"], ckpt)
    desc = f"{os.path.abspath(os.path.join(args.workdir, 'run.json'))} (config of the run)"
  else:
    if args.data is None:
      raise ConfigError(
        "--model without --config: name the held-out text with --data "
        "(a model carries no evaluation split), or pass --config"
      )
    if "causal" in _split_list(args.mode, "mode") and not args.calibration_data:
      raise ConfigError(
        "--model without --config and --mode causal: name the calibration "
        "text with --calibration-data (there is no config train split)"
      )
    if _is_files(args.data):
      dcfg = DataConfig(files=tuple(FileSpec(x.strip()) for x in args.data.split(",") if x.strip()))
    elif _looks_like_a_file(args.data):  # named below, with the other --data errors
      dcfg = DataConfig(files=(FileSpec(args.data),))
    else:  # a TFDS name or prepared directory
      dcfg = DataConfig(name=args.data)
    desc = None
  if not dcfg.tokenizer:
    dcfg = dataclasses.replace(dcfg, tokenizer=model_path)
  return dcfg, desc


def main(argv: list[str] | None = None) -> int:
  # "  ... WHAT (Ns so far)" whenever the output has been quiet for 8 s (ir_jax.progress)
  with Heartbeat():
    return _main(argv)


def _main(argv: list[str] | None) -> int:
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
  args = p.parse_args(argv)

  policies = _split_list(args.policy, "policy")
  if args.sparsity is None and args.flops is None:
    trained = _trained_budget(args.workdir)
    args.sparsity, args.flops = ("", str(trained)) if trained else (DEFAULT_SPARSITIES, "")
  sparsities = _floats(args.sparsity) if (args.sparsity or "").strip() else []
  budgets = _floats(args.flops, "flops") if (args.flops or "").strip() else []
  modes = _split_list(args.mode, "mode")
  from ir_jax.eval import evaluate as ev

  mixes = [shift.parse_mix(t) for t in args.target_mix]
  if mixes:
    shift.parse_methods(args.estimator)

  todo = ev.settings(policies, sparsities, modes, budgets)
  for name in ("seq_len", "batch_size", "max_documents", "calibration_batches"):
    v = getattr(args, name)
    if v is not None and v < (2 if name == "seq_len" else 1):
      raise ConfigError(
        f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}, got {v}"
      )
  for flag in ("workdir", "model", "data", "calibration_data", "json"):
    refuse_remote(f"--{flag.replace('_', '-')}", getattr(args, flag))
  if args.workdir and not os.path.isfile(os.path.join(args.workdir, "run.json")):
    raise FileNotFoundError(
      f"--workdir {args.workdir}: no run.json; not an ir_jax.train run "
      "directory (use --model for checkpoints)"
    )
  model_path = args.workdir or args.model
  if not os.path.exists(model_path):
    raise FileNotFoundError(f"--model {model_path}: no such file or directory")
  if os.path.isdir(args.json):
    raise ConfigError(f"--json {args.json} is a directory; give a file name")

  from ir_jax.data.tokenize import load_text_tokenizer

  dcfg, config_desc = _data_section(args, model_path)
  seq_len = args.seq_len or dcfg.seq_len
  batch_size = args.batch_size or dcfg.batch_size
  tok = load_text_tokenizer(dcfg.tokenizer, dcfg.add_bos, dcfg.add_eos)

  eval_files: list[str] = []
  if args.data is None:
    texts: Iterable = _split_docs(dcfg, dcfg.eval_split)
    data_desc = f"{dcfg.name} split {dcfg.eval_split!r} of the config"
  elif _is_files(args.data):
    texts, eval_files = _local_docs(dcfg, args.data)
    data_desc = args.data
  elif _looks_like_a_file(args.data):
    raise FileNotFoundError(
      f"--data {args.data}: no such file (expected a text/JSONL file, a "
      "glob, a TFDS dataset name or a prepared dataset directory)"
    )
  elif "," not in args.data and not any(c in args.data for c in "*?["):
    texts = _split_docs(dataclasses.replace(dcfg, name=args.data), dcfg.eval_split)
    data_desc = f"{args.data} split {dcfg.eval_split!r}"
  else:
    raise FileNotFoundError(f"--data {args.data}: matches no file")
  with doing(f"reading and tokenizing {data_desc}"):
    docs = ev.tokenize_documents(texts, tok, args.max_documents)
  if not docs:
    raise DataError(f"--data {data_desc}: no documents")
  for text, mix in zip(args.target_mix, mixes):  # refused now, not after the evaluation
    try:
      es.domain_weights([d.domain for d in docs], mix)
    except es.EstimatorError as e:
      raise es.EstimatorError(f"--target-mix {text}: {e}") from None

  calibration = None
  calib_desc = None
  if any(s.mode == "causal" and s.policy != "dense" for s in todo):
    n_cal = args.calibration_batches
    if args.calibration_data:
      if not _is_files(args.calibration_data):
        raise FileNotFoundError(f"--calibration-data {args.calibration_data}: matches no file")
      cal_texts, cal_files = _local_docs(dcfg, args.calibration_data)
      overlap = sorted(set(cal_files) & set(eval_files))
      if overlap:
        raise ConfigError(
          f"--calibration-data overlaps the evaluated text ({overlap[0]}); calibrate on other text"
        )
      cal_docs = ev.tokenize_documents(cal_texts, tok)
      calib_desc = args.calibration_data

      def calibration():
        full, _ = ev.pack_documents(cal_docs, seq_len)
        if not len(full):
          raise DataError(
            f"--calibration-data {args.calibration_data}: fewer than --seq-len {seq_len} tokens"
          )
        rows = full.inputs[: n_cal * batch_size]
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
      overlap = sorted(set(eval_files) & set(_config_files(dcfg)))
      if overlap:
        raise ConfigError(
          f"--data {overlap[0]} is also training data of the config, so its "
          "train split would calibrate the thresholds on evaluated text; pass "
          "--calibration-data with other text"
        )
      calib_desc = f"{dcfg.name} split {dcfg.train_split!r} of the config"

      def calibration():
        from ir_jax.data.packing import PACK
        from ir_jax.data.pipeline import make_iterator

        it = make_iterator(
          dataclasses.replace(dcfg, seq_len=seq_len, batch_size=batch_size, prefetch=0),
          dcfg.train_split,
          mode=PACK,
          shuffle=False,
          num_epochs=None,
          tokenizer=tok,
          prepare_if_missing=True,
        )
        try:
          return [np.asarray(next(it)["inputs"]) for _ in range(n_cal)]
        finally:
          it.close()

  from ir_jax.api import load_model

  t0 = time.time()
  print(f"loading {model_path} ...", flush=True)
  with doing(f"loading {model_path}"):
    model = load_model(model_path)
  c = model.config
  n_tok = sum(len(d.tokens) for d in docs)
  print(
    f"loaded {model_path} ({c.num_layers} layers, d={c.hidden_size}) in "
    f"{time.time() - t0:.1f}s; evaluating {len(docs)} documents ({n_tok} tokens) of "
    f"{data_desc}, rows of {seq_len}, {len(todo)} settings",
    flush=True,
  )
  result = ev.evaluate(
    model,
    docs,
    todo,
    seq_len=seq_len,
    batch_size=batch_size,
    calibration=calibration,
    seed=args.seed,
    log=lambda s: print(s, flush=True),
    progress=lambda label, n: Progress(label, n, unit="batches"),
  )
  domains = sorted({d.domain for d in docs})
  result = {
    **result,
    "model": os.path.abspath(model_path),
    "config": config_desc,
    "data": data_desc,
    "tokenizer": dcfg.tokenizer,
    "calibration": calib_desc,
    "calibration_batches": args.calibration_batches if calib_desc else None,
    "domains": {d: sum(x.domain == d for x in docs) for d in domains},
  }
  estimated = shift.from_args(result, args)
  if estimated is not None:
    result["shift"] = estimated
  write_json(args.json, result)
  print(ev.table(result))
  if estimated is not None:
    print(shift.table(estimated))
  print(f"wrote {args.json}")
  if not args.no_plot:
    png = os.path.splitext(args.json)[0] + ".png"
    try:
      ev.plot(result, png, title=f"{os.path.basename(model_path)} on {data_desc}")
      print(f"wrote {png}")
      if estimated is not None:
        png = os.path.splitext(args.json)[0] + ".shift.png"
        shift.plot(
          result,
          estimated,
          png,
          title=f"{os.path.basename(model_path)}: estimated curves on the target mixes",
        )
        print(f"wrote {png}")
    except ImportError:
      print(f"{PROG}: {plotting.NO_MATPLOTLIB}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli_main(main, PROG)
