"""Metric sinks: JSONL (always), TensorBoard (tensorboardX, when installed), console line,
and `log`, the process-0 console print of the training run."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from ir_jax.progress import log  # noqa: F401  (also importable from here)


class MetricWriter:
  """Writes one record per call to `workdir/metrics.jsonl` (+ TensorBoard) on process 0.

  Records of a resumed run are appended; a reader keeps the last record of each
  (stage, step) pair, since steps after the last checkpoint are trained again. Each
  record is fsynced as it is written (one per log step).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True) -> None:
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        print(
          "ir_jax.train: tensorboardX is not installed; metrics go to metrics.jsonl only",
          file=sys.stderr,
        )
      else:
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, stage: str, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    rec = {"stage": stage, "step": int(step), "time": round(time.time(), 3)}
    for k, v in values.items():
      v = float(v)
      rec[k] = v if math.isfinite(v) else str(v)
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    # On disk now, not only in the page cache: a host lost right after a log step keeps
    # its records, and a gcsfuse mount uploads the file on fsync (not on flush).
    os.fsync(self._jsonl.fileno())
    if self._tb is not None:
      for k, v in values.items():
        if math.isfinite(float(v)):
          self._tb.add_scalar(f"{stage}/{k}", float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


_ORDER = (
  "loss",
  "lm",
  "lff_attn",
  "lff_mlp",
  "explained_attn",
  "explained_mlp",
  "sparsity_attn",
  "sparsity_mlp",
  "sparsity_penalty",
  "importance",
  "temperature",
)


def console_line(stage: str, step: int, total: int, values: dict[str, float]) -> str:
  """`[router 120/200] loss 3.21 lm 3.02 ... 1234 tok/s 0.52 s/step`."""
  parts = [f"[{stage} {step}/{total}]"]
  for k in _ORDER:
    if k in values:
      parts.append(f"{k} {values[k]:.4g}")
  if "lr" in values:
    parts.append(f"lr {values['lr']:.2e}")
  if "tokens_per_s" in values:
    parts.append(f"{values['tokens_per_s']:.0f} tok/s")
  if "step_time_s" in values:
    parts.append(f"{values['step_time_s']:.3f} s/step")
  return " ".join(parts)
