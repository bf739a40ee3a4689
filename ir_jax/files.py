"""Writing small files so that a reader never sees half of one: the one JSON writer."""

from __future__ import annotations

import json
import os
from typing import Any, Callable


def write_json(
  path: str, obj: Any, *, indent: int | None = 1, default: Callable[[Any], Any] | None = None
) -> str:
  """`obj` as JSON at `path`, atomically and durably: written to a sibling temporary
  file, fsynced (a full disk fails here, not later), then renamed over `path`."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=indent, default=default)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
