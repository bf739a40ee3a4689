"""The TPU view of `python -m ir_jax.bench --tpu TOPOLOGY`: XLA's cost of dense vs routed.

Compiles the dense and routed inference steps of `ir_jax.aot` for a TPU slice
(libtpu) or `cpu:N` and compares XLA's cost analysis of the two. XLA counts a
scanned layer body once, so programs are compiled with the layers unrolled at
two depths and the per-layer cost is taken by difference (`per_layer`,
`extrapolate`); launch/tpu_decode_view.py does the same for one decode step.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

from ir_jax import aot
from ir_jax import sharding as sh
from ir_jax.config import ConfigError
from ir_jax.config_file import load_config
from ir_jax.train.config import settings_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# HBM bandwidth per chip (public spec sheets), for a roofline on XLA's byte count.
HBM_BYTES_PER_S = {"v4": 1228e9, "v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9}
# The cost-analysis quantities that grow with depth.
COST_KEYS = ("flops", "bytes")


def per_layer(
  cost_a: Mapping[str, float],
  cost_b: Mapping[str, float],
  depths: Sequence[int],
  keys: Sequence[str] = COST_KEYS,
) -> dict[str, float]:
  """The cost of one layer from costs at two unrolled depths `depths = (a, b)`, a < b.

  Identical layers make cost linear in depth, so the difference per added layer
  is exact (what precedes and follows the layers cancels).
  """
  a, b = depths
  return {k: (cost_b[k] - cost_a[k]) / (b - a) for k in keys}


def extrapolate(
  cost_a: Mapping[str, float],
  cost_b: Mapping[str, float],
  depths: Sequence[int],
  layers: int,
  keys: Sequence[str] = COST_KEYS,
) -> dict[str, float]:
  """The cost at `layers` layers from costs at two unrolled depths `depths = (a, b)`."""
  per = per_layer(cost_a, cost_b, depths, keys)
  return {k: cost_a[k] + (layers - depths[0]) * per[k] for k in keys}


def tpu_view(
  config_path: str,
  topology: str,
  layers: tuple[int, int] = (2, 4),
  sparsity: float | None = None,
  log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
  """XLA's cost of dense vs routed inference (`ir_jax.aot` infer steps) on `topology`.

  XLA's cost_analysis() counts a scanned layer body once (and its
  optimal_seconds is not usable), so both steps are compiled with layers
  unrolled at two depths `layers`; per-layer costs are the difference, which
  extrapolates exactly to the config's depth (identical layers). Reports XLA
  FLOPs and bytes per chip, a roofline time (max of FLOPs at peak and bytes
  at HBM bandwidth) and the ratio routed / dense of each, next to the
  analytic step time `ir_jax.aot` prints (model FLOPs at an assumed MFU).
  """
  if not os.path.isfile(config_path) and os.path.isfile(os.path.join(REPO, config_path)):
    config_path = os.path.join(REPO, config_path)
  l0, l1 = layers
  if not 1 <= l0 < l1:
    raise ConfigError(f"--tpu-layers must be two increasing depths >= 1, got {layers}")
  target = aot.target_devices(topology)
  costs: dict[str, dict[int, dict[str, float]]] = {"infer_dense": {}, "infer": {}}
  full = None
  for depth in layers:
    cfg = load_config(config_path)
    full = full or cfg.model.num_layers
    cfg.model.num_layers = depth
    cfg.model.scan_layers = False
    if sparsity is not None:
      cfg.routing.sparsity = sparsity
    s = settings_from_config(cfg)
    mesh = sh.make_mesh(s.mesh, target.devices)
    for stage in costs:
      t0 = time.perf_counter()
      built = aot.build_step(s, stage, mesh)
      compiled = built.fn.lower(*built.args).compile()
      ca = compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, (list, tuple)) else ca
      costs[stage][depth] = dict(
        flops=float(ca.get("flops", 0.0)),
        bytes=float(ca.get("bytes accessed", 0.0)),
        compile_s=time.perf_counter() - t0,
      )
      log(
        f"[{stage}] {depth} unrolled layers: XLA flops/chip {costs[stage][depth]['flops']:.4g}"
        f", bytes/chip {costs[stage][depth]['bytes']:.4g} "
        f"({costs[stage][depth]['compile_s']:.0f}s)"
      )
  cfg = load_config(config_path)
  if sparsity is not None:
    cfg.routing.sparsity = sparsity
  s = settings_from_config(cfg)
  spec = s.routing.inference()
  b, t = s.data.batch_size, s.data.seq_len
  chips = len(target.devices)
  kind = topology.partition(":")[0]
  peak, bw = target.chip.peak_flops, HBM_BYTES_PER_S.get(kind)
  out: dict[str, Any] = dict(
    config=os.path.relpath(config_path, REPO),
    topology=topology,
    chips=chips,
    batch=b,
    seq_len=t,
    sparsity=spec.sparsity,
    unrolled_layers=list(layers),
    num_layers=full,
  )
  for stage, name in (("infer_dense", "dense"), ("infer", "routed")):
    ext = extrapolate(costs[stage][l0], costs[stage][l1], layers, full)
    fl = aot.step_flops(s.model, "infer", None if stage == "infer_dense" else spec, b, t)
    rec = dict(
      xla_flops_per_chip=ext["flops"],
      xla_bytes_per_chip=ext["bytes"],
      analytic_flops=fl["total"],
      compiles=costs[stage],
    )
    if peak:
      rec["analytic_step_s"] = fl["total"] / (chips * peak * 0.4)
      rec["xla_compute_s"] = ext["flops"] / peak
    if bw:
      rec["xla_memory_s"] = ext["bytes"] / bw
    if peak and bw:
      rec["xla_roofline_s"] = max(rec["xla_compute_s"], rec["xla_memory_s"])
    out[name] = rec
  d, r = out["dense"], out["routed"]
  out["ratio"] = {
    k: r[k] / d[k]
    for k in (
      "xla_flops_per_chip",
      "xla_bytes_per_chip",
      "analytic_flops",
      "analytic_step_s",
      "xla_roofline_s",
    )
    if k in d and d[k]
  }
  return out


def tpu_table(v: dict[str, Any]) -> str:
  """The console table of a `tpu_view` result: dense, routed and their ratio."""
  rows = [
    f"{v['config']} on {v['topology']} ({v['chips']} chips), {v['batch']} x {v['seq_len']} "
    f"tokens, informed top-k at sparsity {v['sparsity']:g} (XLA figures extrapolated from "
    f"{v['unrolled_layers'][0]} and {v['unrolled_layers'][1]} unrolled layers to "
    f"{v['num_layers']})",
    "| quantity | dense | routed | routed / dense |",
    "| --- | --- | --- | --- |",
  ]
  for key, label in (
    ("xla_flops_per_chip", "XLA FLOPs per chip"),
    ("xla_bytes_per_chip", "XLA bytes accessed per chip"),
    ("xla_roofline_s", "XLA roofline step s (max of FLOPs at peak, bytes at HBM)"),
    ("analytic_flops", "analytic model FLOPs (ir_jax.aot)"),
    ("analytic_step_s", "analytic step s at 40% MFU (ir_jax.aot)"),
  ):
    if key in v["dense"]:
      rows.append(
        f"| {label} | {v['dense'][key]:.4g} | {v['routed'][key]:.4g} | {v['ratio'][key]:.3f} |"
      )
  return "\n".join(rows)
