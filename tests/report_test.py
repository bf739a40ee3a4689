"""The end-of-run picture and closing lines (ir_jax.train.report)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ir_jax.train import report

pytest.importorskip("matplotlib")


def _png_size(path) -> tuple[int, int]:
  head = open(path, "rb").read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_summary_figure_has_one_panel_per_available_source(tmp_path):
  w = tmp_path / "run"
  w.mkdir()
  assert report.write_summary_figure(str(w), None, None) is None  # nothing to draw
  with open(w / "metrics.jsonl", "w") as f:
    for step in range(1, 5):
      f.write(json.dumps({"stage": "forecaster", "step": step, "loss": 5.0 / step}) + "\n")
    f.write('{"stage": "router", "step": 1, "lo')  # a line cut by a kill is skipped
  one = report.write_summary_figure(str(w), None, None)
  width_one, _ = _png_size(one)
  (w / "forecasters.json").write_text(json.dumps({"attn": [0.5, -3.0], "mlp": [0.2, 0.4]}))
  ev = {
    "dense": {"perplexity": 60.0},
    "routed": {"perplexity": 75.0},
    "policy": "informed",
    "sparsity": 0.25,
  }
  four = report.write_summary_figure(str(w), np.array([[0.5, 1.0], [0.75, 0.75]]), ev)
  width_four, _ = _png_size(four)
  assert four == str(w / "summary.png")
  assert 3.5 < width_four / width_one < 4.5  # four panels of the same width
  lines = report.closing_lines(str(w), ev, four)
  assert lines[0] == f"results in {w}:"
  assert any(l.strip().startswith("eval.json") for l in lines)
  assert any(l.strip().startswith("summary.png") for l in lines)
  assert not any(l.strip().startswith("tensorboard") for l in lines)  # absent: not listed
