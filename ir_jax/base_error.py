"""`IrJaxError`: the base of every error a user can meet (bottom floor: imports nothing).

Each error class subclasses it where it is raised (ConfigError in config,
CheckpointError in checkpoint, ...), so `ir_jax.errors.cli_main` can turn all of
them into one-line messages without importing the modules that raise them.
"""


class IrJaxError(Exception):
  """A mistake the user can fix (a config value, a file, a checkpoint); its message says how."""
