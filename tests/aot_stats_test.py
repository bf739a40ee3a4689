"""Ahead-of-time compile (ir_jax.aot) of the closed-form fits' statistics passes.

configs/tiny.py (d 64, 2 layers) on the 8 fake CPU devices. What is checked against what:
  sizes     the record's global statistics bytes vs a hand count of the outputs
            (L x 2 Gram matrices of d x d float32, moments, counts)
  per chip  the record's per-chip statistics bytes vs XLA's own output size (the passes
            return their statistics only, no model state); the inputs a pass does not
            read (XLA drops them from its arguments) vs a hand count of those variables
  sharding  the Gram matrices come out split over every device (fit.common pins them), on
            the configs' FSDP mesh (data 1, fsdp all) and with data 2, and the error
            curves' per-token outputs over the batch axes; per-chip temporaries of every
            pass do not grow with the global batch; the moments and error curves
            computed so on 8 devices equal a one-device run to float32 summation order
  copies    running total = one copy of the per-chip statistics, no held output (checked
            on _accumulate itself with jax.live_arrays); host figures = float32 fetch +
            float64 copy of the global statistics; across hosts one layer's block of the
            largest statistic is replicated per chip
"""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import pytest
from conftest import wide_tiny_config

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


@pytest.fixture(autouse=True)
def split_tiny_statistics(monkeypatch):
  """Production places a pass on the mesh only for models whose moments are large
  (fit.common.SPLIT_MIN_BYTES, 64 MiB a layer); these tests check that placement on the
  tiny model, so they lower the bar to nothing."""
  from ir_jax.fit import common

  monkeypatch.setattr(common, "SPLIT_MIN_BYTES", 0)


def tiny_config(data: int, fsdp: int):
  spec = importlib.util.spec_from_file_location("tiny_cfg", TINY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, 1
  return cfg


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def _state_per_chip(cfg, n: int, under: tuple[str, ...] = ("",)) -> int:
  """Bytes per device of the model variables whose path starts with one of `under`, from
  the shardings training gives them (ir_jax.train.state.abstract_state)."""
  s = settings_from_config(cfg)
  mesh = sh.make_mesh(s.mesh, jax.devices("cpu")[:n])
  _, abs_state, shardings = abstract_state(s.model, mesh)
  leaves = zip(jax.tree_util.tree_flatten_with_path(abs_state)[0], jax.tree.leaves(shardings))
  return sum(
    math.prod(sd.shard_shape(a.shape)) * a.dtype.itemsize
    for (keys, a), sd in leaves
    if _path(keys).startswith(under)
  )


# What each pass does not read, so XLA leaves it out of its arguments: the LM head and final
# norm (no pass computes logits), the routing variables it has no use for (the forecaster
# moments read no routing module, the router moments only the forecasters, the error curves
# forecasters and routers), and the batch's targets and loss mask.
ROUTING_STATE = ("routing/threshold", "routing/capacity", "routing/calibrated_for")
ROUTERS = ("routing/attn_router", "routing/mlp_router")
UNREAD = {
  "forecaster_stats": ("lm_head", "norm", "routing"),
  "router_stats": ("lm_head", "norm") + ROUTERS + ROUTING_STATE,
  "error_curves": ("lm_head", "norm") + ROUTING_STATE,
}
UNREAD_BATCH = 2 * B * T * F32 // 8  # targets (int32) and loss_mask (float32), split 8 ways


def test_hand_counts():
  assert GRAM == 65_536 and VEC == 1_024 and SCALAR == 16
  assert HAND == {"forecaster_stats": 133_152, "router_stats": 67_664, "error_curves": 16_384}


@pytest.mark.parametrize("mesh", [(1, 8), (2, 4)])
def test_statistics_passes_compile_and_their_sizes_are_the_outputs(mesh):
  cfg = tiny_config(*mesh)
  recs = aot.run(cfg, "cpu:8", list(aot.STATS_STAGES))
  state = _state_per_chip(cfg, 8)
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
    # ... and that alone is XLA's output size: the passes return no model state (the CPU
    # backend adds an 8-byte pointer per output leaf for the result tuple).
    out = r["output_gib"] * aot.GIB
    assert chip <= out <= chip + 8 * len(shapes), (stage, out, chip)
    assert r["state_out_gib"] * aot.GIB == pytest.approx(out - chip)
    # The whole model stays on the chips; what the pass does not read is not among XLA's
    # arguments and is counted beside it: the hand-picked variables and batch fields.
    assert r["model_chip_gib"] * aot.GIB == state
    unread = _state_per_chip(cfg, 8, UNREAD[stage]) + UNREAD_BATCH
    assert r["unread_inputs_gib"] * aot.GIB == unread, (stage, r["unread_inputs_gib"] * aot.GIB)
    batch = 5 * B * T * 4 // 8  # inputs, targets, loss_mask, positions, segment_ids
    assert r["argument_gib"] * aot.GIB == state + batch - unread, stage
    # The per-unit matrices are split along a feature dimension over every device
    # (fit.common._split_features), the error curves' per-token outputs over the batch
    # axes, here every device too (fit.common._split_tokens).
    assert r["stats_sharded"] is True, (stage, r["stats_shardings"])
    for k, v in shapes.items():
      if len(v) == 4:  # [L, 2, d, d or 1]: Gram matrices
        assert r["stats_split"][k] == 8, (stage, k, r["stats_shardings"][k])
      if stage == "error_curves":  # [L, 2, B x T]
        assert v == [L, 2, B * T] and r["stats_split"][k] == 8, (k, r["stats_shardings"][k])
    assert r["held_output_gib"] == 0  # _accumulate drops each output once it is added
    if stage != "error_curves":
      # The running total: one copy of the statistics per chip.
      assert r["running_total_gib"] == r["stats_chip_gib"]
      assert r["peak_gib"] == pytest.approx(
        r["total_gib"] + r["unread_inputs_gib"] + r["stats_chip_gib"]
      )
      # Host: the whole statistics in float32, then a float64 copy.
      assert r["host_fetch_gb"] * aot.GB == pytest.approx(HAND[stage])
      assert r["host_float64_gb"] * aot.GB == pytest.approx(2 * HAND[stage])
    else:
      assert r["running_total_gib"] == 0 and r["host_float64_gb"] == 0
      assert r["peak_gib"] == pytest.approx(r["total_gib"] + r["unread_inputs_gib"])
    assert r["gather_chip_gib"] == 0  # one host: nothing is replicated to gather
    assert r["gather_peak_gib"] == pytest.approx(r["model_chip_gib"] + r["running_total_gib"])
    assert r["flops"] > 0 and r["trained_params"] == 0
    text = aot.describe(r)
    assert "statistics" in text and "host, on every host" in text
    row = aot.stats_markdown_row(r, "tiny.py")
    assert row.startswith(f"| tiny.py | {stage} | cpu:8 (8) | {mesh[0]}x{mesh[1]}x1 | 8 x 64 |")


@pytest.mark.parametrize("stage", list(aot.STATS_STAGES))
def test_across_hosts_the_gather_replicates_one_layer_of_the_largest_statistic(stage):
  # host_array across hosts replicates one layer's block of a statistic at a time on every
  # chip (ir_jax.distributed.layer_gather); the record compiles that program for the
  # largest block. Eight CPU devices stand in for 2 hosts.
  cfg = tiny_config(1, 8)
  s = settings_from_config(cfg)
  one = aot.target_devices("cpu:8")
  two = aot.Target("cpu:8 (2 hosts)", one.devices, one.chip, hosts=2)
  r = aot.check_stage(s, stage, two, 0.4)
  # One layer of an [L, 2, d, d] matrix (of [L, 2, B x T] per-token values for the error
  # curves) whole per chip (XLA's CPU all-gather adds a temporary of the same size), not
  # the whole matrix (L layers), let alone the whole statistics.
  block = {"error_curves": 2 * B * T * F32}.get(stage, GRAM // L)
  assert block <= r["gather_chip_gib"] * aot.GIB <= 2 * block < HAND[stage], r["gathered"]
  assert r["gathered"].startswith("one layer of")
  gather = r["model_chip_gib"] + r["running_total_gib"] + r["held_output_gib"]
  assert r["gather_peak_gib"] == pytest.approx(gather + r["gather_chip_gib"])
  assert "host_array replicates one layer of" in aot.describe(r)


def test_layer_gather_is_the_layer_replicated_and_says_which_arrays_it_takes():
  # The gather host_array uses across hosts, run here on 8 devices of one process: the
  # block x[i] (numpy's), replicated on every device.
  import numpy as np

  from ir_jax import distributed

  mesh = sh.make_mesh(sh.MeshConfig(data=2, fsdp=4, tensor=1), jax.devices("cpu")[:8])
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "fsdp"))
  x = np.random.default_rng(0).standard_normal((3, 2, 8, 5)).astype(np.float32)
  xs = jax.device_put(x, split)
  assert distributed.gathers_by_layer(x.shape, split)
  gather = distributed.layer_gather(split)
  for i in range(3):
    got = gather(xs, np.int32(i))
    assert got.sharding.is_fully_replicated and got.shape == (2, 8, 5)
    np.testing.assert_array_equal(np.asarray(got.addressable_data(0)), x[i])
  # Rank 2 ([L, 2] sums, [B, T] masks), a split leading axis, one layer: gathered whole.
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  assert not distributed.gathers_by_layer((3, 2), split.update(spec=jax.sharding.PartitionSpec()))
  assert not distributed.gathers_by_layer((8, 2, 8), rows)
  assert not distributed.gathers_by_layer((1, 2, 8, 5), split)


def test_accumulate_holds_only_the_running_total_during_a_pass():
  # What the AOT record adds to a pass (the running total, no held output) is what
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
  # batch 0: nothing yet; then the total alone (batch 0's output, then the sums): each
  # output was added into it in place and dropped (before the change, from batch 2 on,
  # the previous batch's output was live too: 8 n bytes).
  assert live == [0, 4 * n, 4 * n, 4 * n]


@pytest.mark.parametrize("stage", list(aot.STATS_STAGES))
def test_per_chip_temporaries_of_the_passes_do_not_grow_with_the_global_batch(stage):
  # One 128-token row per chip on an all-FSDP mesh of 2, then 8 devices. The passes
  # are traced on the model's mesh (fit.common.pass_context), so the model's activation
  # constraints keep each chip to its own rows; without it XLA replicated the batch
  # (here 3.7 -> 11.8 MiB of temporaries for the moments; Llama-2-7B router moments 2.5
  # GiB per chip on v5e:4x4 -> 12.1 GiB on v5e:8x8, error curves 1.35 -> 5.44 GiB).
  temps = []
  for n in (2, 8):
    cfg = wide_tiny_config(n)
    cfg.train.forecaster.batch_size, cfg.train.forecaster.seq_len = n, 128
    (r,) = aot.run(cfg, f"cpu:{n}", [stage])
    assert r["per_host_batch"] == n and r["stats_sharded"] is True
    temps.append(r["temp_gib"])
  assert temps[1] < 1.25 * temps[0], temps


def test_passes_on_8_devices_come_out_split_and_equal_one_device_to_float32_order():
  # The real pass on real arrays: a random tiny model FSDP-sharded on data 2 x fsdp 4,
  # batches split over the batch axes. The moments come back split over all 8 devices
  # and equal the same pass on one device to float32 summation order (the tokens are
  # summed in another order once split; measured max 3.4e-7 of the largest value).
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from ir_jax.fit import common, forecasters, routers, tables
  from ir_jax.train.state import init_state

  s = settings_from_config(tiny_config(2, 4))
  mesh = sh.make_mesh(s.mesh, jax.devices("cpu")[:8])
  st = init_state(s.model, mesh, {"kind": "random", "seed": 0}, 0)
  model = nnx.merge(st.graphdef, st.state)
  d0 = jax.devices("cpu")[0]
  one = nnx.merge(st.graphdef, jax.device_put(st.state, d0))
  assert common.model_mesh(model) is mesh and common.model_mesh(one) is None
  rng = np.random.default_rng(0)
  seg = np.ones((B, T), np.int32)
  seg[:, 40:] = 2
  pos = np.concatenate([np.arange(40), np.arange(T - 40)])[None].repeat(B, 0).astype(np.int32)
  split = jax.sharding.NamedSharding(mesh, sh.batch_spec(2))
  batches = []
  for _ in range(2):
    toks = rng.integers(0, s.model.vocab_size, (B, T)).astype(np.int32)
    b = dict(inputs=toks, targets=toks, positions=pos, segment_ids=seg)
    b["loss_mask"] = np.ones((B, T), np.float32)
    batches.append({k: jax.device_put(v, split) for k, v in b.items()})
  passes = [
    lambda m, b: forecasters._forecaster_moments(m, b, 100.0),
    lambda m, b: routers._router_moments(m, b, False),
  ]
  for fn in passes:
    with common.pass_context(model):
      out = fn(model, batches[0])
    assert out["xtx"].sharding.shard_shape(out["xtx"].shape) == (L, 2, D // 8, D)
    got = common._accumulate(fn, model, batches)
    ref = None
    for b in batches:
      o = fn(one, jax.device_put(b, d0))
      ref = o if ref is None else jax.tree.map(jnp.add, ref, o)
    for k, v in ref.items():
      v = np.asarray(v, np.float64)
      scale = max(float(np.max(np.abs(v))), 1e-30)
      assert np.max(np.abs(got[k] - v)) <= 2e-6 * scale, k
  # The error curves: per-token outputs split over the 8 devices as the tokens are, fetched
  # whole: bitwise the values of one device (measured; each token's values are computed
  # from its own row, with the FSDP-split weights gathered whole before each matmul).
  with common.pass_context(model):
    out = tables._error_curves(model, batches[0], False)
  for k in ("score", "rel_err"):
    assert out[k].sharding.shard_shape(out[k].shape) == (L, 2, B * T // 8), k
  got = tables.error_curves(model, batches)
  ref = tables.error_curves(one, [jax.device_put(b, d0) for b in batches])
  n = 2 * B * (T - 2)  # ordinary tokens: all but the two segment starts of each row
  for name, g, v in zip(("score", "rel_err"), got, ref):
    assert g.shape == v.shape == (L, 2, n), name
    np.testing.assert_array_equal(g, v, err_msg=name)
