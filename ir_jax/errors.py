"""The errors a user can meet, and the one-line CLI handler for them.

Every ir_jax error a user can fix subclasses `IrJaxError` where it is raised
(ConfigError, CheckpointError, DataError, EstimatorError, SafetensorsError,
TokenizerError, WeightImportError, ...), so this module imports only the base
class and any `__main__` can use `cli_main` without loading the modules above.
"""

from __future__ import annotations

import sys
from typing import Callable

from ir_jax.base_error import IrJaxError

USER_ERRORS = (
  IrJaxError,
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
