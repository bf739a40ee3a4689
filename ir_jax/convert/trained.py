"""A trained model as export reads it: an ir_jax checkpoint or a training workdir.

`open_trained(path)` checks that the source is complete (no orbax write still
pending, a committed step) and restores it into host memory: adapters (and LoRA)
at once, base weights as `Lazy` leaves that `Leaves` loads one at a time while
`ir_jax.convert.export` writes them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ir_jax import checkpoint, sharding
from ir_jax.config import LlamaConfig
from ir_jax.convert import abstract_params, routing_io
from ir_jax.model import ADAPTERS, abstract_model
from ir_jax.rundir import is_run, read_run, stage_dir
from ir_jax.rundir.checkpoints import restore_adapters
from ir_jax.rundir.result import run_result

ORBAX_TMP = ".orbax-checkpoint-tmp"
ORBAX_COMMIT = "commit_success.txt"
# Our kernel -> its LoRA adapter (`scale * (n @ a) @ b` is added to `n @ kernel`).
LORA = {
  ("layers", "self_attn", "q_proj"): ("layers", "self_attn", "q_lora"),
  ("layers", "self_attn", "v_proj"): ("layers", "self_attn", "v_lora"),
  ("layers", "mlp", "gate_proj"): ("layers", "mlp", "gate_lora"),
}


class ExportError(checkpoint.CheckpointError):
  """The checkpoint cannot be exported as asked (still being written, disk full, bad --out)."""


@dataclasses.dataclass
class Trained:
  """A trained model as export reads it."""

  config: LlamaConfig
  params: dict  # pure dict; jax, numpy or Lazy (still on disk) leaves
  spec: Any  # RoutingSpec the routers were trained for, or None
  tokenizer_dir: str | None
  source: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Lazy:
  """A parameter still on disk: one leaf of an orbax checkpoint, restored on demand."""

  directory: str  # the orbax item directory (e.g. CKPT/params)
  path: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype

  def load(self) -> np.ndarray:
    """This leaf alone (orbax partial restore), as numpy in `dtype`."""
    item: Any = 0
    args: Any = ocp.RestoreArgs(restore_type=np.ndarray, dtype=self.dtype)
    for k in reversed(self.path):
      item, args = {k: item}, {k: args}
    try:
      tree = ocp.PyTreeCheckpointer().restore(
        self.directory,
        args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
      )
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise checkpoint.CheckpointError(
        f"{self.directory}: cannot restore {'/'.join(self.path)} ({str(e)[:300]})"
      ) from None
    value = _get(tree, self.path)
    if tuple(value.shape) != tuple(self.shape):
      raise checkpoint.CheckpointError(
        f"{self.directory}: {'/'.join(self.path)} is shaped {list(value.shape)}, the config "
        f"expects {list(self.shape)}"
      )
    return value


def _lazy_tree(
  directory: str, abstract: dict, dtype: Any = None, prefix: tuple[str, ...] = ()
) -> dict:
  """`abstract` (a pure dict of ShapeDtypeStructs) as Lazy leaves of the checkpoint at
  `directory`; floating leaves in `dtype` when given."""
  out = {}
  for k, v in abstract.items():
    if isinstance(v, dict):
      out[k] = _lazy_tree(directory, v, dtype, prefix + (k,))
    else:
      dt = np.dtype(v.dtype)
      if dtype is not None and jax.numpy.issubdtype(dt, jax.numpy.floating):
        dt = np.dtype(dtype)
      out[k] = Lazy(directory, prefix + (k,), tuple(v.shape), dt)
  return out


class Leaves:
  """Parameter leaves by path, loading Lazy ones when first used.

  Big leaves (base weights) are kept one at a time: the previous one is dropped
  before the next is restored, so export holds one stacked parameter, not the
  model. Small ones (LoRA adapters, routing modules) are kept.
  """

  def __init__(self, params: dict):
    self.params = params
    self._big: tuple[tuple[str, ...] | None, Any] = (None, None)
    self._small: dict[tuple[str, ...], Any] = {}

  def get(self, path: tuple[str, ...]) -> Any:
    leaf = _get(self.params, path)
    if not isinstance(leaf, Lazy):
      return leaf
    small = path[0] == "routing" or path[:3] in LORA.values()
    if small:
      if path not in self._small:
        self._small[path] = leaf.load()
      return self._small[path]
    if self._big[0] != path:
      self._big = (None, None)
      self._big = (path, leaf.load())
    return self._big[1]

  def tree(self, prefix: tuple[str, ...]) -> dict:
    """The subtree at `prefix`, loaded (for the small routing subtree)."""

    def walk(node: Any, path: tuple[str, ...]) -> Any:
      if isinstance(node, dict):
        return {k: walk(v, path + (k,)) for k, v in node.items()}
      return self.get(path)

    return walk(_get(self.params, prefix), prefix)


# ------------------------------------------------------------ reading the source
def _orbax_pending(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if ORBAX_TMP in n)


def _check_committed(item_dir: str, what: str) -> None:
  """Refuses an orbax directory that is still being written or never finished."""
  parent, name = os.path.split(item_dir.rstrip(os.sep))
  pending = [n for n in _orbax_pending(parent) if n.startswith(name + ".")]
  if pending:
    raise ExportError(
      f"{os.path.join(parent, pending[0])}: {what} is still being written "
      "(orbax temporary directory); wait for the writer to finish, or remove "
      "it if no process is writing"
    )
  if not os.path.isdir(item_dir):
    raise ExportError(f"{item_dir}: missing; the {what} is incomplete")
  if not os.path.isfile(os.path.join(item_dir, ORBAX_COMMIT)):
    raise ExportError(
      f"{item_dir}: no {ORBAX_COMMIT}; orbax has not finished writing the "
      f"{what} (still being written, or the write was interrupted)"
    )


def _check_checkpoint(path: str) -> None:
  if ".partial-" in os.path.basename(os.path.abspath(path)):
    raise ExportError(f"{path}: a temporary directory of an unfinished write, not a checkpoint")
  _check_committed(os.path.join(path, checkpoint.PARAMS_DIR), "checkpoint")


def _newest_step(workdir: str, stages: list[str]) -> tuple[str, int]:
  """The (stage, step) whose adapters `run_result` loads, after checking it is complete."""
  for stage in stages:
    pending = _orbax_pending(stage_dir(workdir, stage))
    if pending:
      raise ExportError(
        f"{os.path.join(stage_dir(workdir, stage), pending[0])}: a training checkpoint is "
        "still being written; wait for it (or the run) to finish, or remove it if no "
        "process is writing"
      )
  for stage in reversed(stages):
    d = stage_dir(workdir, stage)
    steps = sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []
    if steps:
      _check_committed(os.path.join(d, str(steps[-1])), f"{stage} checkpoint")
      return stage, steps[-1]
  raise ExportError(f"{workdir}: the run has no finished checkpoint yet; nothing to export")


def _host() -> jax.Device:
  """Export restores into host memory (the CPU backend), whatever accelerators exist."""
  return jax.devices("cpu")[0]


def _on_host(abstract: Any) -> Any:
  """Restore targets on the host device."""
  host = jax.sharding.SingleDeviceSharding(_host())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), abstract)


def _restore_run(workdir: str, cfg: LlamaConfig, base_path: str, stage: str, step: int) -> dict:
  """What `ir_jax.rundir.result.run_result` gives (base weights + the newest adapters),
  restored straight into host memory without initialising a model."""
  _, abs_state = nnx.split(abstract_model(cfg))
  abs_adapters, abs_base = nnx.split_state(abs_state, ADAPTERS, ...)
  mgr = ocp.CheckpointManager(
    stage_dir(workdir, stage),
    options=ocp.CheckpointManagerOptions(create=False),
    item_handlers={"adapters": ocp.StandardCheckpointHandler()},
  )
  try:
    adapters = nnx.to_pure_dict(restore_adapters(mgr, step, _on_host(abs_adapters)))
  finally:
    mgr.close()
  # Base weights stay on disk until written, in the run's parameter dtype (as
  # the run itself restores them); Lazy.load checks each one's shape.
  params = _lazy_tree(
    os.path.join(base_path, checkpoint.PARAMS_DIR), nnx.to_pure_dict(abs_base), cfg.weight_dtype
  )
  _deep_update(params, adapters)
  return params


def _deep_update(tree: dict, other: dict) -> None:
  for k, v in other.items():
    if isinstance(v, dict) and isinstance(tree.get(k), dict):
      _deep_update(tree[k], v)
    else:
      tree[k] = v


def open_trained(path: str) -> Trained:
  """Restores an ir_jax checkpoint directory or training workdir for export (into host
  memory, on one CPU device)."""
  path = os.path.abspath(os.fspath(path))
  if is_run(path):
    meta = read_run(path)
    stage, step = _newest_step(path, list(meta["stages"]))
    base = meta.get("base") or {}
    cfg = LlamaConfig.from_dict(meta["model"])
    if base.get("kind") == "checkpoint":
      _check_checkpoint(base["path"])
      params = _restore_run(path, cfg, base["path"], stage, step)
      tok_dir = base["path"]
    else:  # random base weights: only the run's own initialisation can remake them
      model_state = run_result(path, sharding.make_mesh(sharding.MeshConfig(data=1), [_host()]))
      params, tok_dir = nnx.to_pure_dict(model_state.state), None
    return Trained(
      cfg,
      params,
      routing_io.load_spec(path),
      tok_dir,
      {"workdir": path, "stage": stage, "step": step},
    )
  if checkpoint.is_checkpoint(path):
    _check_checkpoint(path)
    cfg = checkpoint.load_config(path)
    params = _lazy_tree(os.path.join(path, checkpoint.PARAMS_DIR), abstract_params(cfg))
    return Trained(cfg, params, routing_io.load_spec(path), path, {"checkpoint": path})
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or directory")
  raise checkpoint.CheckpointError(
    f"{path}: neither an ir_jax checkpoint ({checkpoint.META_FILE}) nor an ir_jax.train "
    "workdir (run.json); import HF or GGUF weights with `python -m ir_jax.convert import`"
  )


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for p in path:
    tree = tree[p]
  return tree
