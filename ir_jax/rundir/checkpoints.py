"""A stage's checkpoints: orbax managers, integrity records, restore and write failures.

Each stage writes `checkpoints/<stage>/<N>/` through an orbax CheckpointManager
with four items: `adapters`, `opt_state`, `data` (the grain iterator state) and
`meta`. A step counts once its integrity record (ir_jax.rundir.integrity) is
written; restore takes the newest step that is whole.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ir_jax import checkpoint as model_ckpt
from ir_jax.forecast import CalibratedFor, Capacity
from ir_jax.progress import log
from ir_jax.routing.capacity import backfill
from ir_jax.rundir import integrity


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
  leaves: they get no table (`capacity.backfill`), uniform routing as the run that wrote them routed.
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
        jax.device_put(backfill(a.shape, a.dtype), a.sharding)
        if getattr(a, "sharding", None) is not None
        else jnp.asarray(backfill(a.shape, a.dtype))
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
  when every step is damaged a CheckpointError says so and nothing is moved. In a
  multi-process job the step is decided once for all processes (`restore_agreed`).
  """
  steps = list(mgr.all_steps())
  try:
    if jax.process_count() == 1:
      return integrity.restore_newest_whole(steps, directory, restore, log, quarantine=quarantine)
    return restore_agreed(steps, directory, restore, quarantine=quarantine)
  except integrity.DamagedCheckpoint as e:
    raise model_ckpt.CheckpointError(str(e)) from None


def _first_line(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f"{type(e).__name__}: {first[:200]}"


def restore_agreed(
  steps: list[int], directory: str, restore: Callable[[int], Any], *, quarantine: bool
) -> tuple[int, Any] | None:
  """`integrity.restore_newest_whole` for a multi-process job: every process restores the
  same step, decided once.

  The candidate steps are process 0's list, broadcast; process 0 alone checks a step
  against its integrity record (the workdir is one shared filesystem: one read of the
  files, not one per host) and broadcasts the verdict; every process then restores the
  step, and it counts only when the restore succeeded on all of them (a host that cannot
  read it makes all of them fall back to the next older step together). Every process
  must call this, with the same `directory`.
  """
  from jax.experimental import multihost_utils

  me = jax.process_index()
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  mine = np.full((max(n, 1),), -1, np.int32)
  if me == 0:
    mine[:n] = sorted(steps, reverse=True)
  candidates = [int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(mine))[:n]]
  problems: list[tuple[int, str]] = []
  for step in candidates:
    why = integrity.check(directory, step) if me == 0 else None
    if bool(multihost_utils.broadcast_one_to_all(np.int32(why is not None))):
      problems.append((step, why or "its files disagree with its integrity record"))
      continue
    try:
      out, err = restore(step), None
    except Exception as e:  # orbax/tensorstore/JSON errors of a damaged or unreadable step
      out, err = None, _first_line(e)
      print(
        f"ir_jax.train: process {me} cannot restore checkpoint step {step} of {directory} ({err})",
        flush=True,
      )
    failed = np.asarray(multihost_utils.process_allgather(np.int32(err is not None)))
    if not failed.any():
      for bad, reason in problems:
        log(
          f"checkpoint step {bad} of {directory} is damaged ({reason}); "
          + (f"moved to {integrity.move_aside(directory, bad)}; " if quarantine and me == 0 else "")
          + f"using step {step}"
        )
      return step, out
    who = ", ".join(str(i) for i in np.flatnonzero(failed))
    problems.append((step, f"restoring it failed on process {who}" + (f": {err}" if err else "")))
  if problems:
    listing = "; ".join(f"step {s}: {w}" for s, w in problems)
    raise integrity.DamagedCheckpoint(
      f"every checkpoint in {directory} is damaged ({listing}); move the "
      "directory away to start this stage over"
    )
  return None


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
