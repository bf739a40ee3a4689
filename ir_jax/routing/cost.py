"""Matmul FLOPs of routed forwards: what a spec executes, and what a perfect skip would.

Every count is 2 FLOPs per multiply-add, per token of a prefill of `seq_len`
tokens, attention causal: a query at position i attends i + 1 keys, (T + 1) / 2
on average over a row (a routed query too: top-k picks tokens from every part
of the row). Each unit takes one of three forms, read from its capacity c:

  execute   c = 1: the unit, for every token; no forecaster, no router
  forecast  c = 0: the forecaster for every token, the unit for the sink slots
            (segment starts, `spec.sink_slots`; attention keys and values for those
            slots alone, top-k mode: they attend only to each other); no router
  route     0 < c < 1: forecaster and router for every token, the unit for c of
            them (attention keys and values for every token: later tokens attend them)

The output head always runs. Greedy routing has no forecaster (its forecast is
zero), random and static no router, and oracle runs every unit for every token.
"""

from __future__ import annotations

import numpy as np

from ir_jax.config import LlamaConfig
from ir_jax.forecast import UNITS, lff_flops, router_flops
from ir_jax.routing.plan import prefill_plan
from ir_jax.routing.spec import RoutingSpec


def token_flops(cfg: LlamaConfig, seq_len: int) -> dict[str, float]:
  """Per-token matmul FLOPs of the model's parts in a causal prefill of `seq_len` tokens:
  q_o (query and output projections), kv (key and value projections), core (scores
  and weighted values over (seq_len + 1) / 2 keys on average), mlp, lff and router
  (one unit's), head."""
  d, h, n, k, f = (
    cfg.hidden_size,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.intermediate_size,
  )
  keys = (seq_len + 1) / 2
  return dict(
    q_o=float(2 * d * h * k * 2),
    kv=float(2 * d * n * k * 2),
    core=float(2 * keys * h * k * 2),
    mlp=float(3 * 2 * d * f),
    lff=float(lff_flops(cfg)),
    router=float(router_flops(cfg)),
    head=float(2 * d * cfg.vocab_size),
  )


def unit_flops(cfg: LlamaConfig, seq_len: int) -> tuple[float, float]:
  """FLOPs one token saves when its (attention, MLP) unit is approximated: q and o
  projections plus scores and values over the keys it attends; the whole SwiGLU MLP."""
  c = token_flops(cfg, seq_len)
  return c["q_o"] + c["core"], c["mlp"]


def form_flops(
  cfg: LlamaConfig, seq_len: int, unit: int, capacity: float, policy: str = "informed"
) -> float:
  """Per-token FLOPs of one unit (0 attention, 1 MLP) at `capacity` (top-k mode, gathered):
  execute, forecast or route, as the module docstring says."""
  c = token_flops(cfg, seq_len)
  skip = unit_flops(cfg, seq_len)[unit]
  always = c["kv"] if unit == 0 else 0.0
  if policy == "dense" or capacity >= 1.0:
    return always + skip
  if capacity <= 0.0:  # the slots' keys and values too: nothing else attends to them
    slots = RoutingSpec(policy="static", sparsity=1.0).k(seq_len, 0, 0)
    return _overhead(c, 0.0, policy) + (always + skip) * slots / seq_len
  if policy == "oracle":  # the error it ranks by needs the unit's output for every token
    return always + skip + _overhead(c, capacity, policy)
  return always + _overhead(c, capacity, policy) + skip * capacity


def _overhead(c: dict[str, float], capacity: float, policy: str) -> float:
  """Forecaster and router FLOPs per token of a unit below capacity 1."""
  lff = 0.0 if policy == "greedy" else c["lff"]
  router = c["router"] if (policy in ("informed", "greedy") and capacity > 0.0) else 0.0
  return lff + router


def flops(cfg: LlamaConfig, spec: RoutingSpec, seq_len: int, batch: int = 1) -> dict[str, float]:
  """Matmul FLOPs of one forward over `batch x seq_len` tokens.

  dense: the plain model. executed: what this implementation computes for
  `spec`: in top-k mode each unit in its form (see the module docstring) at its
  static count k / T (sink slots at capacity 0); in causal mode, with
  compute="all" or with Gumbel gates every unit below capacity 1 runs for every
  token, its forecaster and router on top (so executed exceeds dense there).
  ideal: what a perfect skip computes at the spec's capacities. per_unit: the
  executed FLOPs of each unit per token, `[L, 2]`.
  """
  if spec.flops and spec.capacities is None and spec.policy != "dense":
    raise ValueError(
      "a spec with a FLOPs budget and no capacity table: resolve it first "
      "(routing.trained_spec(model, spec, seq_len=...))"
    )
  t = seq_len
  c = token_flops(cfg, t)
  dense_layer = c["q_o"] + c["kv"] + c["core"] + c["mlp"]
  dense = batch * t * (cfg.num_layers * dense_layer + c["head"])
  plan = prefill_plan(cfg, spec, t)  # what the routed forward runs
  runs_all, ks = plan.runs_all, plan.ks
  per_unit = np.zeros((cfg.num_layers, len(UNITS)))
  ideal_unit = np.zeros_like(per_unit)
  for l in range(cfg.num_layers):
    for u in range(len(UNITS)):
      cap = 1.0 if spec.policy == "dense" else spec.capacity(l, u)
      ideal_unit[l, u] = form_flops(cfg, t, u, cap, spec.policy)
      if cap >= 1.0 or cap <= 0.0 and spec.mode == "topk" and not runs_all:
        per_unit[l, u] = ideal_unit[l, u]  # execute, or forecast with its sink slots
      elif runs_all:
        full = (c["kv"] if u == 0 else 0.0) + unit_flops(cfg, t)[u]
        per_unit[l, u] = full + _overhead(c, cap, spec.policy)
      else:
        per_unit[l, u] = form_flops(cfg, t, u, min(ks[l, u] / t, 1.0 - 1e-12), spec.policy)
  executed = batch * t * (per_unit.sum() + c["head"])
  ideal = batch * t * (ideal_unit.sum() + c["head"])
  return dict(
    dense=float(dense),
    executed=float(executed),
    ideal=float(ideal),
    executed_fraction=float(executed / dense),
    ideal_fraction=float(ideal / dense),
    per_unit=per_unit,
  )
