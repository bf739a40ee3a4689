"""The one way pictures are drawn and written: matplotlib's file backend, atomic saves."""

from __future__ import annotations

import os
from typing import Any

NO_MATPLOTLIB = "matplotlib is not installed (pip install 'ir_jax[eval]'); no plot"


def pyplot() -> Any:
  """matplotlib.pyplot on the Agg (file) backend; ImportError when matplotlib is absent."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save(fig: Any, path: str, dpi: int = 120, **kwargs: Any) -> str:
  """Writes `fig` to `path` through a temporary sibling (a reader never sees half a PNG)
  and closes it."""
  import matplotlib.pyplot as plt

  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp-{os.getpid()}{ext or '.png'}"
  try:
    fig.savefig(tmp, dpi=dpi, **kwargs)
    os.replace(tmp, path)
  finally:
    plt.close(fig)
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
