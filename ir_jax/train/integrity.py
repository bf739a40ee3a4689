"""Checkpoint integrity records, importable from here too: they live in
`ir_jax.rundir.integrity`, beside the checkpoints they guard."""

from ir_jax.rundir.integrity import (  # noqa: F401
  FORMAT,
  DamagedCheckpoint,
  check,
  damaged_dir,
  move_aside,
  prune_records,
  record_dir,
  restore_newest_whole,
  write_record,
)
