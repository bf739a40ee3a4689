"""The model state of a run, importable from here too: it lives in `ir_jax.rundir.state`,
below `ir_jax.convert`, whose export reads runs."""

from ir_jax.rundir.state import (  # noqa: F401
  ADAPTER_FIELDS,
  SHAPE_FIELDS,
  ModelState,
  abstract_state,
  adapter_target,
  adopt_adapters,
  init_state,
  replace_adapters,
  shape_diff,
  split_adapters,
)
