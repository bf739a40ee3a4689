"""SIGKILL at random moments, restart, repeat: nothing lost (launch/fault_injection.py, CI size).

What is checked against what: after every restart, the step the run says it
resumed from vs the newest committed checkpoint found on disk before it; the
final adapters and optimizer state of both stages vs an uninterrupted run,
bitwise. The full campaign (many kills) is `python launch/fault_injection.py`
(figures in docs/reliability.md).
"""

from __future__ import annotations

import os

import pytest
from conftest import load_launcher

pytestmark = pytest.mark.slow  # fast tier: pytest -m 'not slow'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
  return load_launcher("fault_injection")


def test_killed_and_restarted_run_ends_bit_identical(tmp_path):
  fi = _module()
  if not os.path.exists(fi.NEWS):
    pytest.skip("demo assets missing: run `bash launch/fetch_assets.sh`")
  lines = []
  summary = fi.campaign(kills=2, steps=5, seed=1, root=str(tmp_path), log=lines.append)
  assert summary["failures"] == [], "\n".join(lines)
  assert summary["survived"] and summary["kills"] == 2
  assert all(e["moment"] for e in summary["events"])
