"""The errors a user can meet, and the one-line CLI handler for them."""

from __future__ import annotations

import sys
from typing import Callable

from ir_jax.checkpoint import CheckpointError
from ir_jax.config import ConfigError
from ir_jax.convert.safetensors_io import SafetensorsError
from ir_jax.convert.sources import WeightImportError
from ir_jax.data.config import DataError
from ir_jax.eval.estimators import EstimatorError
from ir_jax.tokenizer import TokenizerError

USER_ERRORS = (
  ConfigError,
  CheckpointError,
  DataError,
  EstimatorError,
  SafetensorsError,
  TokenizerError,
  WeightImportError,
  FileNotFoundError,
  FileExistsError,
  NotADirectoryError,
  PermissionError,
)


def cli_main(fn: Callable[[], int | None], prog: str) -> None:
  """Runs `fn`; a user error prints `prog: error: ...` on one line and exits 2."""
  try:
    code = fn()
  except USER_ERRORS as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(130)
  sys.exit(code or 0)
