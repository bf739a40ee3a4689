"""One evaluation run as `python -m ir_jax.eval` does it: check the request, read and
tokenize the documents, build the calibration, load the model, evaluate, write the outputs.

`EvalRequest` holds the parsed options; `run` returns the result dictionary (the JSON's
content, `ir_jax.eval.evaluate` records plus where everything came from); `write_outputs`
writes the JSON, prints the tables and draws the plots. Errors name the command-line flag
a user set, since this is what that command runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from ir_jax import plotting
from ir_jax.api import load_model
from ir_jax.config import ConfigError, refuse_remote
from ir_jax.data.config import DataError
from ir_jax.data.tokenize import load_text_tokenizer
from ir_jax.eval import documents, shift
from ir_jax.eval import evaluate as ev
from ir_jax.eval.domain_mix import domain_weights
from ir_jax.eval.estimator_inputs import EstimatorError
from ir_jax.files import write_json
from ir_jax.progress import Progress, doing

PROG = "ir_jax.eval"
DEFAULT_SPARSITIES = (0.25, 0.4, 0.7)  # without a trained FLOPs budget


@dataclasses.dataclass(frozen=True)
class EvalRequest:
  """The options of one evaluation (the flags of `python -m ir_jax.eval`, parsed)."""

  json_path: str
  workdir: str | None = None  # an ir_jax.train run directory, or
  model: str | None = None  # anything ir_jax.load_model takes
  config: str | None = None
  data: str | None = None
  policies: Sequence[str] = ("informed",)
  # Both None: the budget a --workdir was trained for, else DEFAULT_SPARSITIES.
  sparsities: Sequence[float] | None = None
  budgets: Sequence[float] | None = None  # executed-FLOPs fractions
  modes: Sequence[str] = ("topk",)
  calibration_data: str | None = None
  calibration_batches: int = 4
  seq_len: int | None = None
  batch_size: int | None = None
  max_documents: int | None = None
  split_mode: str | None = None  # how --data text files split into documents (None: config's)
  seed: int = 0
  target_mixes: Sequence[tuple[str, dict[str, float]]] = ()  # (as given, parsed)

  @property
  def model_path(self) -> str:
    return self.workdir or self.model or ""


def check(req: EvalRequest) -> list[ev.Setting]:
  """The settings to evaluate; refuses bad sizes, remote paths and missing inputs."""
  sparsities, budgets = req.sparsities, req.budgets
  if sparsities is None and budgets is None:
    trained = documents.trained_budget(req.workdir)
    sparsities, budgets = ((), (trained,)) if trained else (DEFAULT_SPARSITIES, ())
  todo = ev.settings(req.policies, sparsities or (), req.modes, budgets or ())
  for name in ("seq_len", "batch_size", "max_documents", "calibration_batches"):
    v = getattr(req, name)
    if v is not None and v < (2 if name == "seq_len" else 1):
      raise ConfigError(
        f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}, got {v}"
      )
  for flag in ("workdir", "model", "data", "calibration_data", "json_path"):
    refuse_remote(f"--{flag.removesuffix('_path').replace('_', '-')}", getattr(req, flag))
  if req.workdir and not os.path.isfile(os.path.join(req.workdir, "run.json")):
    raise FileNotFoundError(
      f"--workdir {req.workdir}: no run.json; not an ir_jax.train run "
      "directory (use --model for checkpoints)"
    )
  if not os.path.exists(req.model_path):
    raise FileNotFoundError(f"--model {req.model_path}: no such file or directory")
  if os.path.isdir(req.json_path):
    raise ConfigError(f"--json {req.json_path} is a directory; give a file name")
  return todo


Calibration = Callable[[], list[np.ndarray]]


def calibration(
  req: EvalRequest,
  dcfg: Any,
  tok: Any,
  eval_files: list[str],
  seq_len: int,
  batch_size: int,
) -> tuple[Calibration, str]:
  """The causal-mode calibration batches (built when first needed) and their description:
  --calibration-data files, or the data section's train split; never the evaluated text."""
  n_cal = req.calibration_batches
  if req.calibration_data:
    if not documents.is_files(req.calibration_data):
      raise FileNotFoundError(f"--calibration-data {req.calibration_data}: matches no file")
    cal_texts, cal_files = documents.local_docs(dcfg, req.calibration_data)
    overlap = sorted(set(cal_files) & set(eval_files))
    if overlap:
      raise ConfigError(
        f"--calibration-data overlaps the evaluated text ({overlap[0]}); calibrate on other text"
      )
    cal_docs = ev.tokenize_documents(cal_texts, tok)

    def from_files() -> list[np.ndarray]:
      full, _ = ev.pack_documents(cal_docs, seq_len)
      if not len(full):
        raise DataError(
          f"--calibration-data {req.calibration_data}: fewer than --seq-len {seq_len} tokens"
        )
      rows = full.inputs[: n_cal * batch_size]
      return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]

    return from_files, req.calibration_data
  overlap = sorted(set(eval_files) & set(documents.config_files(dcfg)))
  if overlap:
    raise ConfigError(
      f"--data {overlap[0]} is also training data of the config, so its "
      "train split would calibrate the thresholds on evaluated text; pass "
      "--calibration-data with other text"
    )
  desc = f"{dcfg.name} split {dcfg.train_split!r} of the config"
  return lambda: documents.split_calibration(dcfg, tok, seq_len, batch_size, n_cal), desc


def plural(n: int, noun: str) -> str:
  """`1 document`, `2 documents`, `0 documents`."""
  return f"{n} {noun}" + ("" if n == 1 else "s")


def run(req: EvalRequest) -> dict[str, Any]:
  """Evaluate `req` (printing progress) and return the result (what the JSON holds)."""
  todo = check(req)
  model_path = req.model_path
  dcfg, config_desc = documents.data_section(
    model_path,
    config=req.config,
    workdir=req.workdir,
    data=req.data,
    calibration_data=req.calibration_data,
    modes=req.modes,
  )
  seq_len = req.seq_len or dcfg.seq_len
  batch_size = req.batch_size or dcfg.batch_size
  tok = load_text_tokenizer(dcfg.tokenizer, dcfg.add_bos, dcfg.add_eos)
  if req.split_mode:
    dcfg = dataclasses.replace(dcfg, split_mode=req.split_mode)

  texts, data_desc, eval_files = documents.heldout_texts(dcfg, req.data)
  with doing(f"reading and tokenizing {data_desc}"):
    docs = ev.tokenize_documents(texts, tok, req.max_documents)
  if not docs:
    raise DataError(f"--data {data_desc}: no documents")
  for text, mix in req.target_mixes:  # refused now, not after the evaluation
    try:
      domain_weights([d.domain for d in docs], mix)
    except EstimatorError as e:
      raise EstimatorError(f"--target-mix {text}: {e}") from None

  calibrate, calib_desc = None, None
  if any(s.mode == "causal" and s.policy != "dense" for s in todo):
    calibrate, calib_desc = calibration(req, dcfg, tok, eval_files, seq_len, batch_size)

  t0 = time.time()
  print(f"loading {model_path} ...", flush=True)
  with doing(f"loading {model_path}"):
    model = load_model(model_path)
  c = model.config
  n_tok = sum(len(d.tokens) for d in docs)
  print(
    f"loaded {model_path} ({c.num_layers} layers, d={c.hidden_size}) in "
    f"{time.time() - t0:.1f}s; evaluating {plural(len(docs), 'document')} "
    f"({plural(n_tok, 'token')}) of {data_desc}, rows of {seq_len}, "
    f"{plural(len(todo), 'setting')}",
    flush=True,
  )
  if eval_files and dcfg.split_mode == "file" and len(docs) < 2:
    print(
      "  (a text file is one document: --split-mode blank_lines makes each paragraph "
      "one, --split-mode lines each line; the interval over documents needs several)",
      flush=True,
    )
  result = ev.evaluate(
    model,
    docs,
    todo,
    seq_len=seq_len,
    batch_size=batch_size,
    calibration=calibrate,
    seed=req.seed,
    log=lambda s: print(s, flush=True),
    progress=lambda label, n: Progress(label, n, unit="batches"),
  )
  domains = sorted({d.domain for d in docs})
  return {
    **result,
    "model": os.path.abspath(model_path),
    "config": config_desc,
    "data": data_desc,
    "tokenizer": dcfg.tokenizer,
    "calibration": calib_desc,
    "calibration_batches": req.calibration_batches if calib_desc else None,
    "domains": {d: sum(x.domain == d for x in docs) for d in domains},
  }


def write_outputs(
  result: dict[str, Any],
  json_path: str,
  estimated: dict[str, Any] | None = None,
  plot: bool = True,
) -> None:
  """Write the JSON (with the shift estimates under "shift"), print the tables, and draw
  the plots beside the JSON (.png, .shift.png); a missing matplotlib is a warning."""
  if estimated is not None:
    result["shift"] = estimated
  write_json(json_path, result)
  print(ev.table(result))
  if estimated is not None:
    print(shift.table(estimated))
  print(f"wrote {json_path}")
  if not plot:
    return
  name = os.path.basename(result["model"])
  png = os.path.splitext(json_path)[0] + ".png"
  try:
    ev.plot(result, png, title=f"{name} on {result['data']}")
    print(f"wrote {png}")
    if estimated is not None:
      png = os.path.splitext(json_path)[0] + ".shift.png"
      shift.plot(result, estimated, png, title=f"{name}: estimated curves on the target mixes")
      print(f"wrote {png}")
  except ImportError:
    print(f"{PROG}: {plotting.NO_MATPLOTLIB}", file=sys.stderr)
