"""The ir_jax model checkpoint directory: config, orbax parameters, tokenizer.

Layout:
  DIR/ir_jax.json     format marker, model config, provenance
  DIR/params/         orbax StandardCheckpointer tree of the model's parameters
  DIR/tokenizer.json  when the source carried a tokenizer (+ tokenizer_config.json)

Directories are written under a temporary name and renamed into place, so a
failed write leaves nothing behind under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from ir_jax.base_error import IrJaxError
from ir_jax.config import ConfigError, LlamaConfig, read_json_object
from ir_jax.routing.capacity import LATER_ROUTING_LEAVES, backfill

META_FILE = "ir_jax.json"
PARAMS_DIR = "params"
FORMAT = "ir_jax.model"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointError(IrJaxError, ValueError):
  """A checkpoint directory is missing a piece or is not an ir_jax checkpoint."""


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, META_FILE))


def _remove_orphans(parent: str, prefix: str) -> None:
  """Removes temporary siblings left by a killed writer (SIGKILL skips the cleanup):
  those whose process id, in the name, no longer runs on this host."""
  for name in os.listdir(parent):
    if not name.startswith(prefix):
      continue
    pid = name[len(prefix) :].split("-", 1)[0]
    if pid.isdigit():
      try:
        os.kill(int(pid), 0)
        continue  # a live writer (another process): not ours to remove
      except ProcessLookupError:
        pass
      except PermissionError:
        continue
    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling directory that becomes `out` only on success."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"{out}: already exists; choose another --out or pass --overwrite")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  prefix = f".{os.path.basename(out)}.partial-"
  _remove_orphans(parent, prefix)
  tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
  try:
    yield tmp
    if os.path.exists(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save(
  out: str,
  cfg: LlamaConfig,
  params: dict,
  *,
  tokenizer_dir: str | None = None,
  provenance: dict[str, Any] | None = None,
  overwrite: bool = False,
  routing: dict[str, Any] | None = None,
) -> str:
  """Writes a model checkpoint directory from a pure-dict parameter tree.

  `routing`: the routing spec (JSON fields) the routers were trained for, when
  known; kept in ir_jax.json and read by `ir_jax.convert.routing_spec`.
  """
  with atomic_dir(out, overwrite) as tmp:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
    ckptr.wait_until_finished()
    meta = {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "model": cfg.to_dict(),
      "provenance": provenance or {},
    }
    if routing is not None:
      meta["routing"] = routing
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)
    for name in TOKENIZER_FILES:
      if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
  return os.path.abspath(out)


def load_config(path: str) -> LlamaConfig:
  meta_file = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_file):
    raise CheckpointError(f"{path}: no {META_FILE}; not an ir_jax checkpoint directory")
  meta = read_json_object(meta_file, CheckpointError)
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{meta_file}: format is not {FORMAT!r}")
  if meta.get("version") != FORMAT_VERSION:
    raise CheckpointError(
      f"{meta_file}: checkpoint version {meta.get('version')!r}, this ir_jax reads {FORMAT_VERSION}"
    )
  try:
    return LlamaConfig.from_dict(meta["model"])
  except (ConfigError, TypeError, KeyError) as e:
    raise CheckpointError(f"{meta_file}: bad model config ({e})") from None


def restore_params(path: str, target: dict) -> dict:
  """Restores parameters into `target`, a pure dict of ShapeDtypeStructs
  (with `.sharding` for sharded restore)."""
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"{path}: no {PARAMS_DIR}/ directory; the checkpoint is incomplete")
  try:
    return ocp.StandardCheckpointer().restore(params_dir, target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    first = e
  # Checkpoints written before the routing leaves that came later (LATER_ROUTING_LEAVES,
  # newest first) restore without them; those leaves are back-filled (`capacity.backfill`).
  routing = target.get("routing") if isinstance(target, dict) else None
  for n in range(1, len(LATER_ROUTING_LEAVES) + 1 if isinstance(routing, dict) else 0):
    absent = LATER_ROUTING_LEAVES[:n]
    if not all(k in routing for k in absent):
      break
    partial = dict(target, routing={k: v for k, v in routing.items() if k not in absent})
    try:
      out = ocp.StandardCheckpointer().restore(params_dir, partial)
    except (ValueError, KeyError, FileNotFoundError):
      continue
    out["routing"] = dict(out["routing"])
    for k in absent:
      out["routing"][k] = backfill(routing[k].shape, routing[k].dtype)
    return out
  raise CheckpointError(f"{params_dir}: cannot restore parameters ({str(first)[:300]})") from None


def to_numpy(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)
