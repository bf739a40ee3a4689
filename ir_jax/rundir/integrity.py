"""Checkpoint integrity: a file manifest per finished checkpoint, checked before restoring.

Orbax marks a checkpoint step complete once every item is written (a commit
marker), so a run killed mid-write leaves an incomplete step that orbax skips.
It does not notice a *complete* step damaged later (a truncated or deleted file,
flipped bytes on a bad disk, an emptied metadata file): flipped bytes in raw
array data would load as silently wrong numbers. So after a step is committed,
process 0 records the size and SHA-256 of every file in it:

    checkpoints/<stage>.integrity/<step>.json

and before restoring a step every process compares the files with that record.
A step whose files disagree, or that orbax cannot read, is skipped for the
newest older step that is whole; damaged steps newer than the one restored are
moved to checkpoints/<stage>.damaged/<step>-<time> (kept for inspection, out of
orbax's way, so the step can be written again). A step without a record (a run
killed between orbax's commit and the record, or a checkpoint from before
records existed) is trusted on orbax's commit marker alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

from ir_jax.files import write_json

FORMAT = "ir_jax.checkpoint_integrity/1"
_CHUNK = 1 << 20


class DamagedCheckpoint(Exception):
  """A checkpoint step whose files disagree with its record or cannot be restored."""


def record_dir(stage_dir: str) -> str:
  return stage_dir.rstrip("/") + ".integrity"


def damaged_dir(stage_dir: str) -> str:
  return stage_dir.rstrip("/") + ".damaged"


def _files(step_dir: str) -> dict[str, int]:
  out = {}
  for root, _, names in os.walk(step_dir):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, step_dir)] = os.path.getsize(p)
  return out


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def write_record(stage_dir: str, step: int) -> str | None:
  """Records size and SHA-256 of every file of committed step `step`; the record's path.

  None when the step directory is not there (already removed by orbax's max_to_keep).
  Written atomically (temporary name, then rename).
  """
  step_dir = os.path.join(stage_dir, str(step))
  if not os.path.isdir(step_dir):
    return None
  files = {
    rel: {"bytes": size, "sha256": _sha256(os.path.join(step_dir, rel))}
    for rel, size in sorted(_files(step_dir).items())
  }
  os.makedirs(record_dir(stage_dir), exist_ok=True)
  path = os.path.join(record_dir(stage_dir), f"{step}.json")
  return write_json(path, {"format": FORMAT, "step": step, "files": files}, indent=0)


def prune_records(stage_dir: str, keep_steps: set[int]) -> None:
  """Removes records of steps orbax no longer keeps."""
  d = record_dir(stage_dir)
  if not os.path.isdir(d):
    return
  for n in os.listdir(d):
    stem = n[:-5] if n.endswith(".json") else None
    if stem is not None and stem.isdigit() and int(stem) not in keep_steps:
      os.remove(os.path.join(d, n))


def check(stage_dir: str, step: int) -> str | None:
  """Why step `step` is damaged according to its record, or None (whole, or no record)."""
  path = os.path.join(record_dir(stage_dir), f"{step}.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      rec = json.load(f)
    want = rec["files"]
    assert rec.get("format") == FORMAT and isinstance(want, dict)
  except (OSError, ValueError, KeyError, AssertionError, TypeError):
    return f"its integrity record {path} is unreadable"
  step_dir = os.path.join(stage_dir, str(step))
  have = _files(step_dir)
  for rel, info in want.items():
    if rel not in have:
      return f"file {rel} is missing"
    if have[rel] != info["bytes"]:
      return f"file {rel} has {have[rel]} bytes, {info['bytes']} were written"
  for rel, info in want.items():
    if _sha256(os.path.join(step_dir, rel)) != info["sha256"]:
      return f"file {rel} has changed since it was written (SHA-256 differs)"
  return None


def restore_newest_whole(
  steps: list[int],
  stage_dir: str,
  restore: Callable[[int], Any],
  log: Callable[[str], None],
  *,
  quarantine: bool,
) -> tuple[int, Any] | None:
  """(step, restored) of the newest step that passes `check` and `restore`, else None.

  Damaged steps newer than it are reported through `log` and, with `quarantine`,
  moved to `damaged_dir(stage_dir)`. When no step is whole, nothing is moved and
  `DamagedCheckpoint` is raised naming every step and what is wrong with it.
  """
  problems: list[tuple[int, str]] = []
  for step in sorted(steps, reverse=True):
    why = check(stage_dir, step)
    if why is None:
      try:
        out = restore(step)
      except Exception as e:  # orbax/tensorstore/JSON errors of a damaged step
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        why = f"restoring it failed: {type(e).__name__}: {first[:200]}"
      else:
        for bad, reason in problems:
          log(
            f"checkpoint step {bad} of {stage_dir} is damaged ({reason}); "
            + (f"moved to {move_aside(stage_dir, bad)}; " if quarantine else "")
            + f"using step {step}"
          )
        return step, out
    problems.append((step, why))
  if problems:
    listing = "; ".join(f"step {s}: {w}" for s, w in problems)
    raise DamagedCheckpoint(
      f"every checkpoint in {stage_dir} is damaged ({listing}); move the "
      "directory away to start this stage over"
    )
  return None


def move_aside(stage_dir: str, step: int) -> str:
  dest_root = damaged_dir(stage_dir)
  os.makedirs(dest_root, exist_ok=True)
  dest = os.path.join(dest_root, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
  shutil.move(os.path.join(stage_dir, str(step)), dest)
  rec = os.path.join(record_dir(stage_dir), f"{step}.json")
  if os.path.exists(rec):
    shutil.move(rec, dest + ".integrity.json")
  return dest
