"""Loading a config file (configs/*.py): the one place that runs one.

A config file is Python by design (ml_collections' `get_config()`), named by
the user as code to run, as `--config` of every entry point; nothing else in
the package executes a file.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from ir_jax.config import ConfigError


def load_config(path: str, arg: str | None = None) -> Any:
  """`get_config()` (or `get_config(arg)`) of a config file; one-line errors."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path}: no such file")
  spec = importlib.util.spec_from_file_location("_ir_jax_config", path)
  mod = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(mod)
  except Exception as e:  # a config that does not import is the user's to fix
    raise ConfigError(f"--config {path}: cannot load it ({type(e).__name__}: {e})") from None
  if not hasattr(mod, "get_config"):
    raise ConfigError(f"--config {path}: defines no get_config()")
  return mod.get_config(arg) if arg else mod.get_config()
