"""The end-of-run picture speaks as the console does (ir_jax.train.report): the capacity
table in sparsity, perplexity marked lower-is-better with the executed FLOPs, and a
missing plotting extra said in one closing line.

What is checked against what: the panels' titles, colour-bar label and bar labels vs the
hand-made table and eval record they were drawn from.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ir_jax import plotting
from ir_jax.train import report

EV = {
  "dense": {"perplexity": 50.0},
  "routed": {"perplexity": 75.0},
  "policy": "informed",
  "sparsity": 0.25,
  "flops_budget": 0.85,
  "flops_fraction": 0.8502,
}


def test_panels_speak_in_sparsity_lower_is_better_and_executed_flops(tmp_path, monkeypatch):
  pytest.importorskip("matplotlib")
  drawn = {}

  def keep(fig, path, **kw):
    drawn["texts"] = [
      (ax.get_title(), ax.get_ylabel(), [t.get_text() for t in ax.get_xticklabels()])
      for ax in fig.axes
    ]
    return path

  monkeypatch.setattr(plotting, "save", keep)
  table = np.array([[1.0, 0.5], [0.75, 0.75]])  # sparsity: 0, 0.5, 0.25, 0.25 -> mean 0.25
  report.write_summary_figure(str(tmp_path), table, EV)
  titles = [t for t, _, _ in drawn["texts"]]
  labels = [l for _, l, _ in drawn["texts"]]
  assert "capacity table: sparsity per unit\n(mean 0.250)" in titles
  assert "share of tokens approximated" in labels  # the colour bar
  assert "held-out perplexity, lower is better\n(routed 1.50x dense)" in titles
  ticks = [x for _, _, xs in drawn["texts"] for x in xs]
  assert "routed\ninformed, FLOPs budget 0.85\nexecutes 0.85 of dense FLOPs" in ticks


def test_a_missing_plotting_extra_is_said_in_one_closing_line(tmp_path, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
  )
  lines = report.closing_lines(str(tmp_path), EV, None)
  said = [l for l in lines if "summary.png" in l]
  assert said == [f"  summary.png        not drawn: {plotting.NO_MATPLOTLIB}"]
  assert "pip install 'ir_jax[eval]'" in said[0]
