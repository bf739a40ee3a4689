"""What every part of launch/quality_table.py shares: the repository, formats, JSON files, git.

The files a run writes (RUNS/plan.json, held-out manifests, docs/results.json)
carry a `format` tag; the JSON helpers read what may be half written and
write atomically, so a killed run never leaves a file that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ir_jax import provenance
from ir_jax.files import write_json  # noqa: F401  (the parts' one JSON writer)

REPO = Path(__file__).resolve().parents[3]  # the checkout: ir_jax/experiments/quality/
PROG = "quality_table"
PLAN_FORMAT = "ir_jax.quality_table.plan/1"
RESULTS_FORMAT = "ir_jax.quality_table/1"
HELDOUT_FORMAT = "ir_jax.quality_table.heldout/1"


def rel(path: str) -> str:
  """`path` relative to the repository root when inside it (for display)."""
  try:
    return Path(path).resolve().relative_to(REPO).as_posix()
  except ValueError:
    return str(path)


def read_json(path: str) -> Any:
  """The JSON in `path`, or None when it is missing or unreadable (e.g. half written)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def git_info() -> dict[str, Any]:
  """The checkout's commit and whether tracked files differ from it (None: not a checkout)."""
  return provenance.git_info(REPO)
