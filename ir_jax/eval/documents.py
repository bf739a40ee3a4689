"""The documents an evaluation reads: held-out text, its data section, calibration batches.

Held-out text is named three ways (see `python -m ir_jax.eval --help`): files or globs
(`local_docs`, read as the data pipeline reads them), a TFDS dataset name or prepared
directory (`split_docs`), or the data section of a config or run (`data_section`).
Every reader yields `(text, domain, source)` triples for
`ir_jax.eval.evaluate.tokenize_documents`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from ir_jax.config import ConfigError
from ir_jax.config_file import load_config
from ir_jax.data import sources
from ir_jax.data.builder import open_split
from ir_jax.data.config import DataConfig, DataError, FileSpec, data_config, from_config
from ir_jax.data.packing import PACK
from ir_jax.data.pipeline import make_iterator
from ir_jax.data.tokenize import TextTokenizer

TEXT_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".cor", ".md", ".gz", ".csv")

Texts = Iterable[tuple[str, str, str]]  # (text, domain, source)


def is_files(spec: str) -> bool:
  """Whether some comma-separated path or glob of `spec` matches a file."""
  return any(glob.glob(os.path.expanduser(p.strip())) for p in spec.split(",") if p.strip())


def looks_like_a_file(spec: str) -> bool:
  """A missing path rather than a TFDS name (`c4/en` has a slash too, but no suffix and
  no leading `/`, `.` or `~`)."""
  if "," in spec or any(c in spec for c in "*?[") or os.path.exists(spec):
    return False
  return spec.lower().endswith(TEXT_SUFFIXES) or spec.startswith((".", os.sep, "~"))


def eval_hint(msg: str) -> str:
  """A data error's hint in the options ir_jax.eval has: it sets no data.* field, so an
  undecodable file is converted or read through a --config whose data section says how."""
  if "not valid UTF-8" not in msg:
    return msg
  return (
    msg.split(";")[0] + "; ir_jax.eval reads --data files as UTF-8 (Latin-1 where a file is "
    "known to be): convert it (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8), or give "
    "--config a config whose data section sets data.encoding_errors to 'replace' or 'skip'"
  )


def local_docs(dcfg: DataConfig, spec: str) -> tuple[list[tuple[str, str, str]], list[str]]:
  """Documents of comma-separated files/globs, read as the data pipeline reads them, and
  the resolved paths of those files."""
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
    raise DataError(eval_hint(str(e))) from None
  return docs, [str(f.path.resolve()) for f in files]


def split_docs(dcfg: DataConfig, split: str) -> Iterator[tuple[str, str, str]]:
  """Documents of one split of the data section's dataset (prepared when missing)."""
  src = open_split(dcfg, split, prepare_if_missing=True)
  for i in range(len(src)):
    text, domain = src.document(i)
    yield text, domain, f"{src.name}/{split}:{i}"


def config_files(dcfg: DataConfig) -> list[str]:
  """The resolved training files of a local data section ([] for a TFDS one)."""
  if dcfg.name != "local":
    return []
  try:
    return [str(f.path.resolve()) for f in sources.resolve_files(dcfg)]
  except DataError:
    return []


def _stored_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "run.json"), encoding="utf-8") as f:
    return json.load(f).get("config") or {}


def trained_budget(workdir: str | None) -> float:
  """The executed-FLOPs budget a run was trained for (routing.flops in its run.json), or 0."""
  path = os.path.join(workdir, "run.json") if workdir else ""
  if not path or not os.path.isfile(path):
    return 0.0
  return float((_stored_config(workdir).get("routing") or {}).get("flops") or 0.0)


def data_section(
  model_path: str,
  *,
  config: str | None = None,
  workdir: str | None = None,
  data: str | None = None,
  calibration_data: str | None = None,
  modes: Sequence[str] = ("topk",),
) -> tuple[DataConfig, str | None]:
  """The data section to evaluate with, and where it came from (for the JSON).

  `config` wins; a `workdir` falls back to the config stored in its run.json; a bare
  model has no data section, so the held-out text (`data`) and, for causal mode, the
  calibration text (`calibration_data`) must be named. The tokenizer defaults to the
  model's.
  """
  if config:
    dcfg, desc = from_config(load_config(config)), os.path.abspath(config)
  elif workdir:
    stored = _stored_config(workdir)
    if "data" not in stored:
      raise ConfigError(f"--workdir {workdir}: its run.json stores no data section; pass --config")
    ckpt = (stored.get("model") or {}).get("checkpoint") or ""
    dcfg = data_config(stored["data"], ckpt)
    desc = f"{os.path.abspath(os.path.join(workdir, 'run.json'))} (config of the run)"
  else:
    if data is None:
      raise ConfigError(
        "--model without --config: name the held-out text with --data "
        "(a model carries no evaluation split), or pass --config"
      )
    if "causal" in modes and not calibration_data:
      raise ConfigError(
        "--model without --config and --mode causal: name the calibration "
        "text with --calibration-data (there is no config train split)"
      )
    if is_files(data):
      dcfg = DataConfig(files=tuple(FileSpec(x.strip()) for x in data.split(",") if x.strip()))
    elif looks_like_a_file(data):  # named by heldout_texts, with the other --data errors
      dcfg = DataConfig(files=(FileSpec(data),))
    else:  # a TFDS name or prepared directory
      dcfg = DataConfig(name=data)
    desc = None
  if not dcfg.tokenizer:
    dcfg = dataclasses.replace(dcfg, tokenizer=model_path)
  return dcfg, desc


def heldout_texts(dcfg: DataConfig, data: str | None) -> tuple[Texts, str, list[str]]:
  """The evaluated documents: the data section's eval split (`data` None), files or globs,
  or a TFDS name / prepared directory; with a description and the files read."""
  if data is None:
    return (
      split_docs(dcfg, dcfg.eval_split),
      f"{dcfg.name} split {dcfg.eval_split!r} of the config",
      [],
    )
  if is_files(data):
    texts, files = local_docs(dcfg, data)
    return texts, data, files
  if looks_like_a_file(data):
    raise FileNotFoundError(
      f"--data {data}: no such file (expected a text/JSONL file, a "
      "glob, a TFDS dataset name or a prepared dataset directory)"
    )
  if "," not in data and not any(c in data for c in "*?["):
    texts = split_docs(dataclasses.replace(dcfg, name=data), dcfg.eval_split)
    return texts, f"{data} split {dcfg.eval_split!r}", []
  raise FileNotFoundError(f"--data {data}: matches no file")


def split_calibration(
  dcfg: DataConfig, tok: TextTokenizer, seq_len: int, batch_size: int, n_batches: int
) -> list[np.ndarray]:
  """`n_batches` packed batches of the data section's train split, in order."""
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
    return [np.asarray(next(it)["inputs"]) for _ in range(n_batches)]
  finally:
    it.close()
