"""`python -m ir_jax.data {prepare,inspect} --config configs/X.py`: prepare and look at data;
`python -m ir_jax.data c4 --src SHARDS --out DIR`: the C4 release's json.gz shards -> a
prepared dataset (ir_jax.data.c4)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import ml_collections
import numpy as np

from ir_jax import config_file
from ir_jax.config import ConfigError
from ir_jax.data.c4 import prepare_c4
from ir_jax.data.config import DataConfig, DataError, from_config
from ir_jax.errors import cli_main

PROG = "python -m ir_jax.data"


def load_config(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
  """`get_config()` of a config file with `SECTION.FIELD=VALUE` overrides applied.

  The data section is completed with DataConfig's defaults first, so a field the
  file leaves out can be listed (--show-config) and overridden like any other.
  """
  import dataclasses

  cfg = config_file.load_config(path)
  if "data" in cfg and hasattr(cfg.data, "to_dict"):
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
    with cfg.unlocked():
      cfg.data = ml_collections.ConfigDict({**defaults, **cfg.data.to_dict()})
  return config_file.apply_overrides(cfg, list(overrides))


def _data_config(args: argparse.Namespace):
  cfg = load_config(args.config, args.overrides)
  dcfg = from_config(cfg)
  if args.data_dir:
    import dataclasses

    dcfg = dataclasses.replace(dcfg, data_dir=args.data_dir)
  return dcfg


def cmd_prepare(args: argparse.Namespace) -> int:
  # tensorflow_datasets and grain load only for the commands that read data
  from ir_jax.data.builder import prepare

  dcfg = _data_config(args)
  t0 = time.time()
  path = prepare(dcfg, verbose=True)
  print(f"done in {time.time() - t0:.1f}s: {path}")
  return 0


def cmd_inspect(args: argparse.Namespace) -> int:
  from ir_jax.data.builder import open_split, read_stats
  from ir_jax.data.pipeline import make_iterator
  from ir_jax.data.tokenize import load_text_tokenizer

  dcfg = _data_config(args)
  split = args.split or dcfg.train_split
  source = open_split(dcfg, split)
  print(f"dataset {source.name} at {source.path}")
  print(f"split {split!r}: {len(source)} documents, domains {list(source.domains)}")
  stats = read_stats(source.path)
  if stats:
    print("prepare stats:", json.dumps(stats.get("counts", {})))
  tok = load_text_tokenizer(dcfg.tokenizer, dcfg.add_bos, dcfg.add_eos)
  print(
    f"tokenizer {tok.source}: vocab {tok.vocab_size}, BOS ids {list(tok.prefix)}, "
    f"EOS ids {list(tok.suffix)}"
  )
  it = make_iterator(
    dcfg,
    split,
    mode=args.mode,
    shuffle=args.mode == "pack",
    num_epochs=1,
    tokenizer=tok,
    process_index=0,
    process_count=1,
  )
  t0, tokens, slots = time.time(), 0, 0
  batch: dict[str, np.ndarray] = {}
  for i in range(args.batches):
    try:
      batch = it.next_local()
    except StopIteration:
      break
    tokens += int((batch["segment_ids"] > 0).sum())
    slots += batch["segment_ids"].size
    if i == 0:
      print("batch:", {k: f"{v.dtype}{list(v.shape)}" for k, v in batch.items()})
      row = batch["inputs"][0][batch["segment_ids"][0] > 0]
      print(
        f"row 0 has {int(batch['segment_ids'][0].max())} segments; starts: {tok.decode(row[:48])!r}"
      )
  dt = time.time() - t0
  if slots:
    print(
      f"{slots // dcfg.seq_len} rows: {tokens} tokens, fill {tokens / slots:.1%}, "
      f"{tokens / max(dt, 1e-9):,.0f} tokens/s"
    )
  it.close()
  return 0


def cmd_c4(args: argparse.Namespace) -> int:
  t0 = time.time()
  path = prepare_c4(args.src, args.out, validation_fraction=args.validation_fraction)
  print(f"done in {time.time() - t0:.1f}s: {path}")
  print(f"train on it with --config.data.name={path} (or a copy of it: the whole directory)")
  return 0


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog=PROG,
    description="Prepare the dataset a config's `data` section names (local text files -> "
    "TFDS array_record under data.data_dir; catalogue datasets need network), or "
    "inspect a prepared one.",
  )
  sub = p.add_subparsers(dest="command", required=True)

  def common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
      "--config", required=True, help="a configs/*.py file with get_config() and a `data` section"
    )
    sp.add_argument(
      "--show-config",
      action="store_true",
      help="print every field of --config with its value (after overrides) and "
      "exit; override any with --config.SECTION.FIELD=V, e.g. "
      "--config.data.seq_len=128 (repeatable)",
    )
    sp.add_argument("--data-dir", default=None, help="override data.data_dir")

  sp = sub.add_parser(
    "prepare",
    help="read, validate and write the dataset (no-op if done)",
    description="Scan data.files (counting skipped input), split documents "
    "into train/validation by content hash, and write both as "
    "array_record under data.data_dir.",
  )
  common(sp)
  sp.set_defaults(fn=cmd_prepare)
  sp = sub.add_parser(
    "inspect",
    help="print stats, tokenizer and a few batches of a split",
    description="Read a prepared split through the pipeline (one process) "
    "and print its documents, domains, tokenizer and batch fill.",
  )
  common(sp)
  sp.add_argument("--split", default=None, help="split name (default: data.train_split)")
  sp.add_argument(
    "--mode",
    choices=("pack", "pad"),
    default="pack",
    help="pack rows (training) or pad one document piece per row (evaluation)",
  )
  sp.add_argument("--batches", type=int, default=4, help="batches to read (default 4)")
  sp.set_defaults(fn=cmd_inspect)
  sp = sub.add_parser(
    "c4",
    help="C4 release shards (*.json.gz) -> a prepared dataset for data.name",
    description="Decompress C4 shards as the public release ships them (gzipped JSON "
    'lines {"text", "timestamp", "url"}, e.g. en/c4-train.00000-of-01024.json.gz) to '
    "OUT/jsonl, prepare them as array_record under OUT/tfds (train/validation split "
    "by text hash) and print the directory to pass as data.name. Rerunning resumes. "
    "Nothing is downloaded: fetch the shards first.",
  )
  sp.add_argument(
    "--src",
    required=True,
    action="append",
    metavar="PATH",
    help="a shard, a directory of shards or a glob (quote it); repeatable",
  )
  sp.add_argument("--out", required=True, metavar="DIR", help="output directory")
  sp.add_argument(
    "--validation-fraction",
    type=float,
    default=0.05,
    help="share of documents (by text hash) in the validation split (default 0.05)",
  )
  sp.set_defaults(fn=cmd_c4)
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--set" in argv or any(a.startswith("--set=") for a in argv):
    raise ConfigError(
      "--set is gone: override config fields as every entry point does, "
      "--config.SECTION.FIELD=V (e.g. --config.data.seq_len=128)"
    )
  rest, overrides = config_file.split_overrides(argv)
  args = p.parse_args(rest)
  args.overrides = overrides
  if getattr(args, "show_config", False):
    cfg = load_config(args.config, overrides)
    print(f"config fields of {args.config} (override with --config.SECTION.FIELD=V):")
    print("\n".join(config_file.config_lines(cfg)))
    return 0
  return args.fn(args)


def _run() -> int:
  try:
    return main()
  except DataError as e:  # not (yet) in ir_jax.errors.USER_ERRORS
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  cli_main(_run, PROG)
