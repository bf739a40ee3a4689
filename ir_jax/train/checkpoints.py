"""A stage's checkpoints: orbax managers, integrity records, restore and write failures.

Each stage writes `checkpoints/<stage>/<N>/` through an orbax CheckpointManager
with four items: `adapters`, `opt_state`, `data` (the grain iterator state) and
`meta`. A step counts once its integrity record (ir_jax.train.integrity) is
written; restore takes the newest step that is whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from ir_jax import checkpoint as model_ckpt
from ir_jax.forecast import NO_TABLE, CalibratedFor, Capacity
from ir_jax.train import integrity
from ir_jax.train.metrics import log


def open_manager(directory: str, keep: int = 3, async_: bool = False) -> ocp.CheckpointManager:
  """The CheckpointManager of one stage directory, with the four items a step holds."""
  import grain.checkpoint as gcp

  opts = ocp.CheckpointManagerOptions(
    max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_, create=True
  )
  return ocp.CheckpointManager(
    os.path.abspath(directory),
    options=opts,
    item_handlers={
      "adapters": ocp.StandardCheckpointHandler(),
      "opt_state": ocp.StandardCheckpointHandler(),
      "data": gcp.CheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    },
  )


def restore_adapters(mgr: ocp.CheckpointManager, step: int, target: nnx.State) -> nnx.State:
  """The adapters of checkpoint `step` alone, restored into `target`."""

  def restore(tgt: nnx.State) -> dict[str, Any]:
    return mgr.restore(step, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(tgt)))

  return restore_compat(restore, target)["adapters"]


def restore_compat(
  restore: Callable[[nnx.State], dict[str, Any]], target: nnx.State
) -> dict[str, Any]:
  """`restore(adapters_target)`, also for checkpoints written before newer adapter leaves.

  Checkpoints before capacity tables have no `capacity` (nor `calibrated_for`)
  leaves: they get NO_TABLE, uniform routing as the run that wrote them routed.
  Checkpoints before calibration records have no `calibrated_for`: NO_TABLE, so
  their thresholds are recalibrated (or causal routing refused) before use.
  """
  try:
    return restore(target)
  except ValueError as e:  # orbax: the tree structures do not match
    first = e
  for missing in ((CalibratedFor,), (Capacity, CalibratedFor)):
    absent, rest = nnx.split_state(target, nnx.Any(*missing), ...)
    try:
      out = dict(restore(rest))
    except Exception:
      continue
    fresh = jax.tree.map(
      lambda a: (
        jax.device_put(jnp.full(a.shape, NO_TABLE, a.dtype), a.sharding)
        if getattr(a, "sharding", None) is not None
        else jnp.full(a.shape, NO_TABLE, a.dtype)
      ),
      absent,
    )
    out["adapters"] = nnx.merge_state(out["adapters"], fresh)
    return out
  raise first


def restore_whole(
  mgr: ocp.CheckpointManager, directory: str, restore: Callable[[int], Any], *, quarantine: bool
) -> tuple[int, Any] | None:
  """The newest checkpoint step that is whole (integrity record and orbax agree), restored.

  Damaged newer steps are logged (and, with `quarantine`, moved aside by process 0);
  when every step is damaged a CheckpointError says so and nothing is moved.
  """
  try:
    return integrity.restore_newest_whole(
      list(mgr.all_steps()),
      directory,
      restore,
      log,
      quarantine=quarantine and jax.process_index() == 0,
    )
  except integrity.DamagedCheckpoint as e:
    raise model_ckpt.CheckpointError(str(e)) from None


def record_step(mgr: ocp.CheckpointManager, directory: str, step: int) -> None:
  """Integrity record of committed step `step` (process 0); prunes records of deleted steps."""
  if jax.process_index() == 0:
    integrity.write_record(directory, step)
    integrity.prune_records(directory, set(mgr.all_steps()))


def committed_steps(directory: str) -> list[int]:
  """The step directories orbax has committed in `directory`, oldest first."""
  return (
    sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
  )


@contextlib.contextmanager
def writing(directory: str, step: int | None) -> Iterator[None]:
  """Turns a filesystem failure while writing checkpoint `step` (disk full, quota,
  permissions) into a one-line CheckpointError; the older whole steps stay as they were."""
  try:
    yield
  except model_ckpt.CheckpointError:
    raise
  except Exception as e:  # orbax re-raises its writer threads' errors, possibly chained
    cause: BaseException | None = e
    while cause is not None and not (
      isinstance(cause, OSError) or "No space left on device" in str(cause)
    ):
      cause = cause.__cause__ or cause.__context__
    if cause is None:
      raise
    full = getattr(cause, "errno", None) == errno.ENOSPC or "No space left" in str(cause)
    why = (
      "no space left on device"
      if full
      else (getattr(cause, "strerror", None) or str(cause).splitlines()[0])
    )
    whole = committed_steps(directory)
    raise model_ckpt.CheckpointError(
      f"cannot write checkpoint step {step} in {directory}: {why}; the newest complete "
      f"checkpoint is {f'step {whole[-1]}' if whole else 'none'}. Free space (or fix the "
      "directory) and rerun the same command to resume"
    ) from e


def grain_save(it: Any) -> Any:
  """The `data` item of a save: the grain iterator's position."""
  import grain.checkpoint as gcp

  return gcp.CheckpointSave(it)


def grain_restore(it: Any) -> Any:
  """The `data` item of a restore: puts the grain iterator back where it was saved."""
  import grain.checkpoint as gcp

  return gcp.CheckpointRestore(it)
