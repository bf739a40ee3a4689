"""A stage's checkpoints, importable from here too: they live in `ir_jax.rundir.checkpoints`,
below `ir_jax.convert`, whose export restores a run's adapters."""

from ir_jax.rundir.checkpoints import (  # noqa: F401
  committed_steps,
  grain_restore,
  grain_save,
  open_manager,
  record_step,
  restore_adapters,
  restore_agreed,
  restore_compat,
  restore_whole,
  writing,
)
