"""What a finished run shows its user: `WORKDIR/summary.png` and a closing message.

The picture has up to four panels, each drawn from a file the run wrote:
loss per stage (metrics.jsonl), forecast explained variance per layer
(forecasters.json), the per-unit capacity table the router stage chose (the
model), and dense vs routed held-out perplexity (eval.json). A panel whose
source is absent is left out; without matplotlib there is no picture (the
closing lines say so, in one line) and nothing else changes.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import numpy as np

from ir_jax import plotting

FIGURE = "summary.png"


def _read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
  out: dict[str, list[tuple[int, float]]] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill
        continue
      if isinstance(rec.get("loss"), (int, float)) and "step" in rec:
        out.setdefault(str(rec.get("stage")), []).append((int(rec["step"]), float(rec["loss"])))
  return out


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _routed_label(ev: dict[str, Any]) -> str:
  """The routed bar's label: policy, what it was asked for, the FLOPs it executes."""
  asked = (
    f"FLOPs budget {ev['flops_budget']:g}"
    if ev.get("flops_budget")
    else f"sparsity {ev.get('sparsity', '')}"
  )
  label = f"routed\n{ev.get('policy', '')}, {asked}"
  if isinstance(ev.get("flops_fraction"), (int, float)):
    label += f"\nexecutes {ev['flops_fraction']:.2f} of dense FLOPs"
  return label


def write_summary_figure(
  workdir: str, table: np.ndarray | None, ev: dict[str, Any] | None
) -> str | None:
  """Draws WORKDIR/summary.png; returns its path, or None when nothing could be drawn."""
  try:
    plt = plotting.pyplot()
  except ImportError:
    return None
  losses = _read_metrics(workdir)
  explained = _read_json(os.path.join(workdir, "forecasters.json"))
  panels = []
  if losses:
    panels.append("loss")
  if isinstance(explained, dict) and explained.get("attn"):
    panels.append("explained")
  if table is not None:
    panels.append("table")
  if ev and "dense" in ev and "routed" in ev:
    panels.append("eval")
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    if panel == "loss":
      for stage, pts in losses.items():
        steps, vals = zip(*sorted(pts))
        ax.plot(steps, vals, marker=".", label=stage)
      ax.set(title="training loss per stage", xlabel="step", ylabel="loss")
      ax.legend(fontsize=8)
    elif panel == "explained":
      for unit in ("attn", "mlp"):
        v = np.clip(np.asarray(explained[unit], float), -1, 1)
        ax.plot(np.arange(len(v)), v, marker="o", ms=3, label=unit)
      ax.axhline(0, color="grey", lw=0.5)
      ax.set(
        title="forecast explained variance\n(held-out, clipped to [-1, 1])",
        xlabel="layer",
        ylim=(-1.05, 1.05),
      )
      ax.legend(fontsize=8)
    elif panel == "table":
      # In sparsity, as the console speaks: the share of a unit's tokens approximated.
      sparsity = 1.0 - np.asarray(table, float)
      im = ax.imshow(sparsity.T, aspect="auto", vmin=0, vmax=1, cmap="viridis")
      ax.set(
        title=f"capacity table: sparsity per unit\n(mean {float(sparsity.mean()):.3f})",
        xlabel="layer",
        yticks=[0, 1],
        yticklabels=["attn", "mlp"],
      )
      fig.colorbar(im, ax=ax, label="share of tokens approximated")
    else:
      d, r = ev["dense"]["perplexity"], ev["routed"]["perplexity"]
      bars = ax.bar(["dense", _routed_label(ev)], [d, r], color=["#4c72b0", "#dd8452"])
      for b, v in zip(bars, (d, r)):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom")
      ax.set(
        title=f"held-out perplexity, lower is better\n(routed {r / d:.2f}x dense)",
        ylabel="perplexity",
      )
  fig.tight_layout()
  return plotting.save(fig, os.path.join(workdir, FIGURE), dpi=110)


def closing_lines(workdir: str, ev: dict[str, Any] | None, figure: str | None) -> list[str]:
  """Where the results are and what the last numbers mean."""
  lines = [f"results in {workdir}:"]
  if ev:
    lines.append(
      "  eval.json          held-out perplexity, dense and routed (lower is better; "
      "routed/dense is the price of approximating that share of unit work)"
    )
  for name, what in (
    (
      "metrics.jsonl",
      "one record per logged step (loss terms, realized "
      "sparsity, forecast explained variance, tokens/s)",
    ),
    ("forecasters.json", "forecast explained variance per layer on held-out ordinary tokens"),
    ("tensorboard", "the same metrics for TensorBoard"),
  ):
    if os.path.exists(os.path.join(workdir, name)):
      lines.append(f"  {name:<18} {what}")
  if figure:
    lines.append(f"  {os.path.basename(figure):<18} a picture of the above")
  elif importlib.util.find_spec("matplotlib") is None:
    lines.append(f"  {FIGURE:<18} not drawn: {plotting.NO_MATPLOTLIB}")
  lines.append(
    "  the trained model loads with ir_jax.load_model(WORKDIR); "
    "python -m ir_jax.convert export turns it into HF safetensors"
  )
  return lines
