"""Where a result came from: the git commit of the code that produced it.

Benchmarks and experiment drivers stamp it into what they write, so a number
can be traced to the code. Outside a git checkout (an installed wheel) the
commit is None.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str, cwd: str) -> str:
  try:
    return subprocess.run(
      ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def git_info(cwd: str = REPO) -> dict[str, Any]:
  """{"commit": the full commit hash, "dirty": whether tracked files differ from it};
  both None when `cwd` is not inside a git checkout."""
  commit = _git("rev-parse", "HEAD", cwd=cwd)
  dirty = bool(_git("status", "--porcelain", "--untracked-files=no", cwd=cwd)) if commit else None
  return {"commit": commit or None, "dirty": dirty}


def git_commit(cwd: str = REPO, short: bool = False) -> str | None:
  """The checkout's commit hash (12 characters when `short`), None outside a checkout."""
  commit = git_info(cwd)["commit"]
  return commit[:12] if commit and short else commit
