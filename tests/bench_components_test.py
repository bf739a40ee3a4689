"""`ir_jax.bench_components`: each part of a layer compiled alone, costed by XLA.

Checked against hand counts: the query chunks and key prefixes the attention
runs for dense and for gathered queries; XLA's FLOPs of each matmul part of the
tiny model (compiled for this machine's CPU) against the per-token formulas
written out here; the uniform capacity found for a FLOPs budget meets it.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_llama_config

from ir_jax import bench_components as BC
from ir_jax import routing as R
from ir_jax.config import ConfigError


def test_chunks_and_prefixes_by_hand():
  # Dense at 2,048 tokens: four chunks of 512, each to the end of its own block.
  assert BC.core_chunks(np.arange(2048), 2048) == [
    (512, 512),
    (512, 1024),
    (512, 1536),
    (512, 2048),
  ]
  # 600 gathered queries: two chunks of 304 (even split, multiple of 8); the first ends
  # at index 303 * 3 + 250 = 1,159 (prefix 1,536), the second at 2,047.
  q = np.arange(600) * 3 + 250
  q[-1] = 2047
  assert BC.core_chunks(np.sort(q), 2048) == [(304, 1536), (304, 2048)]
  q = np.arange(600) + 10  # the first chunk ends at 313: prefix 512
  q[-1] = 2047
  assert BC.core_chunks(q, 2048) == [(304, 512), (304, 2048)]
  # Short rows: one chunk against all keys.
  assert BC.core_chunks(np.arange(64), 64) == [(64, 64)]


def test_capacity_for_a_flops_budget():
  cfg = tiny_llama_config(hidden_size=256, intermediate_size=1024, lff_rank=8, router_hidden=0)
  for target in (0.9, 0.8):
    c = BC.capacity_for_flops(cfg, 256, target)
    got = R.flops(cfg, R.RoutingSpec(policy="informed", sparsity=1.0 - c), 256)["executed_fraction"]
    assert abs(got - target) < 0.005, (target, c, got)
  with pytest.raises(ConfigError, match="uniform capacity"):
    BC.capacity_for_flops(cfg, 256, 0.01)


def test_xla_flops_of_each_part_match_hand_counts():
  cfg = tiny_llama_config(hidden_size=128, intermediate_size=384, lff_rank=16, router_hidden=0)
  t = 128
  d, h, n, k, f, v = (
    cfg.hidden_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.intermediate_size,
    cfg.vocab_size,
  )
  cap = 0.5
  out = BC.predict(cfg, t, cap, jax.devices("cpu")[0], peak_flops=1e11, hbm_bytes_per_s=1e10)
  m = out["tokens_executed"]
  assert m == 64
  fl = {(p["name"], p["tokens"]): p["flops"] for p in out["parts"]}
  hand = {
    ("K/V projections", t): 2 * 2 * d * n * k * t,
    ("attention q/o projections", t): 2 * 2 * d * h * k * t,
    ("attention q/o projections", m): 2 * 2 * d * h * k * m,
    ("MLP", t): 3 * 2 * d * f * t,
    ("MLP", m): 3 * 2 * d * f * m,
    # scores and values: every query against all t keys (one chunk, one prefix)
    ("attention scores+values", t): 2 * 2 * h * k * t * t,
    ("forecasters", t): (2 * d * cfg.lff_rank * 2) * t,
    ("LM head", t): 2 * d * v * t,
  }
  for key, want in hand.items():
    # XLA adds the elementwise work (RoPE, SiLU, softmax, biases): a few percent at most.
    assert want <= fl[key] <= 1.1 * want, (key, fl[key], want)
  # The predicted totals add up their parts, and routing at 0.5 runs fewer unit FLOPs.
  assert out["dense_total_s"] == pytest.approx(sum(out["dense_s"].values()))
  assert out["routed_s"]["MLP"] < out["dense_s"]["MLP"]
