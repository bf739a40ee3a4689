"""The run directory (--workdir) of ir_jax.train: checks, base weights, run.json, the result.

The layout and the readers that need no training code (`read_run`, `stage_dir`,
`RUN_FILE`, and `run_result` / `load_run_model`, the model a run produced) live in
`ir_jax.rundir`, and are importable from here too.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from typing import Any

import jax

from ir_jax import checkpoint as model_ckpt
from ir_jax.config import ConfigError, LlamaConfig
from ir_jax.convert import import_weights
from ir_jax.data.builder import catalogue_ready
from ir_jax.data.config import LOCAL
from ir_jax.files import write_json
from ir_jax.progress import log
from ir_jax.rundir import RUN_FILE, RUN_FORMAT, RUN_VERSION, read_run, stage_dir  # noqa: F401
from ir_jax.rundir.result import load_run_model, run_result  # noqa: F401  (also from here)
from ir_jax.rundir.state import ADAPTER_FIELDS, SHAPE_FIELDS, shape_diff
from ir_jax.train.config import Settings


def barrier(name: str) -> None:
  """Waits for every process (process 0 alone writes the workdir's shared files)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"ir_jax.train.{name}")


def check_renames(workdir: str) -> None:
  """Refuses (ConfigError) a workdir whose filesystem cannot rename a directory.

  Orbax commits a checkpoint step by renaming its temporary directory to `<N>`. A
  gcsfuse mount of a flat bucket refuses that unless mounted with --rename-dir-limit (a
  bucket with hierarchical namespace renames folders natively), and the run would
  train up to its first checkpoint before failing. So a directory with a file in a
  subdirectory is created in the workdir (or its nearest existing parent), renamed and
  removed. Where the probe cannot even be created nothing is said: the run's own writes
  report that.
  """
  base = os.path.abspath(workdir)
  while not os.path.isdir(base):
    parent = os.path.dirname(base)
    if parent == base:
      return
    base = parent
  probe = os.path.join(base, f".ir_jax_rename_probe.{socket.gethostname()}.{os.getpid()}")
  try:
    os.makedirs(os.path.join(probe, "a", "d"))
    with open(os.path.join(probe, "a", "d", "f"), "w", encoding="utf-8") as f:
      f.write("x")
  except OSError:
    shutil.rmtree(probe, ignore_errors=True)
    return
  try:
    os.rename(os.path.join(probe, "a"), os.path.join(probe, "b"))
  except OSError as e:
    raise ConfigError(
      f"--workdir {workdir}: its filesystem cannot rename a directory ({e.strerror or e}), "
      "which every checkpoint commit needs; on a gcsfuse mount use a bucket with "
      "hierarchical namespace or mount with --rename-dir-limit=200000 (docs/scaling.md)"
    ) from None
  finally:
    shutil.rmtree(probe, ignore_errors=True)


def check_workdir(workdir: str, s: Settings) -> dict[str, Any] | None:
  """The existing run.json, after checking it trains the same model; None if fresh.

  Also refuses a workdir on a filesystem that cannot commit orbax checkpoints
  (`check_renames`)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} exists and is not a directory")
  check_renames(workdir)
  meta = read_run(workdir)
  if meta is None:
    if os.path.isdir(workdir) and os.path.isdir(os.path.join(workdir, "checkpoints")):
      raise ConfigError(
        f"{workdir} holds checkpoints but no {RUN_FILE}; it is not a run this "
        "version wrote. Choose an empty --workdir"
      )
    return None
  try:
    old = LlamaConfig.from_dict(meta["model"])
  except (ConfigError, KeyError, TypeError) as e:
    raise ConfigError(f"{workdir}/{RUN_FILE}: bad model config ({e})") from None
  diff = shape_diff(old, s.model, SHAPE_FIELDS + ADAPTER_FIELDS)
  if diff:
    raise ConfigError(
      f"--workdir {workdir} holds a run of a different model ({', '.join(diff)}); "
      "choose another --workdir or the config it was started with"
    )
  if meta.get("stages") != list(s.train.stage_list):
    raise ConfigError(
      f"--workdir {workdir} was started with train.stages "
      f"{','.join(meta.get('stages') or [])!r}, now {s.train.stages!r}; "
      "choose another --workdir"
    )
  return meta


def check_data_ready(s: Settings) -> None:
  """Every catalogue dataset a stage reads is prepared (local text is prepared on use)."""
  seen = set()
  for stage in s.train.stage_list:
    data = s.stage_data(stage)
    if data.name != LOCAL and (data.name, data.data_dir) not in seen:
      seen.add((data.name, data.data_dir))
      catalogue_ready(data)


def resolve_base(s: Settings, workdir: str) -> dict[str, Any]:
  """Where the base weights come from: {"kind": "checkpoint", "path"} or {"kind": "random"}.

  A GGUF file or HF directory in model.checkpoint is imported once into
  `workdir/base` by a single-process run; a multi-process job refuses to (ConfigError,
  saying how to import it beforehand) unless `workdir/base` is already there.
  """
  if s.train.init_from:
    other = read_run(s.train.init_from)
    if other is None:
      raise FileNotFoundError(
        f"train.init_from={s.train.init_from}: no {RUN_FILE}; expected the "
        "--workdir of a finished ir_jax.train run"
      )
    return dict(other["base"])
  src = s.model_checkpoint
  if not src:
    if not s.model_random_init:
      raise ConfigError(
        "model.checkpoint is empty: point it at an ir_jax checkpoint, a "
        "HuggingFace directory or a GGUF file (python -m ir_jax.convert import "
        "makes the first), or pass --config.model.random_init=True to train on "
        "random weights (smoke tests)"
      )
    return {"kind": "random", "seed": s.train.seed}
  if not os.path.exists(src):
    raise FileNotFoundError(
      f"model.checkpoint {src}: no such file or directory (run "
      "`bash launch/fetch_assets.sh` for the demo assets)"
    )
  if os.path.isdir(src) and model_ckpt.is_checkpoint(src):
    return {"kind": "checkpoint", "path": os.path.abspath(src)}
  base = os.path.join(workdir, "base")
  if not model_ckpt.is_checkpoint(base):
    if jax.process_count() > 1:
      raise ConfigError(
        f"model.checkpoint {src} is a HuggingFace directory or GGUF file, which a "
        f"multi-process job does not import ({jax.process_count()} processes); import it once, "
        f"in one process: python -m ir_jax.convert import {src} --out DIR, copy DIR where "
        "every host reads it (the bucket), and set model.checkpoint=DIR (docs/scaling.md)"
      )
    if jax.process_index() == 0:
      t0 = time.time()
      log(f"importing base weights {src} -> {base} ...")
      import_weights(src, base, param_dtype=s.model.param_dtype, overwrite=True)
      log(f"imported in {time.time() - t0:.1f}s")
  return {"kind": "checkpoint", "path": os.path.abspath(base)}


def write_run(workdir: str, s: Settings, base: dict[str, Any]) -> None:
  """Creates `workdir` and its run.json (atomically: a reader sees all of it or none)."""
  os.makedirs(workdir, exist_ok=True)
  meta = {
    "format": RUN_FORMAT,
    "version": RUN_VERSION,
    "model": s.model.to_dict(),
    "base": base,
    "seed": s.train.seed,
    "stages": list(s.train.stage_list),
    "init_from": os.path.abspath(s.train.init_from) if s.train.init_from else "",
    "config": s.raw,
  }
  write_json(os.path.join(workdir, RUN_FILE), meta, indent=2, default=str)
