"""Ahead-of-time compile (ir_jax.aot) of the closed-form fits' statistics passes.

configs/tiny.py (d 64, 2 layers) on the 8 fake CPU devices. What is checked against what:
  sizes     the record's global statistics bytes vs a hand count of the outputs
            (L x 2 Gram matrices of d x d float32, moments, counts)
  per chip  the record's per-chip statistics bytes + the model state nnx.jit returns vs
            XLA's own output size (so neither can be made up)
  sharding  on the configs' FSDP mesh (data 1, fsdp all) the Gram matrices are split over
            every device; with data 2 they are split over fsdp only
  copies    running total and held output = one copy each of the per-chip statistics;
            host figures = float32 fetch + float64 copy of the global statistics
"""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import pytest

from ir_jax import aot
from ir_jax import sharding as sh
from ir_jax.train.config import settings_from_config
from ir_jax.train.state import abstract_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")

L, D, F32 = 2, 64, 4  # configs/tiny.py: 2 layers, d 64; statistics in float32
UNITS = L * 2  # (attention, MLP) per layer
GRAM = UNITS * D * D * F32  # one [L, 2, d, d] matrix of float32: 65,536 bytes
VEC = UNITS * D * F32  # one [L, 2, d] moment
SCALAR = UNITS * F32  # one [L, 2] sum
B, T = 8, 64  # configs/tiny.py's batch (both stages)
HAND = {
  # xtx, xty; sx, sy; count, dropped
  "forecaster_stats": 2 * GRAM + 2 * VEC + 2 * SCALAR,
  # xtx; sx, xty; count, sy, syy, err, tot
  "router_stats": GRAM + 2 * VEC + 5 * SCALAR,
  # score, rel_err: one float per unit and token
  "error_curves": 2 * UNITS * B * T * F32,
}


def tiny_config(data: int, fsdp: int):
  spec = importlib.util.spec_from_file_location("tiny_cfg", TINY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, 1
  return cfg


def _state_per_chip(cfg, n: int) -> tuple[int, int]:
  """(bytes, leaves) of the model state per device, from the shardings training gives it."""
  s = settings_from_config(cfg)
  mesh = sh.make_mesh(s.mesh, jax.devices("cpu")[:n])
  _, abs_state, shardings = abstract_state(s.model, mesh)
  leaves = list(zip(jax.tree.leaves(abs_state), jax.tree.leaves(shardings)))
  size = sum(math.prod(s_.shard_shape(a.shape)) * a.dtype.itemsize for a, s_ in leaves)
  return size, len(leaves)


def test_hand_counts():
  assert GRAM == 65_536 and VEC == 1_024 and SCALAR == 16
  assert HAND == {"forecaster_stats": 133_152, "router_stats": 67_664, "error_curves": 16_384}


@pytest.mark.parametrize("mesh", [(1, 8), (2, 4)])
def test_statistics_passes_compile_and_their_sizes_are_the_outputs(mesh):
  cfg = tiny_config(*mesh)
  recs = aot.run(cfg, "cpu:8", list(aot.STATS_STAGES))
  state, state_leaves = _state_per_chip(cfg, 8)
  for r in recs:
    stage = r["stage"]
    assert r["mesh"] == {"data": mesh[0], "fsdp": mesh[1], "tensor": 1}
    assert (r["batch"], r["seq_len"]) == (B, T)
    # Global size: exactly the hand count of the statistics.
    assert r["stats_gib"] * aot.GIB == HAND[stage], stage
    shapes = r["stats_shapes"]
    glob = {k: math.prod(v) * F32 for k, v in shapes.items()}
    assert sum(glob.values()) == HAND[stage]
    # Per chip: each output's global size over the ways it is split ...
    chip = sum(glob[k] // r["stats_split"][k] for k in shapes)
    assert r["stats_chip_gib"] * aot.GIB == chip, stage
    # ... and with the model state nnx.jit hands back, XLA's output size (the CPU
    # backend adds an 8-byte pointer per output leaf for the result tuple).
    n_out = len(shapes) + state_leaves
    out = r["output_gib"] * aot.GIB
    assert chip + state <= out <= chip + state + 8 * n_out, (stage, out, chip, state)
    assert r["state_out_gib"] * aot.GIB == pytest.approx(out - chip)
    # The per-unit matrices are split over fsdp (the model's feature axis); over
    # every device when the mesh is all fsdp, as the 7B configs' is.
    for k, v in shapes.items():
      if len(v) == 4:  # [L, 2, d, d or 1]: Gram matrices
        assert r["stats_split"][k] % mesh[1] == 0, (stage, k, r["stats_shardings"][k])
    if stage != "error_curves":
      assert r["stats_sharded"] is (mesh[0] == 1), (stage, r["stats_shardings"])
      # The running total and the previous batch's output: one copy each, per chip.
      assert r["running_total_gib"] == r["held_output_gib"] == r["stats_chip_gib"]
      assert r["peak_gib"] == pytest.approx(r["total_gib"] + 2 * r["stats_chip_gib"])
      # Host: the whole statistics in float32, then a float64 copy.
      assert r["host_fetch_gb"] * aot.GB == pytest.approx(HAND[stage])
      assert r["host_float64_gb"] * aot.GB == pytest.approx(2 * HAND[stage])
    else:
      assert r["running_total_gib"] == 0 and r["host_float64_gb"] == 0
    assert r["gather_chip_gib"] == 0  # one host: nothing is replicated to gather
    assert r["flops"] > 0 and r["trained_params"] == 0
    text = aot.describe(r)
    assert "statistics" in text and "host, on every host" in text
    row = aot.stats_markdown_row(r, "tiny.py")
    assert row.startswith(f"| tiny.py | {stage} | cpu:8 (8) | {mesh[0]}x{mesh[1]}x1 | 8 x 64 |")


def test_across_hosts_the_gather_replicates_the_largest_statistic_on_every_chip():
  # process_allgather (host_array across hosts) replicates each leaf on every chip; the
  # record compiles that for the largest leaf. Eight CPU devices stand in for 2 hosts.
  cfg = tiny_config(1, 8)
  s = settings_from_config(cfg)
  one = aot.target_devices("cpu:8")
  two = aot.Target("cpu:8 (2 hosts)", one.devices, one.chip, hosts=2)
  r = aot.check_stage(s, "forecaster_stats", two, 0.4)
  # One [L, 2, d, d] matrix whole per chip (XLA's CPU all-gather adds a temporary of
  # the same size), not the whole statistics (2 matrices + moments).
  assert GRAM <= r["gather_chip_gib"] * aot.GIB <= 2 * GRAM < HAND["forecaster_stats"]
  gather = r["argument_gib"] + r["running_total_gib"] + r["held_output_gib"]
  assert r["gather_peak_gib"] == pytest.approx(gather + r["gather_chip_gib"])
  assert "process_allgather replicates one leaf" in aot.describe(r)


def test_accumulate_holds_the_running_total_and_the_previous_output_during_a_pass():
  # What the AOT record adds to a pass (running total + held output) is what
  # ir_jax.fit.common._accumulate keeps live while the next batch's pass runs.
  from ir_jax.fit import common

  n = 12_345  # a length no other live array has
  live = []

  def pass_(model, batch):
    live.append(sum(x.nbytes for x in jax.live_arrays() if x.shape == (n,)))
    return {"s": jax.numpy.full((n,), batch["x"][0], jax.numpy.float32)}

  batches = [{"x": [float(i)]} for i in range(4)]
  out = common._accumulate(pass_, None, batches)
  assert out["s"][0] == 0 + 1 + 2 + 3
  # batch 0: nothing yet; batch 1: the total (= batch 0's output); then the total and
  # the previous batch's output, two copies beside the pass's own.
  assert live == [0, 4 * n, 8 * n, 8 * n]
